"""Procedural sample worlds: tiny video datasets with known ground truth, generated on first use.

They exist so a recipe's default run needs no download, and so an evaluation can check a model
against the truth (the exact scene in each sample's json; a task's world may also re-render an
episode under other conditioning: its simulator). Each task's world lives in its folder
(``nemo_ext/tasks/<task>/world.py``) and registers a :class:`World` under the name that
``data.sample_variant`` selects; this module is the framework: rendering by ``(seed, index)``,
encoding, sharding, the manifest (with every signal's statistics, :mod:`nemo_ext.data.signals`) and
resumability.

Output (:func:`generate`): webdataset shards with ``<key>.mp4`` (VP9, readable by DALI's CPU decoder),
``<key>.json``, ``<key>.nframes.npy`` and the world's ``<key>.<signal>.npy`` sidecars, DALI index files
and ``manifest.json``. The bytes depend only on the arguments: each video's RNG is seeded by
``(seed, video index)``, so any number of worker processes produces identical shards.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from nemo_ext.data.shards import ShardError, ShardWriter, read_manifest, write_manifest
from nemo_ext.data.signals import manifest_stats
from nemo_ext.data.video import encode_video, probe_video
from nemo_ext.registry import Registry, import_task_packages

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the framework's output changes, so old directories are not taken as current
SHARD_PREFIX = "shard"
SOURCE = "sample_world"


@dataclass(frozen=True)
class WorldSpec:
    """What every episode of a dataset shares."""

    num_frames: int
    height: int
    width: int
    fps: float


@dataclass
class Episode:
    """A rendered video plus what gets stored next to it: ``meta`` is merged into the sample's json,
    ``sidecars`` maps an extension (``actions.npy``) to an array written as ``<key>.<ext>``."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    meta: dict[str, Any]
    sidecars: dict[str, np.ndarray] = field(default_factory=dict)


Renderer = Callable[[np.random.Generator, WorldSpec], Episode]


@dataclass(frozen=True)
class World:
    """A registered world: ``render(rng, spec)`` draws one episode from ``rng`` alone."""

    name: str  # data.sample_variant
    render: Renderer
    # bump when this world's output changes (recorded in the manifest as variant_version; None: not
    # recorded, the general world's manifests predate per-world versions)
    version: Optional[int] = 1
    # the json records the episode's (seed, index), so the world's simulator can re-render it
    records_origin: bool = True
    # sidecar ext -> alignment ("frames" | "transitions" | "static") of what render() returns
    sidecars: dict[str, str] = field(default_factory=dict)
    # render(rng, spec, held_out, index): the world draws its held-out split differently (e.g. unseen
    # compositions); generate(held_out=True) makes that split
    takes_split: bool = False
    description: str = ""


WORLDS: Registry[World] = Registry("sample world", import_task_packages)


def register_world(world: World) -> World:
    return WORLDS.register(world.name, world)


def get_world(name: str) -> World:
    try:
        return WORLDS.get(name)
    except KeyError as exc:
        raise ValueError(str(exc).strip("'\"")) from None


def render_episode(variant: str, seed: int, index: int, spec: WorldSpec, held_out: bool = False) -> Episode:
    """Episode ``index`` of a world; depends only on (variant, seed, index, spec, held_out)."""
    world = get_world(variant)
    rng = np.random.default_rng([seed, index])
    return world.render(rng, spec, held_out, index) if world.takes_split else world.render(rng, spec)


def _key(index: int) -> str:
    return f"sample_{index:06d}"


def _make_sample(task: tuple[str, int, int, WorldSpec, bool]) -> dict[str, Any]:
    """Render, encode and validate one video; returns a ShardWriter sample (runs in workers)."""
    variant, seed, index, spec, held_out = task
    world = get_world(variant)
    ep = render_episode(variant, seed, index, spec, held_out)
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
    if world.records_origin:
        meta.update(seed=seed, index=index)
    if world.takes_split:
        meta["held_out"] = held_out
    sample: dict[str, Any] = {"__key__": key, "mp4": mp4, "json": meta,
                              "nframes.npy": np.array([spec.num_frames], dtype=np.int32)}
    for ext, arr in ep.sidecars.items():
        sample[ext] = arr
    return sample


def _validate(variant: str, num_videos: int, num_frames: int, height: int, width: int,
              fps: float, shard_max_count: int, workers: int) -> None:
    get_world(variant)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v}")
    if num_videos < 1 or shard_max_count < 1 or workers < 1:
        raise ValueError(f"num_videos ({num_videos}), shard_max_count ({shard_max_count}) and "
                         f"workers ({workers}) must be >= 1")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


VERSION_KEYS = ("generator_version", "variant_version")


def _existing_is_complete(out_dir: Path, params: dict[str, Any], regenerate_outdated: bool) -> bool:
    """True if ``out_dir`` already holds this exact sample world; raise if it holds another (with
    ``regenerate_outdated``, one that differs only by the generator's or world's version is remade)."""
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
    if differing and regenerate_outdated and set(differing) <= set(VERSION_KEYS):
        logger.info("sample world in %s was made by an older version (%s); regenerating", out_dir,
                    ", ".join(f"{k} {recorded.get(k)} -> {params.get(k)}" for k in differing))
        return False
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
    """Delete shards of an interrupted or outdated run, so they cannot mix with the new ones."""
    stale = sorted(p for p in out_dir.iterdir() if _OWN_FILE.match(p.name))
    for p in stale:
        p.unlink()
    if (out_dir / "manifest.json").exists():
        (out_dir / "manifest.json").unlink()
    if stale:
        logger.info("removed %d shard files of an unfinished or outdated run in %s", len(stale), out_dir)


def _as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import io

    return np.load(io.BytesIO(value), allow_pickle=False)


def generate(out_dir: str | Path, variant: str = "general", num_videos: int = 64,
             num_frames: int = 17, height: int = 64, width: int = 64, fps: float = 8,
             seed: int = 0, shard_max_count: int = 32, workers: int = 1,
             progress: bool = True, regenerate_outdated: bool = False, held_out: bool = False) -> Path:
    """Write a sample world dataset into ``out_dir`` and return ``out_dir``.

    Idempotent: if ``out_dir`` already holds a complete sample world with the same parameters it
    returns at once; different parameters raise ``ValueError`` (it never overwrites data made with
    other settings; ``regenerate_outdated``: except a world of an older version, which the recipes'
    own ``data/sample/`` directories are remade from). ``workers`` only changes speed, never the bytes.
    ``held_out``: the held-out split of a world that draws it differently (``World.takes_split``).
    """
    _validate(variant, num_videos, num_frames, height, width, fps, shard_max_count, workers)
    world = get_world(variant)
    out_dir = Path(out_dir)
    spec = WorldSpec(num_frames=num_frames, height=height, width=width, fps=float(fps))
    params = {"variant": variant, "num_videos": num_videos, "seed": seed,
              "shard_max_count": shard_max_count, "generator_version": GENERATOR_VERSION,
              **asdict(spec)}
    if world.version is not None:
        params["variant_version"] = world.version
    if world.takes_split:
        params["held_out"] = bool(held_out)
    if out_dir.is_dir():
        if _existing_is_complete(out_dir, params, regenerate_outdated):
            logger.info("sample world in %s is already complete with these parameters; "
                        "nothing to do", out_dir)
            return out_dir
        _remove_stale_shards(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks = [(variant, seed, i, spec, bool(held_out)) for i in range(num_videos)]
    bar = tqdm(total=num_videos, disable=not progress, desc=f"sample world ({variant})", unit="video")
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    signals: dict[str, tuple[str, list]] = {ext: (kind, []) for ext, kind in world.sidecars.items()}
    try:
        samples = pool.imap(_make_sample, tasks, chunksize=1) if pool else map(_make_sample, tasks)
        with ShardWriter(out_dir, prefix=SHARD_PREFIX, max_count=shard_max_count,
                         max_bytes=1 << 40) as writer:
            for sample in samples:
                writer.write(sample)
                for ext, (_, rows) in signals.items():
                    rows.append(_as_array(sample[ext]))
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    extra = {"source": SOURCE, "params": params}
    if signals:
        extra["sidecars"] = manifest_stats(signals)
    write_manifest(out_dir, writer.shards, extra=extra)
    logger.info("wrote sample world (%s): %d videos in %d shards to %s", variant, num_videos,
                len(writer.shards), out_dir)
    return out_dir
