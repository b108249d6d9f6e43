"""Camera geometry (nemo_ext/conditioning/camera.py) against independent computations: OpenCV's own
projection (cv2.projectPoints), the loaders' real resize of an image with a dot in it, and scipy's
rotations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from nemo_ext.conditioning import camera as cam


def random_poses(n: int, seed: int = 0, spread: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.tile(np.eye(4), (n, 1, 1))
    p[:, :3, :3] = Rotation.random(n, random_state=seed).as_matrix()
    p[:, :3, 3] = rng.normal(size=(n, 3)) * spread
    return p


def project_cv2(points: np.ndarray, c2w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """OpenCV's projection of world points by a camera-to-world pose (OpenCV axes)."""
    w2c = np.linalg.inv(c2w)
    rvec, _ = cv2.Rodrigues(w2c[:3, :3])
    uv, _ = cv2.projectPoints(points.reshape(-1, 1, 3), rvec, w2c[:3, 3], k, None)
    return uv.reshape(-1, 2)


def test_plucker_rays_contain_the_points_opencv_projects_to_their_pixels() -> None:
    """A world point X that cv2 projects to the centre of pixel (u, v) lies on that pixel's ray:
    X x d = o x d (the Plücker moment), and d points towards X."""
    h, w = 12, 16
    k = cam.intrinsics_matrix(14.0, 13.0, 7.3, 5.6)
    pose = random_poses(1, seed=3)[0]
    rays = cam.plucker_rays(pose, k, h, w).double()[0]  # [6, H, W]
    rng = np.random.default_rng(1)
    depth = rng.uniform(1.0, 9.0, size=20)
    u, v = rng.integers(0, w, 20), rng.integers(0, h, 20)
    cam_pts = np.linalg.inv(k) @ np.stack([u, v, np.ones(20)]) * depth  # points in the camera frame
    world = (pose[:3, :3] @ cam_pts + pose[:3, 3:]).T
    np.testing.assert_allclose(project_cv2(world, pose, k), np.stack([u, v], 1), atol=1e-6)  # cv2 agrees
    for i in range(20):
        moment, d = rays[:3, v[i], u[i]].numpy(), rays[3:, v[i], u[i]].numpy()
        np.testing.assert_allclose(np.cross(world[i], d), moment, atol=1e-5)
        to_point = world[i] - pose[:3, 3]
        assert np.dot(to_point, d) > 0 and abs(np.linalg.norm(d) - 1) < 1e-6


def test_opengl_poses_convert_to_opencv_axes() -> None:
    """A point in front of an OpenGL camera (negative camera z) is in front of the converted OpenCV
    camera and projects to the same side of the image (GL y up = image up)."""
    gl = random_poses(1, seed=5)[0]
    point_gl_cam = np.array([0.5, 0.8, -4.0, 1.0])  # right, up, in front (GL looks down -z)
    world = gl @ point_gl_cam
    cv = cam.opengl_to_opencv(gl)[0]
    in_cv = np.linalg.inv(cv) @ world
    assert in_cv[2] == pytest.approx(4.0) and in_cv[0] == pytest.approx(0.5) and in_cv[1] == pytest.approx(-0.8)
    k = cam.intrinsics_matrix(10, 10, 8, 8)
    u, v = project_cv2(world[None, :3], cv, k)[0]
    assert u > 8 and v < 8  # right of centre, above it
    np.testing.assert_allclose(cam.opencv_to_opengl(cv)[0], gl, atol=1e-12)


def test_world_to_camera_rows_invert_exactly() -> None:
    w2c = random_poses(6, seed=7)
    c2w = cam.world_to_camera_to_pose(w2c[:, :3])  # RealEstate10K gives the 3x4 rows
    np.testing.assert_allclose(c2w, np.linalg.inv(w2c), atol=1e-10)


def test_relative_poses_ignore_the_world_frame_and_normalisation_is_undone_by_its_scale() -> None:
    p = random_poses(5, seed=9)
    rel = cam.relative_to_first(p)
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    g = random_poses(1, seed=11)[0]  # any rigid change of the world frame
    np.testing.assert_allclose(cam.relative_to_first(g @ p), rel, atol=1e-9)
    normed, scale = cam.normalise_translation(rel)
    centres = normed[:, :3, 3]
    assert np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1)).max() == pytest.approx(1.0)
    np.testing.assert_allclose(normed[:, :3, 3] * scale, rel[:, :3, 3], atol=1e-12)
    np.testing.assert_allclose(normed[:, :3, :3], rel[:, :3, :3])
    still = np.tile(np.eye(4), (3, 1, 1))
    assert cam.normalise_translation(still)[1] == 1.0


def test_realestate10k_normalised_intrinsics() -> None:
    k = cam.intrinsics_from_normalised(0.5, 0.9, 0.5, 0.5, width=640, height=360)
    assert (k[0, 0], k[1, 1]) == (320.0, 324.0)
    assert (k[0, 2], k[1, 2]) == (319.5, 179.5)  # the image centre on OpenCV's pixel grid


@pytest.mark.parametrize("mode,src,dst", [("crop", (90, 160), (32, 32)), ("pad", (90, 160), (32, 32)),
                                          ("crop", (48, 40), (24, 32)), ("pad", (30, 80), (40, 40))])
def test_intrinsics_follow_the_loaders_resize(mode, src, dst) -> None:
    """A dot drawn where K projects a point lands, after the loaders' resize_and_crop, where the resized
    K projects it (its intensity centroid; the antialiased resize keeps the centroid)."""
    from nemo_ext.data.video import resize_and_crop

    h, w = src
    k = cam.intrinsics_matrix(0.8 * w, 0.8 * w, w / 2 + 3.2, h / 2 - 2.1)
    k2, mask = cam.resize_intrinsics(k, src, dst, mode)
    for x_cam, y_cam in ((0.0, 0.0), (0.18, -0.12), (-0.2, 0.1)):
        u, v = (k @ [x_cam, y_cam, 1.0])[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        dot = np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * 3.0 ** 2))
        img = np.repeat((dot * 255).round().astype(np.uint8)[None, :, :, None], 3, axis=3)
        out = resize_and_crop(img, dst[0], dst[1], mode)[0, :, :, 0].astype(np.float64)
        if out.sum() < 50:  # cropped away
            continue
        oy, ox = np.mgrid[0:dst[0], 0:dst[1]]
        centroid = ((out * ox).sum() / out.sum(), (out * oy).sum() / out.sum())
        expected = (k2 @ [x_cam, y_cam, 1.0])[:2]
        np.testing.assert_allclose(centroid, expected, atol=0.1)  # measured <= 0.09; without the half-pixel terms >= 0.1
    if mode == "pad":
        assert not mask.all() and mask.any()  # letterbox rows or columns
        out = resize_and_crop(np.full((1, h, w, 3), 200, np.uint8), dst[0], dst[1], mode)[0, :, :, 0]
        np.testing.assert_array_equal(out > 0, mask)
    else:
        assert mask.all()


def test_rays_are_zero_on_padding_and_latent_grids_agree_with_pixel_grids() -> None:
    k = cam.intrinsics_matrix(40.0, 40.0, 31.5, 31.5)
    _, mask = cam.resize_intrinsics(k, (64, 128), (64, 64), "pad")
    rays = cam.plucker_rays(np.eye(4), cam.latent_intrinsics(k, 8), 8, 8, cam.latent_mask(mask, 8))
    assert rays.shape == (1, 6, 8, 8)
    assert torch.all(rays[0, :, :2] == 0) and torch.all(rays[0, :, -2:] == 0)  # letterbox rows
    assert torch.all(rays[0, 3:, 3].norm(dim=0) > 0.99)
    # the latent pixel's ray is the ray through the centre of its 8x8 block of pixels
    full = cam.plucker_rays(np.eye(4), k, 64, 64)
    lat = cam.plucker_rays(np.eye(4), cam.latent_intrinsics(k, 8), 8, 8)
    centre = (full[0, 3:, 3:5, 3:5].mean(dim=(1, 2)))  # pixels 3 and 4 straddle the block centre 3.5
    centre = centre / centre.norm()
    torch.testing.assert_close(lat[0, 3:, 0, 0], centre, atol=1e-4, rtol=0)


def test_latent_pose_frames_are_chosen_explicitly() -> None:
    np.testing.assert_array_equal(cam.latent_pose_frames(57, 8), [0, 8, 16, 24, 32, 40, 48, 56])
    np.testing.assert_array_equal(cam.latent_pose_frames(57, 8, "first"), [0, 1, 9, 17, 25, 33, 41, 49])
    np.testing.assert_array_equal(cam.latent_pose_frames(9, 4), [0, 4, 8])  # the Wan VAE's 4x
    np.testing.assert_array_equal(cam.latent_pose_frames(5, 1), [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="do not fill whole latent frames"):
        cam.latent_pose_frames(56, 8)


def test_bad_poses_and_intrinsics_are_named() -> None:
    p = random_poses(3)
    p[1, 0, 0] = np.nan
    with pytest.raises(cam.PoseError, match="frame 1 has NaN"):
        cam.as_poses(p)
    q = random_poses(3)
    q[2, :3, :3] *= 1.1
    with pytest.raises(cam.PoseError, match="frame 2 has a rotation that is not orthonormal"):
        cam.check_rotations(q)
    r = random_poses(2)
    r[0, :3, :3] = r[0, :3, :3] @ np.diag([1, 1, -1])  # a reflection
    with pytest.raises(cam.PoseError, match="frame 0 .*det = -1"):
        cam.check_rotations(r)
    cam.check_rotations(random_poses(4))
    with pytest.raises(cam.PoseError, match="focal lengths must be positive"):
        cam.check_intrinsics(cam.intrinsics_matrix(0, 10, 5, 5), 10, 10)
    with pytest.raises(cam.PoseError, match="principal point"):
        cam.check_intrinsics(cam.intrinsics_matrix(10, 10, 50, 5), 10, 10)
