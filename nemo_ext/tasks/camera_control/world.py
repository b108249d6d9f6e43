"""The camera_control task's sample world: a static textured room with boxes and spheres
(:mod:`nemo_ext.worlds.scene3d`), rendered along a camera path (orbit, dolly, pan/tilt or a smooth
random path, one kind per episode) with exact intrinsics, poses and depth.

Per episode: the frames, ``poses.npy`` ``[T, 16]`` (camera-to-world, OpenCV axes, world metres),
``intrinsics.npy`` ``[6]`` (fx, fy, cx, cy, width, height of the rendered video: 60 degrees
horizontal field of view) and the json's ``scene`` (the whole scene, :meth:`Scene.to_json`) and
``path`` (its kind), so an evaluation re-renders "this scene along that path"
(:func:`render_along`). The caption says nothing about the path (what the camera does is the poses'
job): "a camera moves through a room with <n> coloured objects".
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from nemo_ext.worlds import Episode, World, WorldSpec, register_world
from nemo_ext.worlds.scene3d import PATH_KINDS, Scene, camera_path, default_intrinsics, render_path, sample_scene

FOV_X_DEG = 60.0
SUPERSAMPLE = 2  # anti-aliased colour (depth from the pixel centres)


def intrinsics_row(k: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array([k[0, 0], k[1, 1], k[0, 2], k[1, 2], width, height], dtype=np.float32)


def render_camera_episode(rng: np.random.Generator, spec: WorldSpec) -> Episode:
    scene = sample_scene(rng)
    kind = str(PATH_KINDS[int(rng.integers(len(PATH_KINDS)))])
    poses = camera_path(kind, rng, spec.num_frames, scene)
    k = default_intrinsics(spec.height, spec.width, FOV_X_DEG)
    frames, _ = render_path(scene, poses, k, spec.height, spec.width, supersample=SUPERSAMPLE)
    caption = f"a camera moves through a room with {len(scene.objects)} coloured objects"
    return Episode(frames=frames, caption=caption,
                   meta={"scene": scene.to_json(), "path": kind, "fov_x_deg": FOV_X_DEG},
                   sidecars={"poses.npy": poses.reshape(len(poses), 16).astype(np.float32),
                             "intrinsics.npy": intrinsics_row(k, spec.height, spec.width)})


def render_along(meta: dict, poses: np.ndarray, height: int, width: int, k: Optional[np.ndarray] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """An episode's scene (its json ``meta``) along ``poses`` [T, 4, 4] at height x width: (frames, depth)."""
    scene = Scene.from_json(meta["scene"])
    if k is None:
        k = default_intrinsics(height, width, float(meta.get("fov_x_deg", FOV_X_DEG)))
    return render_path(scene, poses, k, height, width, supersample=SUPERSAMPLE)


CAMERA_WORLD = register_world(World(
    name="camera", render=render_camera_episode, version=1,
    sidecars={"poses.npy": "frames", "intrinsics.npy": "static"},
    description="a textured room with boxes and spheres along orbit / dolly / pan-tilt / random camera paths "
                "(exact poses, intrinsics and depth)",
))
