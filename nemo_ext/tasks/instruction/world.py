"""The instruction task's sample world: several distinct objects in the first frame; the instruction
decides which one moves and where, the ground truth an evaluation checks a model against.

Scene: a plain or two-tone background and :data:`NUM_OBJECTS` objects of distinct colours (shapes may
repeat), static in frame 0, placed apart from each other and from the named object's path (which is
drawn on top). The instruction names one object by its colour (and sometimes its shape)
and a direction; that object slides in a straight line by :data:`MOVE_FRAC` of min(H, W) over the
clip (frame t at t / (T - 1) of the way), the others stay where they are. The instruction comes from a
small grammar (:func:`instruction_variants`: verb x reference x direction phrase, with paraphrases);
the json keeps the command (``target`` colour and shape, ``direction``), every object's start and end
position, and ``instructions`` (paraphrases of the one command; the caption is the first).

Held out for composition: the (colour, direction) pairs in :data:`HELD_OUT_PAIRS` never occur in the
training world; the held-out world (``generate(..., held_out=True)``, the recipes' ``<sample_dir>_val``)
commands one of them in every second episode (json ``held_out_pair: true``), so the evaluation reports
unseen compositions apart. :func:`render_instruction_episode` re-renders an episode's scene under any
command (a colour the scene does not have moves nothing; a moving object stops at the border): the
evaluation's simulator.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import numpy as np

from nemo_ext.worlds import Episode, World, WorldSpec, register_world
from nemo_ext.worlds.shapes import PALETTE, SHAPES, background, coverage, draw, sample_background, sample_grid, to_uint8

NUM_OBJECTS = 3
MOVE_FRAC = 0.4  # how far the named object moves over the clip, as a fraction of min(H, W)
SIZE_FRAC = (0.09, 0.12)  # object half-size range, as a fraction of min(H, W)
# image coordinates: +x right, +y down
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VERBS = ("move", "push", "slide", "shift")
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "left", "leftwards", "towards the left edge"),
    "right": ("to the right", "right", "rightwards", "towards the right edge"),
    "up": ("up", "upwards", "to the top", "towards the top edge"),
    "down": ("down", "downwards", "to the bottom", "towards the bottom edge"),
}
# colour-direction pairs the training world never commands (the held-out world does, every second episode)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "up"), ("blue", "left"), ("green", "down"), ("yellow", "right"))
PARAPHRASES = 3  # instruction variants per episode (json "instructions")


def instruction_variants(rng: np.random.Generator, colour: str, shape: str, direction: str, n: int = PARAPHRASES,
                         shape_is_unique: bool = True) -> list[str]:
    """``n`` distinct paraphrases of "move the <colour> <shape> <direction>"."""
    refs = [f"the {colour} {shape}", f"the {colour} object", f"the {colour} one"]
    if shape_is_unique:
        refs.append(f"the {colour} {shape}")  # the full reference twice as likely
    out: list[str] = []
    for _ in range(50):
        text = (f"{VERBS[int(rng.integers(len(VERBS)))]} {refs[int(rng.integers(len(refs)))]} "
                f"{DIRECTION_PHRASES[direction][int(rng.integers(len(DIRECTION_PHRASES[direction])))]}")
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


_COLOUR = re.compile(r"\b(" + "|".join(sorted(PALETTE, key=len, reverse=True)) + r")\b")


def parse_instruction(text: str) -> Optional[tuple[str, str]]:
    """(colour, direction) of an instruction of this world's grammar; None when it names neither."""
    colour = _COLOUR.search(text.lower())
    direction = next((d for d, phrases in DIRECTION_PHRASES.items()
                      for p in sorted(phrases, key=len, reverse=True) if re.search(rf"\b{re.escape(p)}\s*$", text.lower())),
                     None)
    return (colour.group(1), direction) if colour and direction else None


def _sample_scene(rng: np.random.Generator, spec: WorldSpec, held_out: bool, index_parity: bool) -> dict[str, Any]:
    side = min(spec.height, spec.width)
    move = MOVE_FRAC * side
    scene_background = sample_background(rng)
    colours = [str(c) for c in rng.choice(list(PALETTE), size=NUM_OBJECTS, replace=False)]
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in colours]
    target = int(rng.integers(NUM_OBJECTS))
    if held_out and index_parity:  # an unseen composition where the scene has a colour with a held-out pair
        candidates = [i for i, c in enumerate(colours) if any(c == hc for hc, _ in HELD_OUT_PAIRS)]
        if candidates:
            target = candidates[int(rng.integers(len(candidates)))]
    colour = colours[target]
    held = [d for c, d in HELD_OUT_PAIRS if c == colour]
    if held_out and index_parity and held:  # an unseen composition
        direction = held[int(rng.integers(len(held)))]
    else:
        allowed = [d for d in DIRECTIONS if (colour, d) not in HELD_OUT_PAIRS]
        direction = allowed[int(rng.integers(len(allowed)))]
    dx, dy = DIRECTIONS[direction]
    sizes = [round(float(rng.uniform(*SIZE_FRAC)) * side, 2) for _ in colours]
    spots: dict[int, tuple[float, float]] = {}
    path: list[tuple[float, float]] = []  # the mover's centre along its way (start, 4 steps, end)
    for i in [target] + [k for k in range(NUM_OBJECTS) if k != target]:  # the mover first, with room for its path
        size = sizes[i]
        if i == target:
            lo_x, hi_x = size + max(0.0, -dx * move), spec.width - size - max(0.0, dx * move)
            lo_y, hi_y = size + max(0.0, -dy * move), spec.height - size - max(0.0, dy * move)
        else:
            lo_x, hi_x, lo_y, hi_y = size, spec.width - size, size, spec.height - size
        for _ in range(200):  # apart from the others and from the mover's path where possible
            x, y = round(float(rng.uniform(lo_x, hi_x)), 2), round(float(rng.uniform(lo_y, hi_y)), 2)
            others = [(px, py, sizes[k]) for k, (px, py) in spots.items()] + [(px, py, sizes[target]) for px, py in path]
            if all(math.hypot(x - px, y - py) >= size + ps + 1.0 for px, py, ps in others):
                break
        spots[i] = (x, y)
        if i == target:
            path = [(x + dx * move * f, y + dy * move * f) for f in np.linspace(0.0, 1.0, 6)]
    objects: list[dict[str, Any]] = []
    for i, (c, s) in enumerate(zip(colours, shapes)):
        x, y = spots[i]
        end = [round(x + dx * move, 2), round(y + dy * move, 2)] if i == target else [x, y]
        objects.append({"shape": s, "color": c, "rgb": list(PALETTE[c]), "size": sizes[i], "position": [x, y],
                        "end": end})
    unique_shape = shapes.count(shapes[target]) == 1
    return {"background": scene_background, "objects": objects, "target": target,
            "command": {"color": colour, "shape": shapes[target], "direction": direction},
            "held_out_pair": (colour, direction) in HELD_OUT_PAIRS, "unique_shape": unique_shape,
            "move_px": round(move, 3)}


def positions(scene: dict[str, Any], command: Optional[dict], t: int, num_frames: int, height: int,
              width: int) -> list[tuple[float, float]]:
    """Every object's centre at frame ``t`` under ``command`` ({color, direction}; None: nothing moves);
    a moving object stops at the border (its centre stays in [size, extent - size])."""
    frac = t / max(num_frames - 1, 1)
    out = []
    for obj in scene["objects"]:
        x, y = obj["position"]
        if command is not None and obj["color"] == command["color"]:
            dx, dy = DIRECTIONS[command["direction"]]
            s = obj["size"]
            x = min(max(x + dx * scene["move_px"] * frac, s), width - s)
            y = min(max(y + dy * scene["move_px"] * frac, s), height - s)
        out.append((x, y))
    return out


def render_frames(scene: dict[str, Any], command: Optional[dict], spec: WorldSpec) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] of ``scene`` under ``command`` (objects in list order)."""
    ys, xs = sample_grid(spec.height, spec.width)
    bg = background(scene["background"], spec.height, spec.width)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    moving = command["color"] if command is not None else None
    order = sorted(range(len(scene["objects"])), key=lambda k: scene["objects"][k]["color"] == moving)  # mover on top
    for t in range(spec.num_frames):
        img = bg.copy()
        where = positions(scene, command, t, spec.num_frames, spec.height, spec.width)
        for k in order:
            obj = scene["objects"][k]
            img = draw(img, coverage(obj["shape"], *where[k], obj["size"], ys, xs), PALETTE[obj["color"]])
        frames[t] = to_uint8(img)
    return frames


def render_instruction(rng: np.random.Generator, spec: WorldSpec, held_out: bool = False, index: int = 0) -> Episode:
    scene = _sample_scene(rng, spec, held_out, index % 2 == 1)
    cmd = scene["command"]
    variants = instruction_variants(rng, cmd["color"], cmd["shape"], cmd["direction"],
                                    shape_is_unique=scene["unique_shape"])
    frames = render_frames(scene, cmd, spec)
    meta = {**scene, "instructions": variants,
            "dynamics": f"the named object moves {MOVE_FRAC} x min(H, W) in a straight line over the clip "
                        "(frame t at t / (T - 1) of the way); the others are static"}
    return Episode(frames=frames, caption=variants[0], meta=meta)


def render_instruction_episode(spec: WorldSpec, seed: int, index: int, held_out: bool = False,
                               instruction: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """(frames, scene) of episode ``index``; with ``instruction``, its scene under that instruction's
    command (parsed with this world's grammar; a colour the scene lacks, or an unparsable text, moves
    nothing): the ground truth under any instruction."""
    rng = np.random.default_rng([seed, index])
    scene = _sample_scene(rng, spec, held_out, index % 2 == 1)
    command = scene["command"]
    if instruction is not None:
        parsed = parse_instruction(instruction)
        command = {"color": parsed[0], "direction": parsed[1]} if parsed else None
    return render_frames(scene, command, spec), scene


INSTRUCTION_WORLD = register_world(World(name="instruction", render=render_instruction, version=1, takes_split=True,
                                         description="objects that move as an instruction says"))
