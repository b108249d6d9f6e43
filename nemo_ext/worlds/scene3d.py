"""3D scenes for the camera worlds: a textured room with boxes and spheres, ray cast from any camera.

The ground truth of camera_control (and later of multi-camera driving worlds): a :class:`Scene` is
drawn from an ``np.random.Generator`` (:func:`sample_scene`), stored as json (:meth:`Scene.to_json`)
and rendered from any pose with exact depth (:func:`render`, :func:`render_path`), so an evaluation
can re-render an episode or check an estimated pose against the one that made the frames.

**World axes**: right-handed, **z up**, metres. The floor is the plane z = 0; the room is the box
x in [-hx, hx], y in [-hy, hy], z in [0, height] (hx, hy, height = ``Scene.room``), its centre above
the origin. z up is the driving worlds' ego convention (x forward, y left, z up), so a rig there is
a body pose in these axes. **Cameras** follow the project's one convention
(:mod:`nemo_ext.conditioning.camera`): 4x4 camera-to-world in OpenCV axes (x right, y down,
z forward), K in pixels, the centre of the top-left pixel at (0, 0); pixel (u, v)'s ray is
``R K^-1 [u, v, 1]`` as in :func:`~nemo_ext.conditioning.camera.plucker_rays`. Its camera-z
component is 1, so the ray parameter of a hit *is* the z-depth that :func:`render` returns.

Textures (checker, diagonal stripes, solid) have strong local contrast so that camera motion is
observable (SIFT-based pose estimation); object colours are :data:`~nemo_ext.worlds.shapes.PALETTE`'s
(each object its own name), room colours are muted light/dark pairs, so objects stand out.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from nemo_ext.conditioning.camera import as_poses, check_intrinsics, intrinsics_matrix
from nemo_ext.worlds.shapes import PALETTE, to_uint8

PATTERNS: tuple[str, ...] = ("solid", "checker", "stripes")
KINDS: tuple[str, ...] = ("box", "sphere")
PATH_KINDS: tuple[str, ...] = ("orbit", "dolly", "pan_tilt", "random")
UP = np.array([0.0, 0.0, 1.0])
# shading: ambient plus a key light (high, from +x +y) and a weaker fill (low, from -x -y), both
# directions *towards* the light; each axis-aligned face normal gets its own brightness (computed:
# +z 0.89, +x 0.74, -y 0.59, +y 0.51, -x 0.41, -z 0.35 = ambient), so box faces and room corners show
KEY_LIGHT, FILL_LIGHT = np.array([0.6, 0.25, 0.75]), np.array([-0.25, -0.95, 0.2])
KEY_LIGHT, FILL_LIGHT = KEY_LIGHT / np.linalg.norm(KEY_LIGHT), FILL_LIGHT / np.linalg.norm(FILL_LIGHT)
AMBIENT, KEY, FILL = 0.35, 0.65, 0.25
DARK_SHADE = 0.4  # an object texture's second colour: its palette colour times this (same hue)
FLOOR, WALLS, CEILING = 0, 1, 2  # surface ids; object i is surface 3 + i
CAMERA_MARGIN = 0.4  # metres a camera keeps from the walls and the ceiling
CLEARANCE = 0.3  # metres a camera stays above the tallest object (it never flies into one)


@dataclass(frozen=True)
class Texture:
    """``pattern`` in :data:`PATTERNS`; ``colors`` (first, second) rgb; ``period`` in metres."""

    pattern: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    period: float


@dataclass(frozen=True)
class Object3D:
    """An axis-aligned box (``half_size`` its half extents) or a sphere (radius ``half_size[0]``)."""

    kind: str
    color: str  # PALETTE name, distinct within a scene
    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    texture: Texture


@dataclass(frozen=True)
class Scene:
    """A static room: everything :func:`render` needs, json-able (:meth:`to_json`, :meth:`from_json`)
    so that a sample's json holds its exact ground truth."""

    room: tuple[float, float, float]  # hx, hy, height (see the module docstring)
    floor: Texture
    walls: Texture
    ceiling: Texture
    objects: tuple[Object3D, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Scene":
        def tex(t: dict[str, Any]) -> Texture:
            return Texture(t["pattern"], tuple(tuple(int(x) for x in c) for c in t["colors"]), float(t["period"]))

        objs = tuple(Object3D(o["kind"], o["color"], tuple(map(float, o["center"])),
                              tuple(map(float, o["half_size"])), tex(o["texture"])) for o in d["objects"])
        return cls(tuple(map(float, d["room"])), tex(d["floor"]), tex(d["walls"]), tex(d["ceiling"]), objs)


def _muted_pair(rng: np.random.Generator, light: tuple[float, float], dark: tuple[float, float]) -> tuple:
    """A light and a dark low-saturation colour of nearby hues: strong contrast, never palette-bright."""
    h = rng.random()
    s = rng.uniform(0.1, 0.35)
    a = colorsys.hsv_to_rgb(h, s, rng.uniform(*light))
    b = colorsys.hsv_to_rgb((h + rng.uniform(-0.1, 0.1)) % 1.0, s, rng.uniform(*dark))
    return tuple(tuple(int(round(255 * c)) for c in col) for col in (a, b))


def _r3(x: float) -> float:
    return round(float(x), 3)  # millimetres: tidy json, exact round trip


def _place(rng: np.random.Generator, feet: Sequence[float], hx: float, hy: float) -> list[tuple[float, float]]:
    """Random floor spots for footprints of these radii, >= 30 cm from the walls and 15 cm apart
    (a greedy placement that starts over when one does not fit)."""
    for _ in range(100):
        spots: list[tuple[float, float]] = []
        for foot in feet:
            for _ in range(200):
                x = rng.uniform(-hx + 0.3 + foot, hx - 0.3 - foot)
                y = rng.uniform(-hy + 0.3 + foot, hy - 0.3 - foot)
                if all(math.hypot(x - px, y - py) >= foot + pf + 0.15 for (px, py), pf in zip(spots, feet)):
                    spots.append((x, y))
                    break
            else:
                break
        if len(spots) == len(feet):
            return spots
    raise RuntimeError(f"could not place {len(feet)} objects in a {2 * hx}x{2 * hy} m room")


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A room of 4-7 m by 4-7 m, 2.6-3.2 m high, and ``num_objects`` (default 4-8) boxes and
    spheres resting on the floor at random places whose footprints keep 15 cm apart."""
    n = int(rng.integers(4, 9)) if num_objects is None else int(num_objects)
    if not 0 <= n <= len(PALETTE):
        raise ValueError(f"num_objects must be in [0, {len(PALETTE)}] (one palette colour each), got {n}")
    hx, hy, height = _r3(rng.uniform(2.0, 3.5)), _r3(rng.uniform(2.0, 3.5)), _r3(rng.uniform(2.6, 3.2))
    floor = Texture("checker", _muted_pair(rng, (0.65, 0.85), (0.2, 0.35)), _r3(rng.uniform(0.25, 0.5)))
    # walls always checker: a view of striped wall has no corners (0 SIFT keypoints measured on a
    # 128x128 pan_tilt frame of one), and the pose estimator needs them
    walls = Texture("checker", _muted_pair(rng, (0.7, 0.9), (0.25, 0.4)), _r3(rng.uniform(0.3, 0.6)))
    ceiling = Texture("checker", _muted_pair(rng, (0.75, 0.9), (0.4, 0.55)), _r3(rng.uniform(0.5, 0.8)))
    colors = [str(c) for c in rng.choice(list(PALETTE), size=n, replace=False)]
    kinds = [str(rng.choice(KINDS)) for _ in colors]
    halves = [tuple(_r3(v) for v in rng.uniform(0.15, 0.45, size=3)) if kind == "box"
              else (_r3(rng.uniform(0.15, 0.4)),) * 3 for kind in kinds]
    feet = [math.hypot(hs[0], hs[1]) if kind == "box" else hs[0] for kind, hs in zip(kinds, halves)]
    spots = _place(rng, feet, hx, hy)
    objects = []
    for color, kind, half, (x, y) in zip(colors, kinds, halves, spots):
        rgb = PALETTE[color]
        tex = Texture(str(rng.choice(PATTERNS)), (rgb, tuple(int(round(DARK_SHADE * c)) for c in rgb)),
                      _r3(rng.uniform(0.08, 0.16)))
        objects.append(Object3D(kind, color, (_r3(x), _r3(y), half[2]), half, tex))
    return Scene((hx, hy, height), floor, walls, ceiling, tuple(objects))


def default_intrinsics(height: int, width: int, fov_x_deg: float = 60.0) -> np.ndarray:
    """Square pixels, principal point at the image centre ((W - 1) / 2, (H - 1) / 2 on OpenCV's
    grid), horizontal field of view ``fov_x_deg`` from the left edge (-0.5) to the right (W - 0.5)."""
    f = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return intrinsics_matrix(f, f, (width - 1) / 2, (height - 1) / 2)


def look_at(eye, target, up: Sequence[float] = UP) -> np.ndarray:
    """Camera-to-world (OpenCV axes) at ``eye`` whose z axis points at ``target`` and whose image
    y axis points down (away from ``up``); broadcasts over leading dimensions ([..., 3] -> [..., 4, 4])."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    up = np.asarray(up, dtype=np.float64)
    z = target - eye
    zn = np.linalg.norm(z, axis=-1, keepdims=True)
    if (zn < 1e-9).any():
        raise ValueError("look_at: eye and target coincide")
    z = z / zn
    x = np.cross(z, np.broadcast_to(up, z.shape))
    xn = np.linalg.norm(x, axis=-1, keepdims=True)
    if (xn < 1e-6).any():
        raise ValueError("look_at: the view direction is parallel to up (looking straight up or down)")
    x = x / xn
    y = np.cross(z, x)  # unit: z and x are orthonormal
    pose = np.zeros(z.shape[:-1] + (4, 4))
    pose[..., :3, :3] = np.stack([x, y, z], axis=-1)
    pose[..., :3, 3] = np.broadcast_to(eye, z.shape)
    pose[..., 3, 3] = 1.0
    return pose


def rig_poses(body_c2w, extrinsics) -> np.ndarray:
    """Each rig camera's poses: ``[C, T, 4, 4]``, camera c at frame t = ``body_c2w[t] @ extrinsics[c]``
    (an extrinsic is the camera's camera-to-body transform, OpenCV camera axes)."""
    return as_poses(body_c2w, "body poses")[None] @ as_poses(extrinsics, "extrinsics")[:, None]


# --------------------------------------------------------------------------------------------- rendering
def _surfaces(scene: Scene) -> dict[str, np.ndarray]:
    """Per-surface arrays (floor, walls, ceiling, objects...) that the shader gathers by surface id."""
    hx, hy, h = scene.room
    room_c, room_h = (0.0, 0.0, h / 2), (hx, hy, h / 2)
    texs = [scene.floor, scene.walls, scene.ceiling] + [o.texture for o in scene.objects]
    return {
        "center": np.array([room_c] * 3 + [o.center for o in scene.objects], dtype=np.float64),
        "half": np.array([room_h] * 3 + [o.half_size for o in scene.objects], dtype=np.float64),
        "inward": np.array([-1.0] * 3 + [1.0] * len(scene.objects)),  # room normals face inside
        "sphere": np.array([False] * 3 + [o.kind == "sphere" for o in scene.objects]),
        "pattern": np.array([PATTERNS.index(t.pattern) for t in texs]),
        "a": np.array([t.colors[0] for t in texs], dtype=np.float64),
        "b": np.array([t.colors[1] for t in texs], dtype=np.float64),
        "period": np.array([t.period for t in texs], dtype=np.float64),
    }


def _cast(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of the rays ``o + t d`` (one origin inside the room, ``d`` [N, 3]): (t [N], surface
    id [N]). The room's six inward planes always give a hit (its exit); objects by the slab method
    (boxes) or the quadratic (spheres) replace it where nearer."""
    hx, hy, h = scene.room
    lo, hi = np.array([-hx, -hy, 0.0]), np.array([hx, hy, h])
    dd = np.where(d == 0.0, 1e-300, d)  # an axis-parallel ray: planes at +-inf, never nan
    inv = 1.0 / dd
    exits = np.maximum((lo - o) * inv, (hi - o) * inv)
    axis = exits.argmin(axis=1)
    t = np.take_along_axis(exits, axis[:, None], 1)[:, 0]
    surf = np.where(axis == 2, np.where(d[:, 2] < 0, FLOOR, CEILING), WALLS)
    dd2 = None
    for i, ob in enumerate(scene.objects):
        c, hs = np.asarray(ob.center), np.asarray(ob.half_size)
        if ob.kind == "box":
            ta, tb = (c - hs - o) * inv, (c + hs - o) * inv
            near = np.minimum(ta, tb).max(axis=1)
            far = np.maximum(ta, tb).min(axis=1)
            hit = (near <= far) & (near > 0) & (near < t)
        else:
            if dd2 is None:
                dd2 = np.einsum("ij,ij->i", d, d)
            oc = o - c
            b = d @ oc
            disc = b * b - dd2 * (oc @ oc - hs[0] ** 2)
            near = (-b - np.sqrt(np.maximum(disc, 0.0))) / dd2
            hit = (disc >= 0) & (near > 0) & (near < t)
        t = np.where(hit, near, t)
        surf = np.where(hit, 3 + i, surf)
    return t, surf


def _shade(scene: Scene, o: np.ndarray, d: np.ndarray, t: np.ndarray, surf: np.ndarray) -> np.ndarray:
    """Textured, Lambert-shaded colour (float rgb [N, 3]) at each ray's hit."""
    s = _surfaces(scene)
    p = o + t[:, None] * d
    q = (p - s["center"][surf]) / s["half"][surf]  # box: the face's axis has |q| = 1; sphere: unit
    axis = np.abs(q).argmax(axis=1)
    box_n = np.zeros_like(q)
    np.put_along_axis(box_n, axis[:, None], np.sign(np.take_along_axis(q, axis[:, None], 1)), 1)
    box_n *= s["inward"][surf][:, None]
    sphere = s["sphere"][surf][:, None]
    n = np.where(sphere, q, box_n)
    # texture coordinates: the hit relative to the surface centre, the face-normal part removed on
    # flat faces (so a face's pattern depends on its two in-plane coordinates only)
    tq = p - s["center"][surf]
    tq = np.where(sphere, tq, tq - box_n * (box_n * tq).sum(1, keepdims=True))
    period = s["period"][surf]
    checker = np.floor(tq / period[:, None]).sum(1) % 2
    stripes = np.floor(tq.sum(1) / period) % 2  # diagonal bands: visible on faces of every axis
    pat = s["pattern"][surf]
    second = np.where(pat == 1, checker, np.where(pat == 2, stripes, 0.0)) > 0.5
    col = np.where(second[:, None], s["b"][surf], s["a"][surf])
    light = AMBIENT + KEY * np.maximum(n @ KEY_LIGHT, 0.0) + FILL * np.maximum(n @ FILL_LIGHT, 0.0)
    return col * light[:, None]


def _camera_rays(k: np.ndarray, height: int, width: int, supersample: int) -> np.ndarray:
    """Camera-frame directions ``K^-1 [u, v, 1]`` (camera z = 1): the H*W pixel centres first, then
    (if supersample > 1) ``supersample``^2 samples per pixel on a regular sub-grid, [H, W, s*s] order."""
    vs, us = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    pts = [np.stack([us.ravel(), vs.ravel()], 1)]
    if supersample > 1:
        off = (np.arange(supersample) + 0.5) / supersample - 0.5
        oy, ox = np.meshgrid(off, off, indexing="ij")
        sub = np.stack([ox.ravel(), oy.ravel()], 1)  # [s*s, 2]
        pts.append((pts[0][:, None, :] + sub[None]).reshape(-1, 2))
    pix = np.concatenate(pts)
    return np.concatenate([pix, np.ones((len(pix), 1))], 1) @ np.linalg.inv(k).T


def _render_rays(scene: Scene, c2w: np.ndarray, cam: np.ndarray, height: int, width: int,
                 supersample: int) -> tuple[np.ndarray, np.ndarray]:
    hx, hy, h = scene.room
    o = c2w[:3, 3].copy()
    if not (abs(o[0]) < hx and abs(o[1]) < hy and 0 < o[2] < h):
        raise ValueError(f"render: camera centre {o.round(3).tolist()} is outside the room "
                         f"(x in +-{hx}, y in +-{hy}, z in (0, {h}))")
    d = cam @ c2w[:3, :3].T
    t, surf = _cast(scene, o, d)
    n = height * width
    depth = t[:n].reshape(height, width).astype(np.float32)
    if supersample == 1:
        rgb = _shade(scene, o, d, t, surf).reshape(height, width, 3)
    else:
        rgb = _shade(scene, o, d[n:], t[n:], surf[n:]).reshape(height, width, supersample ** 2, 3).mean(2)
    return to_uint8(rgb), depth


# measured (this 2-core dev machine, shared, one thread, 8 objects, best of 10, two runs): supersample=1
# (one ray per pixel) 64x64 1.9-2.5 ms, 128x128 8.3-11 ms; supersample=2 (4 colour rays + the depth
# ray per pixel) 64x64 9.7-14 ms, 128x128 41-63 ms
def render(scene: Scene, c2w, k, height: int, width: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The scene from camera ``c2w`` (4x4, OpenCV axes) with intrinsics ``k``: (rgb uint8 [H, W, 3],
    depth float32 [H, W] = z-depth along the optical axis at each pixel centre; every ray hits the
    room, so it is finite). ``supersample`` s > 1 averages s x s samples per pixel for the colour
    (anti-aliasing); depth always comes from the pixel-centre ray. Deterministic."""
    c2w = as_poses(c2w, "render pose")[0]
    k = check_intrinsics(k, width, height, "render intrinsics")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    return _render_rays(scene, c2w, _camera_rays(k, height, width, int(supersample)), height, width,
                        int(supersample))


def render_path(scene: Scene, poses, k, height: int, width: int, supersample: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render` of every pose: (frames uint8 [T, H, W, 3], depth float32 [T, H, W])."""
    poses = as_poses(poses, "render_path poses")
    k = check_intrinsics(k, width, height, "render intrinsics")
    cam = _camera_rays(k, height, width, int(supersample))
    out = [_render_rays(scene, p, cam, height, width, int(supersample)) for p in poses]
    return np.stack([f for f, _ in out]), np.stack([d for _, d in out])


# ------------------------------------------------------------------------------------------ camera paths
def camera_bounds(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The box where path cameras live: :data:`CAMERA_MARGIN` from the walls and the ceiling,
    :data:`CLEARANCE` above the tallest object (so no path enters an object), at least 1 m high."""
    hx, hy, h = scene.room
    top = max([o.center[2] + o.half_size[2] for o in scene.objects], default=0.0)
    lo = np.array([-hx + CAMERA_MARGIN, -hy + CAMERA_MARGIN, max(1.0, top + CLEARANCE)])
    hi = np.array([hx - CAMERA_MARGIN, hy - CAMERA_MARGIN, h - CAMERA_MARGIN])
    if (hi - lo <= 0.2).any():
        raise ValueError(f"room {scene.room} leaves no space for cameras above its objects")
    return lo, hi


def _ease(s: np.ndarray) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * s)  # 0 -> 1 with zero speed at both ends


def _bezier(ctrl: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Bézier curve of the control points [n + 1, 3] at s [T]: smooth, inside their convex hull."""
    deg = len(ctrl) - 1
    basis = np.stack([math.comb(deg, i) * s ** i * (1 - s) ** (deg - i) for i in range(deg + 1)], 1)
    return basis @ ctrl


def _focus(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Something to look at: an object's centre, or (no objects, or one time in four) a floor point
    near the room centre 40 cm up."""
    if scene.objects and rng.random() < 0.75:
        return np.array(scene.objects[int(rng.integers(len(scene.objects)))].center)
    hx, hy, _ = scene.room
    return np.array([rng.uniform(-0.3, 0.3) * hx, rng.uniform(-0.3, 0.3) * hy, 0.4])


def _horiz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm((a - b)[..., :2], axis=-1)


def camera_path(kind: str, rng: np.random.Generator, num_frames: int, scene: Scene,
                with_targets: bool = False):
    """Camera-to-world poses ``[T, 4, 4]`` inside :func:`camera_bounds`, each a :func:`look_at` of a
    target >= 0.8 m away horizontally (so the view is never straight down, nor into a wall up close):

    * ``orbit``: around an object or the room centre at a random radius (>= 1 m) and height, looking
      at it, sweeping 60-120 degrees;
    * ``dolly``: along the line to a target (forward or backward, 35-60 % of the way), fixed rotation;
    * ``pan_tilt``: fixed position >= 1 m from the walls, yaw sweeping 40-90 degrees past an object
      (or the room centre), pitch drifting in [-35, -5] degrees (the target: 1 m ahead);
    * ``random``: eye and target on cubic Bézier curves of random control points, the eye at constant
      speed along 1-4 m (start and end >= 1 m apart).

    ``with_targets``: also return the look-at targets ``[T, 3]``."""
    if kind not in PATH_KINDS:
        raise ValueError(f"unknown camera path kind {kind!r}; known: {PATH_KINDS}")
    lo, hi = camera_bounds(scene)
    s = np.linspace(0.0, 1.0, int(num_frames))
    for _ in range(1000):
        if kind == "orbit":
            c = _focus(rng, scene)
            rmax = min(hi[0] - abs(c[0]), hi[1] - abs(c[1]))
            if rmax < 1.0:
                continue
            r, z = rng.uniform(1.0, rmax), rng.uniform(lo[2], hi[2])
            ang = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * rng.uniform(np.pi / 3, 2 * np.pi / 3) * _ease(s)
            eyes = np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang), np.full_like(s, z)], 1)
            targets = np.broadcast_to(c, eyes.shape)
        elif kind == "dolly":
            tgt = _focus(rng, scene)
            far = rng.uniform(lo, hi)
            near = tgt + (far - tgt) * rng.uniform(0.35, 0.6)
            if _horiz(far, tgt) < 1.5 or _horiz(near, tgt) < 0.8 or (near < lo).any() or (near > hi).any():
                continue
            a, b = (far, near) if rng.random() < 0.5 else (near, far)
            eyes = a + (b - a) * _ease(s)[:, None]
            targets = np.broadcast_to(tgt, eyes.shape)
        elif kind == "pan_tilt":  # the sweep passes over something to look at
            inner = np.array([1.0 - CAMERA_MARGIN, 1.0 - CAMERA_MARGIN, 0.0])
            eye = rng.uniform(lo + inner, hi - inner)
            to = _focus(rng, scene) - eye
            sweep = rng.choice([-1, 1]) * rng.uniform(np.radians(40), np.radians(90))
            yaw = math.atan2(to[1], to[0]) + sweep * (_ease(s) - rng.uniform(0.3, 0.7))
            p_mid = math.degrees(math.atan2(to[2], math.hypot(to[0], to[1])))
            # pitch drifts within [-35, -5] degrees (cos 35 deg > 0.8: the target 1 m ahead is 0.8 m out)
            p0, p1 = np.radians(np.clip(p_mid + rng.uniform(-10, 10, size=2), -35, -5))
            pitch = p0 + (p1 - p0) * _ease(s)
            view = np.stack([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)], 1)
            eyes = np.broadcast_to(eye, view.shape)
            targets = eye + 1.0 * view
        else:  # random: control points within 1.25 m (horizontally) of a random centre, constant speed
            centre = rng.uniform(lo, hi)
            ctrl = np.clip(centre + rng.uniform(-1.25, 1.25, size=(4, 3)), lo, hi)
            ctrl[:, 2] = rng.uniform(lo[2], hi[2], size=4)
            if (np.diff(ctrl, axis=0) @ (ctrl[-1] - ctrl[0]) <= 0).any():
                continue  # a leg backwards: the curve could turn back sharply; forward legs never do
            u = np.linspace(0.0, 1.0, 257)
            fine = _bezier(ctrl, u)
            arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
            if not 1.0 <= arc[-1] <= 4.0 or np.linalg.norm(fine[-1] - fine[0]) < 1.0:
                continue
            u = np.interp(s * arc[-1], arc, u)  # equal path length between frames
            eyes = _bezier(ctrl, u)
            targets = _bezier(np.stack([_focus(rng, scene) for _ in range(4)]), u)
        if _horiz(eyes, targets).min() >= 0.8:
            poses = look_at(eyes, targets)
            return (poses, np.array(targets)) if with_targets else poses
    raise RuntimeError(f"no {kind} camera path found for room {scene.room}")
