"""The embedded procedural "sample world": a tiny video dataset with known dynamics.

It exists so the default training run needs no download, and so evaluation can check a model
against ground truth: every video shows 1-3 objects (square / circle / triangle, distinct named
colors) on a plain or two-tone background, moving with constant velocity and bouncing
elastically off the frame borders (objects pass through each other). The exact parameters are
stored in each sample's json, and :func:`object_position` gives the position at any frame.

Output (``generate``): webdataset shards with ``<key>.mp4`` (VP9, readable by DALI's CPU
decoder), ``<key>.json`` and ``<key>.nframes.npy``, DALI index files and ``manifest.json``.
The bytes depend only on the arguments: each video's RNG is seeded by ``(seed, video index)``,
so any number of worker processes produces identical shards.

Variants are renderers registered in :data:`RENDERERS`; a renderer returns an :class:`Episode`
(frames, caption, json fields, extra ``.npy`` sidecars):

* ``general``: the bouncing shapes above; no sidecars.
* ``action``: an agent moved by a per-transition action vector pushes objects that are otherwise
  static, so the action is the only cause of motion (see :func:`render_action` for the exact
  semantics of each action dimension). Sidecars ``<key>.actions.npy`` float32 ``[T-1, 7]`` (one
  row per frame-to-frame transition) and ``<key>.states.npy`` float32 ``[T, 9]``.
  :func:`render_action_episode` re-renders an episode under any action sequence: the ground-truth
  simulator of the action_control evaluation.

Run: ``python -m data_prep.sample_world --out data/sample/general [--variant action]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nemo_ext.data.shards import ShardError, ShardWriter, read_manifest, write_manifest
from nemo_ext.data.video import encode_video, probe_video

logger = logging.getLogger(__name__)

__all__ = [
    "WorldSpec",
    "Episode",
    "RENDERERS",
    "PALETTE",
    "BACKGROUNDS",
    "SHAPES",
    "DIRECTIONS",
    "object_position",
    "render_general",
    "ACTION_DIM",
    "ACTION_NAMES",
    "STATE_NAMES",
    "action_scene",
    "simulate_actions",
    "render_action_frames",
    "render_action_episode",
    "action_scale_px",
    "AGENT_RGB",
    "VARIANT_VERSIONS",
    "render_action",
    "render_episode",
    "generate",
    "main",
]

GENERATOR_VERSION = 1  # bump when rendering changes, so old directories are not taken as current
# Per-variant versions for variants other than "general" (recorded in the manifest params as
# "variant_version"): bump one when that variant's rendering changes, leaving the others valid.
VARIANT_VERSIONS: dict[str, int] = {"action": 1}
SHARD_PREFIX = "shard"
SOURCE = "sample_world"

# Object colors (saturated) and background colors (muted) are disjoint, so objects stay visible.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "dark gray": (50, 50, 50),
    "brown": (105, 75, 50),
    "navy": (25, 30, 75),
    "olive": (85, 90, 40),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# image coordinates: +x is right, +y is down, so "up" is -y
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "up-right": (1, -1), "up": (0, -1), "up-left": (-1, -1),
    "left": (-1, 0), "down-left": (-1, 1), "down": (0, 1), "down-right": (1, 1),
}
_SUPERSAMPLE = 4  # anti-aliasing: 4x4 coverage samples per pixel


@dataclass(frozen=True)
class WorldSpec:
    """What every episode of a dataset shares."""

    num_frames: int
    height: int
    width: int
    fps: float


@dataclass
class Episode:
    """A rendered video plus what gets stored next to it.

    ``meta`` is merged into the sample's json; ``sidecars`` maps an extension (``actions.npy``)
    to an array written as ``<key>.<ext>``.
    """

    frames: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    meta: dict[str, Any]
    sidecars: dict[str, np.ndarray] = field(default_factory=dict)


Renderer = Callable[[np.random.Generator, WorldSpec], Episode]


# --------------------------------------------------------------------------------------------
# Dynamics and rendering
# --------------------------------------------------------------------------------------------


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


def _sample_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ss = _SUPERSAMPLE
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    return ys[:, None], xs[None, :]


def _coverage(shape: str, cx: float, cy: float, s: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by the shape (float [H, W]), from supersampled tests."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= s * s
    elif shape == "square":
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "triangle":  # apex up: (0,-s), base corners (-s,s) and (s,s)
        inside = (dy <= s) & (2 * dx - dy <= s) & (-2 * dx - dy <= s)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    ss = _SUPERSAMPLE
    h, w = inside.shape[0] // ss, inside.shape[1] // ss
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _background(bg: dict[str, Any], height: int, width: int) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.float64)
    colors = [np.array(BACKGROUNDS[c], dtype=np.float64) for c in bg["colors"]]
    img[:] = colors[0]
    if bg["kind"] == "two-tone":  # top half / bottom half
        img[height // 2:] = colors[1]
    return img


def _render_objects(objects: Sequence[dict[str, Any]], background: dict[str, Any],
                    spec: WorldSpec) -> np.ndarray:
    """Frames [F, H, W, 3] uint8; objects are drawn in list order (later ones on top)."""
    ys, xs = _sample_grid(spec.height, spec.width)
    bg = _background(background, spec.height, spec.width)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        img = bg.copy()
        for obj in objects:
            cx, cy = object_position(obj, t, spec.height, spec.width)
            alpha = _coverage(obj["shape"], cx, cy, obj["size"], ys, xs)[..., None]
            img = img * (1 - alpha) + np.array(PALETTE[obj["color"]], dtype=np.float64) * alpha
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(objects: Sequence[dict[str, Any]], background: dict[str, Any]) -> str:
    things = _join([f"a {o['color']} {o['shape']} moving {o['direction']}" for o in objects])
    return f"{things} on a {' and '.join(background['colors'])} background"


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


def _sample_background(rng: np.random.Generator) -> dict[str, Any]:
    """A plain or two-tone (top/bottom) background; the draws ``render_general`` always made."""
    bg_names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        return {"kind": "plain", "colors": [bg_names[int(rng.integers(len(bg_names)))]]}
    picked = rng.choice(bg_names, size=2, replace=False)
    return {"kind": "two-tone", "colors": [str(c) for c in picked]}


def render_general(rng: np.random.Generator, spec: WorldSpec) -> Episode:
    """The ``general`` variant: bouncing shapes, caption from content, no actions."""
    objects = _sample_objects(rng, spec)
    background = _sample_background(rng)
    frames = _render_objects(objects, background, spec)
    meta = {
        "objects": objects,
        "background": background,
        "dynamics": "constant velocity in pixels/frame, elastic bounce off the frame borders; "
                    "the center stays in [size, extent - size]; objects pass through each other",
    }
    return Episode(frames=frames, caption=_caption(objects, background), meta=meta)


# --------------------------------------------------------------------------------------------
# The action variant: an agent moved by action vectors pushes otherwise static objects
# --------------------------------------------------------------------------------------------

ACTION_DIM = 7
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
MAX_OBJECTS = 3
# states.npy columns: pixel centers (+x right, +y down) and the gripper opening; NaN = no such object
STATE_NAMES: tuple[str, ...] = ("agent_x", "agent_y", "gripper") + tuple(
    f"object{i}_{c}" for i in range(MAX_OBJECTS) for c in "xy")
AGENT_SHAPE = "diamond"
AGENT_COLOR = "magenta"
AGENT_RGB: tuple[int, int, int] = (235, 50, 235)  # in neither PALETTE nor BACKGROUNDS
ACTION_SPEED_FRAC = 0.06  # dx = 1 moves the agent by this fraction of min(H, W) pixels per frame
AGENT_SIZE_FRAC = 0.12  # agent half-diagonal (its "size"), as a fraction of min(H, W)
GRIPPER_HOLE_FRAC = 0.5  # half-diagonal of the agent's hole at gripper = 1, as a fraction of its size
_ACTION_DYNAMICS = (
    "per transition t -> t+1 (action row t): the agent's center moves by (dx, dy) * "
    "action_scale_px pixels and is clipped to [size, extent - size]; gripper(t+1) = "
    "clip(action[6], 0, 1), drawn as a hole of half-diagonal gripper * 0.5 * size; dims 2-5 have "
    "no effect; an object whose disc (radius size) overlaps the agent's disc (radius size) after "
    "a nonzero agent move is pushed along that move until the discs touch, then clipped to "
    "[size, extent - size]; objects move only when pushed and pass through each other")


def action_scale_px(height: int, width: int) -> float:
    """Pixels per frame that one unit of action dims 0-1 (dx, dy) moves the agent."""
    return ACTION_SPEED_FRAC * min(height, width)


def _sample_action_scene(rng: np.random.Generator, spec: WorldSpec) -> dict[str, Any]:
    """Background, agent and 1-3 objects (start positions apart from each other), as stored in json."""
    side = min(spec.height, spec.width)
    background = _sample_background(rng)
    a_size = round(AGENT_SIZE_FRAC * side, 2)
    agent = {
        "shape": AGENT_SHAPE, "color": AGENT_COLOR, "rgb": list(AGENT_RGB), "size": a_size,
        "position": [round(float(rng.uniform(a_size, spec.width - a_size)), 2),
                     round(float(rng.uniform(a_size, spec.height - a_size)), 2)],
        "gripper": float(rng.integers(0, 2)),
    }
    placed = [(agent["position"][0], agent["position"][1], a_size)]
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objects = []
    for color in rng.choice(list(PALETTE), size=n, replace=False):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = round(float(rng.uniform(0.08, 0.13)) * side, 2)
        for _ in range(100):  # rejection sampling; on tiny frames the last try is kept
            x = round(float(rng.uniform(size, spec.width - size)), 2)
            y = round(float(rng.uniform(size, spec.height - size)), 2)
            if all(math.hypot(x - px, y - py) >= size + ps + 1.0 for px, py, ps in placed):
                break
        placed.append((x, y, size))
        objects.append({"shape": shape, "color": str(color), "rgb": list(PALETTE[str(color)]),
                        "size": size, "position": [x, y]})
    return {"agent": agent, "objects": objects, "background": background}


def action_scene(spec: WorldSpec, seed: int, index: int) -> dict[str, Any]:
    """The initial state of action episode ``index`` (the json's ``agent``/``objects``/``background``)."""
    return _sample_action_scene(np.random.default_rng([seed, index]), spec)


class _ActionDynamics:
    """The action world's state and its transition function (pure float64 arithmetic)."""

    def __init__(self, scene: dict[str, Any], height: int, width: int) -> None:
        agent, objects = scene["agent"], scene["objects"]
        if len(objects) > MAX_OBJECTS:
            raise ValueError(f"the action world holds at most {MAX_OBJECTS} objects, got {len(objects)}")
        self.height, self.width = height, width
        self.scale = action_scale_px(height, width)
        self.size = float(agent["size"])
        self.x, self.y = (float(v) for v in agent["position"])
        self.gripper = min(max(float(agent["gripper"]), 0.0), 1.0)
        self.sizes = [float(o["size"]) for o in objects]
        self.objects = [[float(o["position"][0]), float(o["position"][1])] for o in objects]

    def state(self) -> list[float]:
        row = [self.x, self.y, self.gripper] + [math.nan] * (2 * MAX_OBJECTS)
        for i, (ox, oy) in enumerate(self.objects):
            row[3 + 2 * i: 5 + 2 * i] = [ox, oy]
        return row

    def step(self, action: Sequence[float]) -> None:
        s, w, h = self.size, self.width, self.height
        nx = min(max(self.x + action[0] * self.scale, s), w - s)
        ny = min(max(self.y + action[1] * self.scale, s), h - s)
        dx, dy = nx - self.x, ny - self.y
        dist = math.hypot(dx, dy)
        if dist > 0:
            ux, uy = dx / dist, dy / dist
            for i, (ox, oy) in enumerate(self.objects):
                so = self.sizes[i]
                wx, wy = ox - nx, oy - ny
                c = wx * wx + wy * wy - (s + so) ** 2
                if c < 0:  # overlap: slide the object along the move until the discs touch
                    b = wx * ux + wy * uy
                    lam = -b + math.sqrt(b * b - c)
                    self.objects[i] = [min(max(ox + lam * ux, so), w - so),
                                       min(max(oy + lam * uy, so), h - so)]
        self.x, self.y = nx, ny
        self.gripper = min(max(float(action[6]), 0.0), 1.0)


def _as_actions(actions: Any) -> np.ndarray:
    arr = np.asarray(actions, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != ACTION_DIM:
        raise ValueError(f"actions must have shape [num_transitions, {ACTION_DIM}], got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("actions must be finite")
    return arr


def simulate_actions(scene: dict[str, Any], actions: Any, height: int, width: int) -> np.ndarray:
    """States float64 ``[N+1, 9]`` (columns :data:`STATE_NAMES`) after N actions ``[N, 7]``.

    ``scene`` is :func:`action_scene`'s dict, or an action sample's json (it reads ``agent`` and
    ``objects``). Actions are taken as float32 (what ``actions.npy`` holds).
    """
    acts = _as_actions(actions).astype(np.float64).tolist()
    world = _ActionDynamics(scene, height, width)
    states = [world.state()]
    for a in acts:
        world.step(a)
        states.append(world.state())
    return np.array(states, dtype=np.float64).reshape(len(acts) + 1, len(STATE_NAMES))


def _agent_coverage(cx: float, cy: float, s: float, gripper: float, ys: np.ndarray,
                    xs: np.ndarray) -> np.ndarray:
    """A diamond of half-diagonal s with a diamond hole of half-diagonal gripper * 0.5 * s."""
    d = np.abs(xs - cx) + np.abs(ys - cy)
    inside = (d <= s) & ~(d < gripper * GRIPPER_HOLE_FRAC * s)
    ss = _SUPERSAMPLE
    h, w = inside.shape[0] // ss, inside.shape[1] // ss
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def render_action_frames(scene: dict[str, Any], states: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames uint8 ``[T, H, W, 3]`` of states ``[T, 9]``: objects in list order, the agent on top."""
    ys, xs = _sample_grid(height, width)
    bg = _background(scene["background"], height, width)
    agent_rgb = np.array(AGENT_RGB, dtype=np.float64)
    frames = np.empty((len(states), height, width, 3), dtype=np.uint8)
    for t, row in enumerate(np.asarray(states, dtype=np.float64).tolist()):
        img = bg.copy()
        for i, obj in enumerate(scene["objects"]):
            alpha = _coverage(obj["shape"], row[3 + 2 * i], row[4 + 2 * i], obj["size"], ys, xs)[..., None]
            img = img * (1 - alpha) + np.array(PALETTE[obj["color"]], dtype=np.float64) * alpha
        alpha = _agent_coverage(row[0], row[1], float(scene["agent"]["size"]), row[2], ys, xs)[..., None]
        img = img * (1 - alpha) + agent_rgb * alpha
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def _policy_actions(rng: np.random.Generator, scene: dict[str, Any], spec: WorldSpec) -> np.ndarray:
    """The generated episodes' actions float32 ``[T-1, 7]`` (see :func:`render_action`)."""
    world = _ActionDynamics(scene, spec.height, spec.width)
    s, scale = world.size, world.scale
    bounds = ((s, spec.width - s), (s, spec.height - s))
    acts = np.zeros((spec.num_frames - 1, ACTION_DIM), dtype=np.float32)
    nuisance = rng.uniform(-0.5, 0.5, size=4)
    grip = float(scene["agent"]["gripper"])
    vel, left = [0.0, 0.0], 0
    for t in range(len(acts)):
        if left == 0:  # a new segment
            left = int(rng.integers(3, 9))
            r, speed = float(rng.random()), float(rng.uniform(0.4, 1.0))
            if r < 0.1:
                heading = (0.0, 0.0)
            elif r < 0.7:  # toward an object, to push it
                ox, oy = world.objects[int(rng.integers(len(world.objects)))]
                norm = math.hypot(ox - world.x, oy - world.y)
                heading = ((ox - world.x) / norm, (oy - world.y) / norm) if norm > 0 else (1.0, 0.0)
            else:
                angle = float(rng.uniform(0.0, 2 * math.pi))
                heading = (math.cos(angle), math.sin(angle))
            vel = [float(np.float32(speed * heading[0])), float(np.float32(speed * heading[1]))]
        left -= 1
        for axis, p in enumerate((world.x, world.y)):  # reflect off the borders: never clipped
            lo, hi = bounds[axis]
            if not lo <= p + vel[axis] * scale <= hi:
                vel[axis] = -vel[axis]
            if not lo <= p + vel[axis] * scale <= hi:
                vel[axis] = 0.0
        if rng.random() < 0.1:
            grip = 1.0 - grip
        nuisance = np.clip(0.8 * nuisance + rng.normal(0.0, 0.2, size=4), -1.0, 1.0)
        acts[t] = [vel[0], vel[1], *nuisance, grip]
        world.step(acts[t].astype(np.float64).tolist())
    return acts


def render_action_episode(spec: WorldSpec, seed: int, index: int, actions: Any = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth simulator: ``(frames uint8 [N+1, H, W, 3], actions float32 [N, 7], states
    float32 [N+1, 9])`` of action episode ``index`` of a dataset made with ``seed``.

    With ``actions=None`` it is the stored episode (N = ``spec.num_frames - 1``; the same frames,
    ``actions.npy`` and ``states.npy`` as ``generate`` writes, before video encoding). Given
    actions ``[N, 7]`` (any N >= 0, taken as float32) it renders the same initial scene driven by
    them instead: frames are an exact function of ``(spec, seed, index, actions)``. A sample's
    json holds its ``seed`` and ``index``. To branch off frame ``k`` of a stored episode exactly,
    pass ``concatenate([stored[:k], new_actions])`` and keep ``frames[k:]``.
    """
    rng = np.random.default_rng([seed, index])
    scene = _sample_action_scene(rng, spec)
    acts = _policy_actions(rng, scene, spec) if actions is None else _as_actions(actions)
    states = simulate_actions(scene, acts, spec.height, spec.width)
    frames = render_action_frames(scene, states, spec.height, spec.width)
    return frames, acts.copy(), states.astype(np.float32)


def _action_caption(scene: dict[str, Any], states: np.ndarray) -> str:
    names = [f"a {o['color']} {o['shape']}" for o in scene["objects"]]
    moved = [bool(np.any(states[:, 3 + 2 * i: 5 + 2 * i] != states[0, 3 + 2 * i: 5 + 2 * i]))
             for i in range(len(names))]
    pushed = [n for n, m in zip(names, moved) if m]
    still = [n for n, m in zip(names, moved) if not m]
    robot = f"a {AGENT_COLOR} robot"
    if pushed:
        what = f"{robot} pushes {_join(pushed)}" + (f" past {_join(still)}" if still else "")
    elif np.any(states[:, :2] != states[0, :2]):
        what = f"{robot} moves past {_join(still)}"
    else:
        what = f"{robot} stays next to {_join(still)}"
    return f"{what} on a {' and '.join(scene['background']['colors'])} background"


def render_action(rng: np.random.Generator, spec: WorldSpec) -> Episode:
    """The ``action`` variant: an agent driven by per-transition actions pushes static objects.

    The scene: a plain or two-tone background, 1-3 objects (square / circle / triangle, distinct
    PALETTE colors) and the agent, a magenta diamond (half-diagonal ``size`` = 0.12 min(H, W))
    drawn on top. Objects are static unless the agent pushes them, so the actions are the only
    cause of motion. Action row ``t`` (float32, 7 dims) takes frame ``t`` to frame ``t + 1``:

    * 0 ``dx``: agent velocity along +x (right), in units of ``action_scale_px`` = 0.06 min(H, W)
      pixels per frame (json ``action_scale_px``): the agent's center moves by
      ``dx * action_scale_px`` pixels, then is clipped to ``[size, W - size]`` (it stops at the
      border). Generated episodes keep ``|dx| <= 1`` and never reach the clip.
    * 1 ``dy``: the same along +y (down, image coordinates), clipped to ``[size, H - size]``.
    * 2-5 ``dz``, ``droll``, ``dpitch``, ``dyaw``: nuisance dims (what a top-down camera does not
      see of an end-effector delta): **no effect** on frames or states. Generated as independent
      smooth noise: AR(1) ``n <- clip(0.8 n + N(0, 0.2^2), -1, 1)``, started uniform in
      [-0.5, 0.5]. A model should learn to ignore them.
    * 6 ``gripper``: absolute gripper command, 1 = open, 0 = closed (clipped to [0, 1]): the
      gripper opening of frame ``t + 1`` is ``clip(a[6], 0, 1)``, drawn as a diamond hole in the
      agent of half-diagonal ``gripper * 0.5 * size`` through which what lies below shows
      (closed = filled diamond, open = hollow). It does not affect pushing. Generated episodes use
      0 or 1 (the initial opening in json ``agent.gripper``), toggling with probability 0.1 per
      transition.

    Pushing: after a nonzero agent move, every object whose disc (radius = its ``size``) overlaps
    the agent's disc (radius = the agent's ``size``) is moved along the agent's move direction
    until the discs touch, then clipped to ``[size, extent - size]``. Objects never move
    otherwise and do not collide with each other. Generated actions come from piecewise-constant
    velocity segments of 3-8 transitions (10% standing still, 60% heading to a random object's
    current center, 30% a uniform random heading; speed uniform in [0.4, 1]) whose heading
    reflects off the borders; all randomness comes from ``rng``.

    Sidecars: ``actions.npy`` float32 ``[T-1, 7]`` (:data:`ACTION_NAMES`), ``states.npy`` float32
    ``[T, 9]`` (:data:`STATE_NAMES`: agent x, y, gripper, then x, y of objects 0-2 in pixels,
    NaN where the episode has fewer objects). The json holds the initial scene (``agent``,
    ``objects``, ``background``), ``pushed`` (colors of the objects that moved) and the action
    layout; :func:`render_action_episode` re-renders an episode under any actions.
    """
    scene = _sample_action_scene(rng, spec)
    actions = _policy_actions(rng, scene, spec)
    states = simulate_actions(scene, actions, spec.height, spec.width)
    frames = render_action_frames(scene, states, spec.height, spec.width)
    pushed = [o["color"] for i, o in enumerate(scene["objects"])
              if np.any(states[:, 3 + 2 * i: 5 + 2 * i] != states[0, 3 + 2 * i: 5 + 2 * i])]
    meta = {
        **scene,
        "pushed": pushed,
        "action_dim": ACTION_DIM,
        "action_names": list(ACTION_NAMES),
        "action_scale_px": action_scale_px(spec.height, spec.width),
        "state_names": list(STATE_NAMES),
        "dynamics": _ACTION_DYNAMICS,
    }
    return Episode(frames=frames, caption=_action_caption(scene, states), meta=meta,
                   sidecars={"actions.npy": actions, "states.npy": states.astype(np.float32)})


RENDERERS: dict[str, Renderer] = {"general": render_general, "action": render_action}


def render_episode(variant: str, seed: int, index: int, spec: WorldSpec) -> Episode:
    """Episode ``index`` of a variant; depends only on (variant, seed, index, spec)."""
    if variant not in RENDERERS:
        raise ValueError(f"unknown sample world variant {variant!r}; known: {', '.join(RENDERERS)}")
    rng = np.random.default_rng([seed, index])
    return RENDERERS[variant](rng, spec)


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------


def _key(index: int) -> str:
    return f"sample_{index:06d}"


def _make_sample(task: tuple[str, int, int, WorldSpec]) -> dict[str, Any]:
    """Render, encode and validate one video; returns a ShardWriter sample (runs in workers)."""
    variant, seed, index, spec = task
    ep = render_episode(variant, seed, index, spec)
    key = _key(index)
    mp4 = encode_video(ep.frames, spec.fps, codec="vp9")
    info = probe_video(mp4)
    if (info.num_frames, info.height, info.width) != (spec.num_frames, spec.height, spec.width):
        raise ValueError(f"sample world video {key}: encoded video decodes to {info.num_frames} "
                         f"frames of {info.width}x{info.height}, expected {spec.num_frames} of "
                         f"{spec.width}x{spec.height}")
    meta = {
        "caption": ep.caption, "fps": spec.fps, "num_frames": spec.num_frames,
        "height": spec.height, "width": spec.width, "codec": info.codec,
        "source": SOURCE, "variant": variant, **ep.meta,
    }
    if variant != "general":  # where the episode comes from, for re-rendering (general's json is frozen)
        meta.update(seed=seed, index=index)
    sample: dict[str, Any] = {"__key__": key, "mp4": mp4, "json": meta,
                              "nframes.npy": np.array([spec.num_frames], dtype=np.int32)}
    for ext, arr in ep.sidecars.items():
        sample[ext] = arr
    return sample


def _validate(variant: str, num_videos: int, num_frames: int, height: int, width: int,
              fps: float, shard_max_count: int, workers: int) -> None:
    if variant not in RENDERERS:
        raise ValueError(f"unknown sample world variant {variant!r}; known: {', '.join(RENDERERS)}")
    if num_frames < 1 or (num_frames - 1) % 8:
        raise ValueError(f"num_frames must be 1 + 8k (the tokenizer compresses time 8x), got {num_frames}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v}")
    if num_videos < 1 or shard_max_count < 1 or workers < 1:
        raise ValueError(f"num_videos ({num_videos}), shard_max_count ({shard_max_count}) and "
                         f"workers ({workers}) must be >= 1")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


def _existing_is_complete(out_dir: Path, params: dict[str, Any]) -> bool:
    """True if ``out_dir`` already holds this exact sample world; raise if it holds another."""
    try:
        manifest = read_manifest(out_dir)
    except ShardError:
        if (out_dir / "manifest.json").exists():
            raise
        return False
    recorded = manifest.get("extra", {}).get("params")
    if not isinstance(recorded, dict) or manifest.get("extra", {}).get("source") != SOURCE:
        raise ValueError(f"{out_dir} holds a dataset that is not a sample world (its manifest has "
                         "no sample world parameters); pick another directory or delete it")
    differing = sorted(k for k in set(params) | set(recorded) if params.get(k) != recorded.get(k))
    if differing:
        detail = ", ".join(f"{k}: has {recorded.get(k)!r}, asked {params.get(k)!r}" for k in differing)
        raise ValueError(f"{out_dir} holds a sample world made with other parameters ({detail}); "
                         "pick another directory or delete it")
    missing = [s["path"] for s in manifest["shards"]
               if not (out_dir / s["path"]).is_file()
               or (out_dir / s["path"]).stat().st_size != s["num_bytes"]]
    if missing:
        logger.warning("sample world in %s: shards missing or changed (%s); regenerating",
                       out_dir, ", ".join(missing))
        return False
    return True


_OWN_FILE = re.compile(rf"^{SHARD_PREFIX}-\d{{6}}\.(tar|idx)(\.partial)?$")


def _remove_stale_shards(out_dir: Path) -> None:
    """Delete shards of an interrupted run (no manifest), so they cannot mix with the new ones."""
    stale = sorted(p for p in out_dir.iterdir() if _OWN_FILE.match(p.name))
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d shard files of an unfinished run in %s", len(stale), out_dir)


def generate(out_dir: str | Path, variant: str = "general", num_videos: int = 64,
             num_frames: int = 17, height: int = 64, width: int = 64, fps: float = 8,
             seed: int = 0, shard_max_count: int = 32, workers: int = 1,
             progress: bool = True) -> Path:
    """Write a sample world dataset into ``out_dir`` and return ``out_dir``.

    Idempotent: if ``out_dir`` already holds a complete sample world with the same parameters it
    returns at once; different parameters raise ``ValueError`` (it never overwrites data made
    with other settings). ``workers`` only changes speed, never the bytes written.
    """
    _validate(variant, num_videos, num_frames, height, width, fps, shard_max_count, workers)
    out_dir = Path(out_dir)
    spec = WorldSpec(num_frames=num_frames, height=height, width=width, fps=float(fps))
    params = {"variant": variant, "num_videos": num_videos, "seed": seed,
              "shard_max_count": shard_max_count, "generator_version": GENERATOR_VERSION,
              **asdict(spec)}
    if variant in VARIANT_VERSIONS:
        params["variant_version"] = VARIANT_VERSIONS[variant]
    if out_dir.is_dir():
        if _existing_is_complete(out_dir, params):
            logger.info("sample world in %s is already complete with these parameters; "
                        "nothing to do", out_dir)
            return out_dir
        _remove_stale_shards(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks = [(variant, seed, i, spec) for i in range(num_videos)]
    bar = tqdm(total=num_videos, disable=not progress, desc=f"sample world ({variant})", unit="video")
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        samples = pool.imap(_make_sample, tasks, chunksize=1) if pool else map(_make_sample, tasks)
        actions = []  # per-transition actions of the variants that have them, for action_stats.json
        with ShardWriter(out_dir, prefix=SHARD_PREFIX, max_count=shard_max_count,
                         max_bytes=1 << 40) as writer:
            for sample in samples:
                writer.write(sample)
                if "actions.npy" in sample:
                    actions.append(_as_array(sample["actions.npy"]))
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if actions:
        _write_action_stats(out_dir, np.concatenate(actions))
    write_manifest(out_dir, writer.shards, extra={"source": SOURCE, "params": params})
    logger.info("wrote sample world (%s): %d videos in %d shards to %s", variant, num_videos,
                len(writer.shards), out_dir)
    return out_dir


def _as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import io

    return np.load(io.BytesIO(value), allow_pickle=False)


def _write_action_stats(out_dir: Path, actions: np.ndarray) -> None:
    """``action_stats.json`` beside the shards, in data_prep's format (what the action_control
    task normalizes with): per-dimension count/mean/std/min/max over every transition."""
    a = actions.astype(np.float64)
    stats = {"action_dim": int(a.shape[1]), "count": int(a.shape[0]), "mean": a.mean(0).tolist(),
             "std": a.std(0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist(),
             "source": SOURCE, "convention": "T-1 actions per T frames (row t: frame t -> t+1)"}
    (out_dir / "action_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line entry: ``python -m data_prep.sample_world --out DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.sample_world",
        description="Generate the procedural sample world: videos of 1-3 colored shapes bouncing "
                    "off the frame borders (variant general), or pushed by an agent that "
                    "per-transition action vectors move (variant action: + actions.npy, "
                    "states.npy), with captions and ground-truth dynamics, as webdataset shards "
                    "(VP9 mp4 + json + nframes.npy), DALI index files and manifest.json. "
                    "Re-running with the same arguments is a no-op.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory for the shards")
    parser.add_argument("--variant", default="general", choices=sorted(RENDERERS),
                        help="which world to render")
    parser.add_argument("--num-videos", type=int, default=64, help="number of videos")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per video, 1 + 8k")
    parser.add_argument("--height", type=int, default=64, help="frame height, a multiple of 16")
    parser.add_argument("--width", type=int, default=64, help="frame width, a multiple of 16")
    parser.add_argument("--fps", type=float, default=8, help="frames per second stored in the video")
    parser.add_argument("--seed", type=int, default=0, help="seed; video i uses (seed, i)")
    parser.add_argument("--shard-max-count", type=int, default=32, help="videos per shard")
    parser.add_argument("--workers", type=int, default=1,
                        help="render/encode processes (does not change the output)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return generate(args.out, variant=args.variant, num_videos=args.num_videos,
                    num_frames=args.num_frames, height=args.height, width=args.width,
                    fps=args.fps, seed=args.seed, shard_max_count=args.shard_max_count,
                    workers=args.workers, progress=not args.no_progress)


if __name__ == "__main__":
    main()
