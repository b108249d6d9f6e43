"""The action_control task's sample world: an agent moved by per-transition action vectors pushes
otherwise static objects, so the actions are the only cause of motion (see :func:`render_action` for
the exact semantics of each action dimension). Sidecars ``<key>.actions.npy`` float32 ``[T-1, 7]`` (one
row per frame-to-frame transition) and ``<key>.states.npy`` float32 ``[T, 9]``.
:func:`render_action_episode` re-renders an episode under any action sequence: the ground-truth
simulator of the action_control evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from nemo_ext.worlds import Episode, World, WorldSpec, register_world
from nemo_ext.worlds.shapes import (PALETTE, SHAPES, background, coverage, draw, join, pixel_coverage,
                                    sample_background, sample_grid, to_uint8)

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
    scene_background = sample_background(rng)
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
    return {"agent": agent, "objects": objects, "background": scene_background}


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
    return pixel_coverage((d <= s) & ~(d < gripper * GRIPPER_HOLE_FRAC * s))


def render_action_frames(scene: dict[str, Any], states: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames uint8 ``[T, H, W, 3]`` of states ``[T, 9]``: objects in list order, the agent on top."""
    ys, xs = sample_grid(height, width)
    bg = background(scene["background"], height, width)
    frames = np.empty((len(states), height, width, 3), dtype=np.uint8)
    for t, row in enumerate(np.asarray(states, dtype=np.float64).tolist()):
        img = bg.copy()
        for i, obj in enumerate(scene["objects"]):
            img = draw(img, coverage(obj["shape"], row[3 + 2 * i], row[4 + 2 * i], obj["size"], ys, xs),
                       PALETTE[obj["color"]])
        img = draw(img, _agent_coverage(row[0], row[1], float(scene["agent"]["size"]), row[2], ys, xs), AGENT_RGB)
        frames[t] = to_uint8(img)
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
        what = f"{robot} pushes {join(pushed)}" + (f" past {join(still)}" if still else "")
    elif np.any(states[:, :2] != states[0, :2]):
        what = f"{robot} moves past {join(still)}"
    else:
        what = f"{robot} stays next to {join(still)}"
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

# version 2: the actions' statistics are in the manifest (extra.sidecars), not in action_stats.json
ACTION_WORLD = register_world(World(name="action", render=render_action, version=2,
                                    sidecars={"actions.npy": "transitions", "states.npy": "frames"},
                                    description="an agent moved by 7-d actions pushes static objects"))
