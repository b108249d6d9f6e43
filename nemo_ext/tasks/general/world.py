"""The general task's sample world: 1-3 objects (square / circle / triangle, distinct named colours)
on a plain or two-tone background, moving with constant velocity and bouncing elastically off the
frame borders (objects pass through each other), with a caption that describes them. The exact
parameters are stored in each sample's json, and :func:`object_position` gives the position at any
frame. No sidecars.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from nemo_ext.worlds import Episode, World, WorldSpec, register_world
from nemo_ext.worlds.shapes import (DIRECTIONS, PALETTE, SHAPES, background, coverage, draw, join,
                                    sample_background, sample_grid, to_uint8)


def _bounce(p0: float, v: float, t: float, lo: float, hi: float) -> float:
    """Position at time t of a point moving at v inside [lo, hi] with elastic reflections."""
    length = hi - lo
    if length <= 0:
        return lo
    u = (p0 - lo + v * t) % (2 * length)
    return lo + (u if u <= length else 2 * length - u)


def object_position(obj: dict[str, Any], t: float, height: int, width: int) -> tuple[float, float]:
    """Center (x, y) in pixels of an object (as stored in the json) at frame ``t``.

    The center stays in ``[size, extent - size]`` on each axis; pixel i covers [i, i+1).
    """
    (x0, y0), (vx, vy), s = obj["position"], obj["velocity"], obj["size"]
    return _bounce(x0, vx, t, s, width - s), _bounce(y0, vy, t, s, height - s)


def _render_objects(objects: Sequence[dict[str, Any]], scene_background: dict[str, Any],
                    spec: WorldSpec) -> np.ndarray:
    """Frames [F, H, W, 3] uint8; objects are drawn in list order (later ones on top)."""
    ys, xs = sample_grid(spec.height, spec.width)
    bg = background(scene_background, spec.height, spec.width)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        img = bg.copy()
        for obj in objects:
            cx, cy = object_position(obj, t, spec.height, spec.width)
            img = draw(img, coverage(obj["shape"], cx, cy, obj["size"], ys, xs), PALETTE[obj["color"]])
        frames[t] = to_uint8(img)
    return frames


def _caption(objects: Sequence[dict[str, Any]], scene_background: dict[str, Any]) -> str:
    things = join([f"a {o['color']} {o['shape']} moving {o['direction']}" for o in objects])
    return f"{things} on a {' and '.join(scene_background['colors'])} background"


def _sample_objects(rng: np.random.Generator, spec: WorldSpec) -> list[dict[str, Any]]:
    """1-3 objects with distinct colors; positions and velocities rounded to what is stored."""
    side = min(spec.height, spec.width)
    n = int(rng.integers(1, 4))
    colors = rng.choice(list(PALETTE), size=n, replace=False)
    objects = []
    for color in colors:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = round(float(rng.uniform(0.08, 0.16)) * side, 2)
        x = round(float(rng.uniform(size, spec.width - size)), 2)
        y = round(float(rng.uniform(size, spec.height - size)), 2)
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        ux, uy = DIRECTIONS[direction]
        speed = float(rng.uniform(0.02, 0.08)) * side  # pixels per frame
        norm = math.hypot(ux, uy)
        objects.append({
            "shape": shape, "color": str(color), "rgb": list(PALETTE[str(color)]), "size": size,
            "position": [x, y], "velocity": [round(speed * ux / norm, 3), round(speed * uy / norm, 3)],
            "direction": direction,
        })
    return objects


def render_general(rng: np.random.Generator, spec: WorldSpec) -> Episode:
    """The ``general`` variant: bouncing shapes, caption from content, no actions."""
    objects = _sample_objects(rng, spec)
    scene_background = sample_background(rng)
    frames = _render_objects(objects, scene_background, spec)
    meta = {
        "objects": objects,
        "background": scene_background,
        "dynamics": "constant velocity in pixels/frame, elastic bounce off the frame borders; "
                    "the center stays in [size, extent - size]; objects pass through each other",
    }
    return Episode(frames=frames, caption=_caption(objects, scene_background), meta=meta)


# the general world's manifests predate per-world versions (version None), and its json records no
# (seed, index): nothing re-renders it
GENERAL_WORLD = register_world(World(name="general", render=render_general, version=None, records_origin=False,
                                     description="bouncing shapes with captions that describe them"))
