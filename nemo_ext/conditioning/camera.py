"""Camera geometry: the one pose convention of the project, converters into it, Plücker rays.

**The convention.** A pose is a 4x4 **camera-to-world** matrix in **OpenCV axes** (camera x right,
y down, z forward, the direction the camera looks), float64; intrinsics ``K`` are 3x3 in **pixels of
the image they belong to**, OpenCV's pixel grid (the centre of the top-left pixel is (0, 0), so a
W-pixel-wide image spans x in [-0.5, W - 0.5]). Translations are unit-less after
:func:`normalise_translation` (the clip's largest camera-to-camera distance is 1; the factor is
returned so it can be undone); a converter that knows metres says so in its metadata.

Converters in: :func:`opengl_to_opencv` (nerfstudio / DL3DV / Blender ``transform_matrix``:
camera-to-world with camera x right, y up, z backwards), :func:`world_to_camera_to_pose`
(RealEstate10K's 3x4 world-to-camera rows, COLMAP), :func:`intrinsics_from_normalised`
(RealEstate10K's fx, fy, cx, cy as fractions of the width and height).

Conditioning: :func:`relative_to_first` (frame 0 becomes the identity), :func:`normalise_translation`,
:func:`resize_intrinsics` (the same resize / centre-crop / letterbox as the loaders'
:func:`nemo_ext.data.video.resize_and_crop`, with the mask of the pixels that are image, not padding),
:func:`latent_intrinsics` (the same camera on the tokenizer's latent grid), :func:`plucker_rays`
(6 channels per pixel, ``[o x d, d]``, zero where the mask says padding) and
:func:`latent_pose_frames` (which pixel frame's pose stands for each latent frame: chosen here,
explicitly, never by truncation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

# OpenGL camera axes (x right, y up, z backwards) -> OpenCV's (x right, y down, z forward): flip y and z.
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


class PoseError(ValueError):
    """A pose or intrinsics that cannot be used; the message names what is wrong and where."""


def as_poses(poses, what: str = "poses") -> np.ndarray:
    """``[T, 4, 4]`` (or ``[T, 3, 4]``, completed with ``[0, 0, 0, 1]``) float64, checked finite."""
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1:] not in ((4, 4), (3, 4)):
        raise PoseError(f"{what}: expected [T, 4, 4] or [T, 3, 4] matrices, got shape {list(p.shape)}")
    if p.shape[1] == 3:
        p = np.concatenate([p, np.broadcast_to([[[0.0, 0.0, 0.0, 1.0]]], (len(p), 1, 4))], axis=1)
    bad = ~np.isfinite(p).all(axis=(1, 2))
    if bad.any():
        raise PoseError(f"{what}: frame {int(np.argmax(bad))} has NaN or inf entries")
    return p


def check_rotations(poses, what: str = "poses", tol: float = 1e-3) -> None:
    """Every rotation block orthonormal with determinant +1 (within ``tol``), the last row [0, 0, 0, 1]."""
    p = as_poses(poses, what)
    r = p[:, :3, :3]
    err = np.abs(r @ np.swapaxes(r, 1, 2) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(r)
    bad = np.flatnonzero((err > tol) | (np.abs(det - 1.0) > tol))
    if len(bad):
        i = int(bad[0])
        raise PoseError(f"{what}: frame {i} has a rotation that is not orthonormal with det +1 "
                        f"(|R R^T - I| = {err[i]:.2g}, det = {det[i]:.4f})")
    if np.abs(p[:, 3] - [0.0, 0.0, 0.0, 1.0]).max() > tol:
        raise PoseError(f"{what}: the last row of a 4x4 pose must be [0, 0, 0, 1]")


def opengl_to_opencv(c2w_gl) -> np.ndarray:
    """Camera-to-world in OpenGL camera axes (nerfstudio, DL3DV ``transforms.json``, Blender) -> ours."""
    return as_poses(c2w_gl, "OpenGL camera-to-world") @ GL_TO_CV


def opencv_to_opengl(c2w) -> np.ndarray:
    return as_poses(c2w) @ GL_TO_CV


def world_to_camera_to_pose(w2c) -> np.ndarray:
    """World-to-camera ``[R | t]`` in OpenCV axes (RealEstate10K, COLMAP) -> camera-to-world
    ``[R^T | -R^T t]`` (the exact inverse of a rigid transform)."""
    p = as_poses(w2c, "world-to-camera")
    r, t = p[:, :3, :3], p[:, :3, 3:]
    out = np.zeros_like(p)
    out[:, :3, :3] = np.swapaxes(r, 1, 2)
    out[:, :3, 3:] = -np.swapaxes(r, 1, 2) @ t
    out[:, 3, 3] = 1.0
    return out


def pose_to_world_to_camera(c2w) -> np.ndarray:
    return world_to_camera_to_pose(c2w)  # the inverse of a rigid transform is its own formula


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def intrinsics_from_normalised(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """RealEstate10K's intrinsics (focal lengths and principal point as fractions of the image width
    (x) and height (y), measured from the image's top-left corner) -> K in pixels of a
    ``width`` x ``height`` frame, OpenCV's pixel grid (corner at -0.5)."""
    return intrinsics_matrix(fx * width, fy * height, cx * width - 0.5, cy * height - 0.5)


def check_intrinsics(k, width: int, height: int, what: str = "intrinsics") -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        raise PoseError(f"{what}: expected a finite 3x3 matrix, got {k.tolist() if k.size <= 9 else list(k.shape)}")
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if fx <= 0 or fy <= 0:
        raise PoseError(f"{what}: focal lengths must be positive (fx={fx:g}, fy={fy:g} pixels)")
    if not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
        raise PoseError(f"{what}: principal point ({cx:g}, {cy:g}) outside the {width}x{height} image")
    return k


def relative_to_first(c2w) -> np.ndarray:
    """Poses relative to frame 0: ``inv(P_0) @ P_t`` (frame 0 becomes the identity; a rigid change
    of the world frame leaves the result unchanged)."""
    p = as_poses(c2w)
    return pose_to_world_to_camera(p[:1]) @ p


def normalise_translation(c2w, eps: float = 1e-9) -> tuple[np.ndarray, float]:
    """Scale the translations so that the largest distance between two camera centres of the clip is 1
    (NeMo's camera-control recipe); returns (poses, scale) with ``poses[:, :3, 3] = original / scale``.
    A clip whose camera does not move keeps scale 1."""
    p = as_poses(c2w).copy()
    centres = p[:, :3, 3]
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1)).max() if len(p) > 1 else 0.0
    scale = float(dist) if dist > eps else 1.0
    p[:, :3, 3] /= scale
    return p, scale


@dataclass(frozen=True)
class ResizeGeometry:
    """How a ``src`` frame lands in the ``dst`` frame: scaled by (sx, sy) then shifted by (dx, dy) pixels
    (negative: cropped); ``valid`` is the box of dst pixels that show the image (top, left, bottom, right)."""

    sx: float
    sy: float
    dx: int
    dy: int
    valid: tuple[int, int, int, int]


def resize_geometry(src_hw: Sequence[int], dst_hw: Sequence[int], mode: str = "crop") -> ResizeGeometry:
    """The geometry of :func:`nemo_ext.data.video.resize_and_crop` (the loaders' resize): one definition."""
    from nemo_ext.data.video import _target_hw

    h, w = int(src_hw[0]), int(src_hw[1])
    height, width = int(dst_hw[0]), int(dst_hw[1])
    if mode not in ("crop", "pad"):
        raise ValueError(f"resize mode must be 'crop' or 'pad', got {mode!r}")
    if (h, w) == (height, width):
        return ResizeGeometry(1.0, 1.0, 0, 0, (0, 0, height, width))
    new_h, new_w = _target_hw(h, w, height, width, cover=(mode == "crop"))
    if mode == "crop":
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return ResizeGeometry(new_w / w, new_h / h, -left, -top, (0, 0, height, width))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return ResizeGeometry(new_w / w, new_h / h, left, top, (top, left, top + new_h, left + new_w))


def scale_intrinsics(k, sx: float, sy: float) -> np.ndarray:
    """K of the same camera after the image is scaled by (sx, sy): pixel-grid coordinates map as
    ``x' + 0.5 = s (x + 0.5)`` (corners stay corners, as torch's ``interpolate(align_corners=False)``,
    DALI's and OpenCV's resize do)."""
    k = np.asarray(k, dtype=np.float64)
    out = k.copy()
    out[0, 0], out[1, 1] = k[0, 0] * sx, k[1, 1] * sy
    out[0, 2], out[1, 2] = (k[0, 2] + 0.5) * sx - 0.5, (k[1, 2] + 0.5) * sy - 0.5
    return out


def resize_intrinsics(k, src_hw: Sequence[int], dst_hw: Sequence[int], mode: str = "crop"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """K of a frame after the loaders' resize + centre crop / letterbox to ``dst_hw``, and the
    ``[H, W]`` bool mask of the pixels that show the image (False on letterbox padding): the resize of
    :func:`scale_intrinsics`, then a crop or pad shifts the coordinates."""
    g = resize_geometry(src_hw, dst_hw, mode)
    out = scale_intrinsics(k, g.sx, g.sy)
    out[0, 2] += g.dx
    out[1, 2] += g.dy
    mask = np.zeros((int(dst_hw[0]), int(dst_hw[1])), dtype=bool)
    top, left, bottom, right = g.valid
    mask[top:bottom, left:right] = True
    return out, mask


def latent_intrinsics(k, spatial_compression: int) -> np.ndarray:
    """The same camera on the tokenizer's latent grid (one latent pixel per ``spatial_compression``^2
    block of pixels): a resize by 1 / spatial_compression."""
    s = 1.0 / int(spatial_compression)
    return scale_intrinsics(k, s, s)


def latent_mask(mask: np.ndarray, spatial_compression: int) -> np.ndarray:
    """A latent pixel is image when the pixel at its block's centre is (letterbox edges fall on block
    borders or cut one block)."""
    s = int(spatial_compression)
    h, w = mask.shape
    ys = np.minimum(np.arange(h // s) * s + s // 2, h - 1)
    xs = np.minimum(np.arange(w // s) * s + s // 2, w - 1)
    return mask[np.ix_(ys, xs)]


def latent_pose_frames(num_frames: int, temporal_compression: int, which: str = "last") -> np.ndarray:
    """The pixel frame whose pose each latent frame gets, for Cosmos' causal layout (latent frame 0 =
    pixel frame 0 alone, latent frame k >= 1 = pixel frames ``(k - 1) tc + 1 .. k tc``): ``last`` (the
    group's last frame: where the camera is once the latent frame is complete) or ``first``.
    ``temporal_compression`` 1: every frame. Raises when the frames do not fill whole groups."""
    tc, n = int(temporal_compression), int(num_frames)
    if tc < 1 or n < 1:
        raise ValueError(f"need num_frames >= 1 and temporal_compression >= 1, got {n} and {tc}")
    if (n - 1) % tc:
        raise ValueError(f"{n} frames do not fill whole latent frames of {tc} (1 + k * {tc} frames)")
    if which not in ("last", "first"):
        raise ValueError(f"which must be 'last' or 'first', got {which!r}")
    groups = (n - 1) // tc
    ks = np.arange(1, groups + 1)
    rest = ks * tc if which == "last" else (ks - 1) * tc + 1
    return np.concatenate([[0], rest]).astype(np.int64)


def plucker_rays(c2w, k, height: int, width: int, mask: Optional[np.ndarray] = None) -> torch.Tensor:
    """Plücker coordinates of every pixel's ray: ``[T, 6, height, width]`` float32, channels
    ``[o x d, d]`` with o the camera centre and d the unit ray direction through the pixel centre, in
    world coordinates. ``k``: one 3x3 or ``[T, 3, 3]`` in pixels of this grid; ``mask``: ``[H, W]``
    bool, rays zeroed where False (letterbox padding)."""
    p = torch.as_tensor(as_poses(c2w), dtype=torch.float64)
    kk = torch.as_tensor(np.asarray(k, dtype=np.float64))
    if kk.ndim == 2:
        kk = kk.expand(len(p), 3, 3)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # [HW, 3]
    cam = torch.einsum("tij,nj->tni", torch.linalg.inv(kk), pix)  # camera-frame directions
    d = torch.einsum("tij,tnj->tni", p[:, :3, :3], cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = p[:, None, :3, 3].expand_as(d)
    rays = torch.cat([torch.cross(o, d, dim=-1), d], dim=-1)  # [T, HW, 6]
    rays = rays.reshape(len(p), height, width, 6).permute(0, 3, 1, 2)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask, dtype=bool))
        if tuple(m.shape) != (height, width):
            raise ValueError(f"mask of shape {list(m.shape)} for a {height}x{width} ray grid")
        rays = rays * m.to(rays.dtype)
    return rays.float().contiguous()
