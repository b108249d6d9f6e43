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
(frames, caption, json fields, extra ``.npy`` sidecars), so an ``action`` variant (an agent
driven by per-step action vectors, written as ``<key>.actions.npy``) is one more function.

Run: ``python -m data_prep.sample_world --out data/sample/general``.
"""

from __future__ import annotations

import argparse
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
    "render_episode",
    "generate",
    "main",
]

GENERATOR_VERSION = 1  # bump when rendering changes, so old directories are not taken as current
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


def render_general(rng: np.random.Generator, spec: WorldSpec) -> Episode:
    """The ``general`` variant: bouncing shapes, caption from content, no actions."""
    objects = _sample_objects(rng, spec)
    bg_names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        background = {"kind": "plain", "colors": [bg_names[int(rng.integers(len(bg_names)))]]}
    else:
        picked = rng.choice(bg_names, size=2, replace=False)
        background = {"kind": "two-tone", "colors": [str(c) for c in picked]}
    frames = _render_objects(objects, background, spec)
    meta = {
        "objects": objects,
        "background": background,
        "dynamics": "constant velocity in pixels/frame, elastic bounce off the frame borders; "
                    "the center stays in [size, extent - size]; objects pass through each other",
    }
    return Episode(frames=frames, caption=_caption(objects, background), meta=meta)


RENDERERS: dict[str, Renderer] = {"general": render_general}


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
        with ShardWriter(out_dir, prefix=SHARD_PREFIX, max_count=shard_max_count,
                         max_bytes=1 << 40) as writer:
            for sample in samples:
                writer.write(sample)
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    write_manifest(out_dir, writer.shards, extra={"source": SOURCE, "params": params})
    logger.info("wrote sample world (%s): %d videos in %d shards to %s", variant, num_videos,
                len(writer.shards), out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line entry: ``python -m data_prep.sample_world --out DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.sample_world",
        description="Generate the procedural sample world: videos of 1-3 colored shapes bouncing "
                    "off the frame borders, with captions and ground-truth dynamics, as "
                    "webdataset shards (VP9 mp4 + json + nframes.npy), DALI index files and "
                    "manifest.json. Re-running with the same arguments is a no-op.",
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
