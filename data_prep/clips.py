"""Shared machinery that turns source videos into clip shards: decode, cut, resize, re-encode, shard.

Every source format (a folder of captioned videos, videos with instruction JSON, ...) only has to
list its inputs as :class:`SourceVideo` records (relative path, caption, extra json fields, or
a reason to reject it up front); :func:`prepare` does the rest:

* **Validation by full decode.** Each video is decoded completely, once (DALI cannot skip a corrupt
  sample at training time, research/data_feasibility.md 2.4). Corrupt, truncated, empty,
  unreadable and too-short videos, and videos whose decoded frame count differs grossly from
  what the container declares, are rejected with one line each in ``report.jsonl``; nothing is
  dropped silently.
* **Clips.** ``clip_frames`` (1 + 8k) frames, optionally resampled to ``fps`` by timestamp
  (:func:`resample_indices`), at evenly spaced non-overlapping starts (:func:`clip_starts`),
  resized with :func:`nemo_ext.data.video.resize_and_crop`, re-encoded with
  :func:`nemo_ext.data.video.encode_video` (deterministic bytes).
* **Resumable, deterministic sharding.** Inputs sorted by relative path are cut into fixed work
  units of ``videos_per_unit`` videos; unit ``u`` writes ``shard-{u:06d}-NNNNNN.tar`` (+ DALI
  ``.idx``) and, last, ``unit-{u:06d}.done.json``. A re-run skips finished units and redoes
  interrupted ones from scratch, so the output bytes depend only on the inputs and the
  parameters, never on the number of worker processes or on interruptions.

Output per clip: ``<key>.mp4``, ``<key>.json`` (caption, fps, num_frames, height, width, source,
clip_index, start_frame, source_fps, ... plus the source's extra fields) and ``<key>.nframes.npy``.

* **Numeric sidecars** (optional, e.g. robot actions and states): a source attaches
  :class:`Sidecar` records to a video; each is an array with one row per source frame
  (``"frames"``, T rows), one per frame-to-frame transition (``"transitions"``, T - 1 rows: an
  episode of T frames has T - 1 actions) or not per time step (``"static"``). After the decode,
  an array whose row count does not fit the decoded frame count (or holds NaN/inf) rejects the
  video with a report line naming both counts. Each clip then stores its own rows as
  ``<key>.<ext>`` (a clip of n frames gets n rows of a ``frames`` sidecar and n - 1 of a
  ``transitions`` one, the transition rows between its frames), which is what the loaders
  (``nemo_ext.data.dataset``/``dali``) cut again for a training clip. Clips that are resampled in
  time (``fps`` that skips or repeats source frames) cannot carry transition rows and are rejected.
  Per-dimension statistics (count, mean, population std, min, max) of the rows written for every
  ``frames``/``transitions`` sidecar are kept per work unit and merged into the manifest's
  ``extra["sidecars"][<ext>]`` (normalisation statistics for the trainer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nemo_ext.data.shards import (MANIFEST_NAME, ShardError, ShardInfo, ShardWriter, read_manifest,
                                  write_manifest)
from nemo_ext.data.signals import merge_stats, rows_stats, stats_json
# The one-pass decoder below uses video.py's container opener and its fork-safe, single-threaded
# pixel converter instead of frame.to_ndarray() (which deadlocks forked workers).
from nemo_ext.data.video import VideoDecodeError, encode_video, frame_converter, open_video, resize_and_crop

logger = logging.getLogger(__name__)

__all__ = [
    "PREP_VERSION",
    "VIDEO_EXTENSIONS",
    "REPORT_NAME",
    "CODECS",
    "PrepError",
    "ClipSpec",
    "ShardLayout",
    "SourceVideo",
    "Sidecar",
    "SidecarError",
    "SIDECAR_KINDS",
    "EncodedClip",
    "ExtractedVideo",
    "PrepResult",
    "find_videos",
    "source_video",
    "clip_key",
    "resample_indices",
    "clip_starts",
    "plan_clips",
    "extract_clips",
    "load_sidecars",
    "clip_samples",
    "prepare",
]

PREP_VERSION = 1  # bump when the clip bytes or json fields change, so old outputs are not reused
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
CODECS: tuple[str, ...] = ("h264", "vp9")
REPORT_NAME = "report.jsonl"
# A decoded frame count may differ from the container's declared one by this much before the
# video is rejected: a frame or two (edit lists, a dropped last frame) is normal, more means a
# truncated or damaged stream.
FRAME_COUNT_TOLERANCE = 0.02
FRAME_COUNT_TOLERANCE_MIN = 2
_EPS = 1e-9  # float slack for timestamp arithmetic (29.97 vs 30000/1001)

_UNIT_FILE = re.compile(r"^unit-(\d{6})\.done\.json(\.partial)?$")
_SHARD_FILE = re.compile(r"^shard-(\d{6})-\d{6}\.(tar|idx)(\.partial)?$")


class PrepError(ValueError):
    """Data prep cannot run as asked (bad parameters, an output dir made with other settings)."""


class SidecarError(ValueError):
    """A video's numeric sidecar does not fit its video; the message is the report reason."""


# How a numeric sidecar lines up with the video (the same kinds as nemo_ext.data.dataset).
SIDECAR_KINDS: tuple[str, ...] = ("frames", "transitions", "static")


# --------------------------------------------------------------------------------------------
# Parameters and records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """What every output clip looks like; validated on construction.

    ``fps=None`` keeps each source's own frame rate; ``clips_per_video=0`` takes every
    non-overlapping clip of a video.
    """

    clip_frames: int
    height: int
    width: int
    fps: float | None = None
    resize_mode: str = "crop"
    clips_per_video: int = 1
    codec: str = "h264"

    def __post_init__(self) -> None:
        if self.clip_frames < 1 or (self.clip_frames - 1) % 8:
            raise PrepError(f"clip_frames must be 1 + 8k (the tokenizer compresses time 8x: 9, 17, "
                            f"..., 121), got {self.clip_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise PrepError(f"{name} must be a positive multiple of 16, got {value}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise PrepError(f"fps must be > 0 (or None to keep the source fps), got {self.fps}")
        if self.resize_mode not in ("crop", "pad"):
            raise PrepError(f"resize_mode must be 'crop' or 'pad', got {self.resize_mode!r}")
        if self.clips_per_video < 0:
            raise PrepError(f"clips_per_video must be >= 0 (0 = all non-overlapping clips), "
                            f"got {self.clips_per_video}")
        if self.codec not in CODECS:
            raise PrepError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")


@dataclass(frozen=True)
class ShardLayout:
    """How inputs are grouped into work units and clips into shards (part of the parameters:
    they decide which file each clip lands in)."""

    videos_per_unit: int = 32
    max_shard_bytes: int = 1 << 30
    max_clips_per_shard: int = 1000

    def __post_init__(self) -> None:
        for name in ("videos_per_unit", "max_shard_bytes", "max_clips_per_shard"):
            if getattr(self, name) < 1:
                raise PrepError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Sidecar:
    """A numeric array that belongs to one video and is stored, cut to each clip, as ``<key>.<ext>``.

    ``kind``: ``"frames"`` (a row per source frame), ``"transitions"`` (a row per frame-to-frame
    step, T - 1 rows) or ``"static"`` (stored whole with every clip). ``load`` returns the array;
    it runs in the worker that decodes the video, so it must be picklable (a module-level function
    or a ``functools.partial`` of one) and cheap. ``digest`` identifies the content (part of the
    unit fingerprint: changed rows make the unit be redone). ``what`` names the array in report
    lines, e.g. ``"episode train/3: actions ('action' of annotation/train/3.json)"``.
    """

    ext: str
    kind: str
    load: Callable[[], np.ndarray]
    digest: str
    what: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SIDECAR_KINDS:
            raise PrepError(f"sidecar {self.ext!r}: kind {self.kind!r} is not one of {SIDECAR_KINDS}")
        if not self.ext.endswith(".npy") or self.ext.startswith(".") or "/" in self.ext:
            raise PrepError(f"sidecar extension must look like '<name>.npy', got {self.ext!r}")
        if self.ext in ("nframes.npy",):
            raise PrepError(f"sidecar extension {self.ext!r} is reserved")


@dataclass(frozen=True)
class SourceVideo:
    """One input video as a source format lists it.

    ``meta`` is merged into every clip's json (e.g. ``{"instructions": [...]}``); ``reject`` is
    set when the source already knows the video cannot be used (no caption, invalid instruction
    JSON): it then becomes a report line without being decoded. ``size`` (bytes) is part of the
    unit fingerprint, so a replaced file makes its unit be redone. ``sidecars`` are numeric
    arrays stored with every clip (see :class:`Sidecar`).
    """

    rel: str
    path: str
    size: int
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None
    sidecars: tuple[Sidecar, ...] = ()


@dataclass(frozen=True)
class EncodedClip:
    clip_index: int
    start_frame: int  # in source frames
    source_frames: tuple[int, ...]  # the source frame taken for each output frame
    mp4: bytes


@dataclass(frozen=True)
class ExtractedVideo:
    """What the one-pass decode found, and the finished clips."""

    source_fps: float
    source_num_frames: int  # decoded
    declared_frames: int  # what the container claims (0 = unknown)
    width: int
    height: int
    codec: str
    fps: float  # of the clips
    clips: list[EncodedClip]


@dataclass(frozen=True)
class PrepResult:
    out_dir: Path
    num_videos: int
    num_videos_ok: int
    num_rejected: int
    num_source_issues: int
    num_clips: int
    num_shards: int
    num_units: int
    units_skipped: int
    report: Path
    spec: ClipSpec | None = None  # the clips made


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def find_videos(raw: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """Video files under ``raw`` (recursive, by extension, case-insensitive) as sorted posix paths
    relative to ``raw``. Hidden files and folders are skipped; so is ``exclude`` (an output dir
    placed inside ``raw``)."""
    root = Path(raw)
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def raw_videos(raw: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """:func:`find_videos` of a RAW folder the sources read, with the errors they share: RAW is no
    directory, or holds no video."""
    raw = Path(raw)
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    rels = find_videos(raw, exclude=exclude)
    if not rels:
        raise PrepError(f"RAW {raw} holds no videos (looked for {' '.join(VIDEO_EXTENSIONS)}, recursively)")
    return rels


def source_video(raw: Path, rel: str, caption: str | None, meta: Mapping[str, Any] | None = None,
                 reject: str | None = None, sidecars: Sequence[Sidecar] = ()) -> SourceVideo:
    """A :class:`SourceVideo` for ``raw/rel``, with its size taken now (for the unit fingerprint)."""
    path = raw / rel
    try:
        size = path.stat().st_size
    except OSError as e:
        size, reject = -1, reject or f"cannot stat the file: {e}"
    return SourceVideo(rel=rel, path=str(path.resolve()), size=size, caption=caption,
                       meta=dict(meta or {}), reject=reject, sidecars=tuple(sidecars))


def clip_key(rel: str, clip_index: int) -> str:
    """``<sanitized stem>_<8 hex of sha1(rel)>_c<clip>``: readable, unique per source path, and
    dot-free (webdataset and DALI split member names at the first dot)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).stem).strip("_")[:48] or "video"
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{stem}_{digest}_c{clip_index:03d}"


# --------------------------------------------------------------------------------------------
# Clip planning
# --------------------------------------------------------------------------------------------


def resample_indices(num_frames: int, source_fps: float, fps: float | None) -> list[int]:
    """Source frame index of each frame of the video resampled to ``fps`` (None: unchanged).

    Output frame i takes the source frame nearest to ``i / fps`` seconds, with source frame j at
    ``j / source_fps`` (constant frame rate assumed). The resampled video ends at the last source
    frame and is never longer than the source (no invented length): a higher target fps repeats
    frames over the first part of the source rather than extending it.
    """
    if num_frames <= 0:
        return []
    if fps is None:
        return list(range(num_frames))
    if not source_fps > 0:
        raise ValueError(f"source fps must be > 0 to resample, got {source_fps}")
    ratio = source_fps / fps
    count = min(num_frames, int(math.floor((num_frames - 1) / ratio + _EPS)) + 1)
    return [min(num_frames - 1, int(math.floor(i * ratio + 0.5 + _EPS))) for i in range(count)]


def clip_starts(length: int, clip_frames: int, clips_per_video: int) -> list[int]:
    """Starts of non-overlapping clips in a sequence of ``length`` frames.

    ``clips_per_video=0`` takes every clip back to back from frame 0; ``k > 0`` takes
    ``min(k, length // clip_frames)`` clips evenly spread from the first to the last possible
    start (one clip starts at 0). Spacing is at least ``clip_frames``, so clips never overlap.
    """
    available = length // clip_frames
    if available == 0:
        return []
    if clips_per_video == 0:
        return [c * clip_frames for c in range(available)]
    count = min(clips_per_video, available)
    if count == 1:
        return [0]
    span = length - clip_frames
    return [c * span // (count - 1) for c in range(count)]


def plan_clips(num_frames: int, source_fps: float, spec: ClipSpec) -> list[tuple[int, ...]]:
    """For each clip, the source frame index of each of its ``spec.clip_frames`` frames."""
    indices = resample_indices(num_frames, source_fps, spec.fps)
    return [tuple(indices[s:s + spec.clip_frames])
            for s in clip_starts(len(indices), spec.clip_frames, spec.clips_per_video)]


# --------------------------------------------------------------------------------------------
# One-pass decode and clip encoding
# --------------------------------------------------------------------------------------------


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _count_packets(data: bytes) -> int:
    """Video packets in the container (demux only, no decode): the frame count to plan with
    when the container does not declare one (Matroska/WebM)."""
    container, stream = open_video(data)
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as e:  # PyAV raises several FFmpegError subclasses
        raise VideoDecodeError(f"cannot read the video packets: {e}") from e
    finally:
        container.close()


def _gross_mismatch(decoded: int, declared: int) -> bool:
    tolerance = max(FRAME_COUNT_TOLERANCE_MIN, math.ceil(FRAME_COUNT_TOLERANCE * declared))
    return declared > 0 and abs(decoded - declared) > tolerance


def _too_short(num_frames: int, source_fps: float, spec: ClipSpec) -> str:
    if spec.fps is None:
        return f"too short: {num_frames} frames, a clip needs {spec.clip_frames}"
    length = len(resample_indices(num_frames, source_fps, spec.fps))
    return (f"too short: {num_frames} frames at {source_fps:g} fps give {length} frames at "
            f"{spec.fps:g} fps, a clip needs {spec.clip_frames}")


class _ClipAssembler:
    """Collects the frames each planned clip needs while the video streams by, and encodes a clip
    as soon as its last frame arrives, so memory holds about one clip of raw frames."""

    def __init__(self, plans: Sequence[tuple[int, ...]], spec: ClipSpec, fps: float) -> None:
        self.plans, self.spec, self.fps = list(plans), spec, fps
        self.wanted: dict[int, list[tuple[int, int]]] = {}  # source frame -> [(clip, slot)]
        for c, frames in enumerate(self.plans):
            for slot, j in enumerate(frames):
                self.wanted.setdefault(j, []).append((c, slot))
        self.buffers: dict[int, list[np.ndarray | None]] = {}
        self.missing = [len(p) for p in self.plans]
        self.done: dict[int, bytes] = {}

    def add(self, index: int, rgb: np.ndarray) -> None:
        for c, slot in self.wanted.get(index, ()):
            buf = self.buffers.setdefault(c, [None] * len(self.plans[c]))
            buf[slot] = rgb
            self.missing[c] -= 1
            if self.missing[c] == 0:
                frames = np.stack(self.buffers.pop(c))  # type: ignore[arg-type]
                frames = resize_and_crop(frames, self.spec.height, self.spec.width, self.spec.resize_mode)
                self.done[c] = encode_video(frames, self.fps, codec=self.spec.codec)

    def clips(self) -> list[EncodedClip]:
        """The finished clips, in order (a clip whose frames never arrived is left out)."""
        return [EncodedClip(clip_index=c, start_frame=p[0], source_frames=p, mp4=self.done[c])
                for c, p in enumerate(self.plans) if c in self.done]


def _decode_pass(data: bytes, plans: Sequence[tuple[int, ...]], spec: ClipSpec,
                 fps: float) -> tuple[int, tuple[int, int], list[EncodedClip]]:
    """Decode every frame of ``data``; encode the planned clips on the way.

    Returns (decoded frame count, (width, height), clips complete within the decoded frames).
    Decoder and pixel-conversion failures are :class:`VideoDecodeError` ("corrupt"); errors in
    resizing/encoding are not caught here, so they are not mistaken for corrupt input.
    """
    assembler = _ClipAssembler(plans, spec, fps)
    container, stream = open_video(data)
    decoded, size = 0, None
    try:
        converter = frame_converter()
        frames = iter(container.decode(stream))
        while True:
            try:
                frame = next(frames)
                rgb = (converter.reformat(frame, format="rgb24", threads=1).to_ndarray()
                       if decoded in assembler.wanted else None)
            except StopIteration:
                break
            except Exception as e:  # FFmpeg errors mid-stream: corrupt data
                raise VideoDecodeError(f"corrupt: decoding failed after {decoded} frames: {e}") from e
            if size is None:
                size = (frame.width, frame.height)
            elif (frame.width, frame.height) != size:
                raise VideoDecodeError(f"the frame size changes mid-stream at frame {decoded}: "
                                       f"{size[0]}x{size[1]} -> {frame.width}x{frame.height}")
            if rgb is not None:
                assembler.add(decoded, rgb)
            decoded += 1
    finally:
        container.close()
    if decoded == 0 or size is None:
        raise VideoDecodeError("no decodable frames")
    return decoded, size, assembler.clips()


def extract_clips(data: bytes, spec: ClipSpec) -> ExtractedVideo:
    """Decode ``data`` fully, once, and return its clips, encoded per ``spec``.

    Clip positions are planned from the container's frame count (declared, or counted packets)
    before decoding, and the one decode pass keeps only the frames the clips need. If the decoded
    count then differs slightly (within the tolerance) in a way that moves the clips, a second pass
    with the corrected plan is made. Raises :class:`VideoDecodeError` with a one-line reason for
    anything that makes the video unusable: unreadable, corrupt anywhere in the stream, no frame
    rate, frame size changing mid-stream, a decoded frame count that differs grossly from the
    declared one, or too short for one clip.
    """
    container, stream = open_video(data)
    try:
        source_fps = _stream_fps(stream)
        declared = max(0, int(stream.frames or 0))
        codec = stream.codec_context.name
    finally:
        container.close()
    if not source_fps > 0:
        raise VideoDecodeError("the container gives no frame rate")
    planned_count = declared or _count_packets(data)
    fps = spec.fps if spec.fps is not None else source_fps
    plans = plan_clips(planned_count, source_fps, spec)
    decoded, size, clips = _decode_pass(data, plans, spec, fps)
    if _gross_mismatch(decoded, declared):
        raise VideoDecodeError(f"truncated or damaged: decoded {decoded} frames, the container "
                               f"declares {declared}")
    if decoded != planned_count:
        actual = plan_clips(decoded, source_fps, spec)
        if actual != plans:
            logger.debug("decoded %d frames, planned with %d: second pass", decoded, planned_count)
            plans = actual
            again, size, clips = _decode_pass(data, plans, spec, fps)
            if again != decoded:
                raise VideoDecodeError(f"decodes to {decoded} frames, then to {again}")
    if not plans:
        raise VideoDecodeError(_too_short(decoded, source_fps, spec))
    return ExtractedVideo(source_fps=source_fps, source_num_frames=decoded, declared_frames=declared,
                          width=size[0], height=size[1], codec=codec, fps=fps, clips=clips)


def load_sidecars(video: SourceVideo, num_frames: int) -> dict[str, np.ndarray]:
    """The video's sidecar arrays, checked against its decoded frame count ``num_frames``.

    Raises :class:`SidecarError` (the report reason) for an array that cannot be loaded, is not
    numeric, holds NaN/inf, or whose row count does not fit: ``frames`` needs ``num_frames``
    rows, ``transitions`` needs ``num_frames - 1`` (one per transition).
    """
    arrays: dict[str, np.ndarray] = {}
    for sc in video.sidecars:
        what = sc.what or sc.ext
        try:
            arr = np.asarray(sc.load())
        except Exception as e:  # a file that changed or vanished since it was listed
            raise SidecarError(f"{what}: cannot be loaded: {type(e).__name__}: {e}") from e
        if arr.dtype.kind not in "biuf":
            raise SidecarError(f"{what}: dtype {arr.dtype} is not numeric")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise SidecarError(f"{what}: holds NaN/inf (first at index {tuple(int(i) for i in bad)})")
        if sc.kind != "static":
            rows = num_frames if sc.kind == "frames" else num_frames - 1
            have = arr.shape[0] if arr.ndim else 0
            if arr.ndim == 0 or have != rows:
                unit = "one per frame" if sc.kind == "frames" else "one per transition: frames - 1"
                raise SidecarError(f"count mismatch: {what}: {have} rows for a video of {num_frames} "
                                   f"frames; expected {rows} ({unit})")
        arrays[sc.ext] = arr
    return arrays


def _cut(arr: np.ndarray, kind: str, frames: tuple[int, ...], what: str) -> np.ndarray:
    """A sidecar's rows for one clip made of the source frames ``frames``."""
    if kind == "static":
        return arr
    if kind == "frames":
        return arr[list(frames)]
    if any(b != a + 1 for a, b in zip(frames, frames[1:])):
        raise SidecarError(f"{what}: holds one row per transition, but the clip is resampled in time (source "
                           f"frames {frames[0]}..{frames[-1]} for {len(frames)} clip frames), so its transitions "
                           "are not rows of the source; keep the source frame rate (fps=None / --fps source)")
    return arr[frames[0]:frames[-1]]


def clip_samples(video: SourceVideo, extracted: ExtractedVideo, spec: ClipSpec,
                 sidecars: Mapping[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """ShardWriter samples (``mp4``, ``json``, ``nframes.npy``, plus the video's sidecars cut to
    each clip) for the clips of one video. ``sidecars`` are the arrays :func:`load_sidecars` gave."""
    arrays = dict(sidecars or {})
    kinds = {sc.ext: (sc.kind, sc.what or sc.ext) for sc in video.sidecars}
    missing = sorted(set(kinds) - set(arrays))
    if missing:
        raise ValueError(f"{video.rel}: sidecars {missing} were not loaded (call load_sidecars first)")
    samples = []
    for clip in extracted.clips:
        meta = {
            **video.meta,
            "caption": video.caption or "",
            "fps": extracted.fps,
            "num_frames": spec.clip_frames,
            "height": spec.height,
            "width": spec.width,
            "codec": spec.codec,
            "resize_mode": spec.resize_mode,
            "source": video.rel,
            "clip_index": clip.clip_index,
            "start_frame": clip.start_frame,
            "source_fps": extracted.source_fps,
            "source_num_frames": extracted.source_num_frames,
            "source_height": extracted.height,
            "source_width": extracted.width,
        }
        sample = {"__key__": clip_key(video.rel, clip.clip_index), "mp4": clip.mp4, "json": meta,
                  "nframes.npy": np.array([spec.clip_frames], dtype=np.int32)}
        for ext, (kind, what) in kinds.items():
            sample[ext] = np.ascontiguousarray(_cut(arrays[ext], kind, clip.source_frames, what))
        samples.append(sample)
    return samples


# --------------------------------------------------------------------------------------------
# Work units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UnitTask:
    out_dir: str
    unit: int
    videos: tuple[SourceVideo, ...]
    spec: ClipSpec
    layout: ShardLayout
    params: dict[str, Any]
    fingerprint: str


def _unit_prefix(unit: int) -> str:
    return f"shard-{unit:06d}"


def _done_path(out_dir: Path, unit: int) -> Path:
    return out_dir / f"unit-{unit:06d}.done.json"


def _fingerprint(videos: Sequence[SourceVideo]) -> str:
    """Hash of what a unit's output depends on besides the parameters: its inputs' paths, sizes,
    captions and extra fields. A unit whose inputs changed is redone, not reused."""
    items = [[v.rel, v.size, v.caption, v.meta, v.reject]
             # sidecars only when there are some: fingerprints of sidecar-free sources stay as they were
             + ([[[sc.ext, sc.kind, sc.digest] for sc in v.sidecars]] if v.sidecars else []) for v in videos]
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _remove_unit_files(out_dir: Path, unit: int) -> None:
    """Delete everything a unit ever wrote (finished or partial), so it can be redone cleanly."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        m = _SHARD_FILE.match(p.name) or _UNIT_FILE.match(p.name)
        if m and int(m.group(1)) == unit:
            p.unlink()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _process_video(video: SourceVideo, spec: ClipSpec) -> tuple[list[dict[str, Any]], str | None]:
    """(samples, None) for a usable video, ([], reason) for a rejected one."""
    if video.reject:
        return [], video.reject
    try:
        data = Path(video.path).read_bytes()
    except OSError as e:
        return [], f"cannot read the file: {e}"
    try:
        extracted = extract_clips(data, spec)
        arrays = load_sidecars(video, extracted.source_num_frames)
        return clip_samples(video, extracted, spec, arrays), None
    except (VideoDecodeError, SidecarError) as e:
        return [], str(e)
    except Exception as e:  # anything else a strange file triggers is still a rejection, reported
        logger.warning("%s: unexpected error, rejected", video.rel, exc_info=True)
        return [], f"unexpected error: {type(e).__name__}: {e}"


_progress_queue: Any = None  # set in pool workers: one item per finished video


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    import torch  # noqa: PLC0415  (resize uses torch; one thread per worker, no oversubscription)

    torch.set_num_threads(1)


def _run_unit(task: _UnitTask, on_video: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write one unit from scratch and, last, its done file; returns the done record."""
    out_dir = Path(task.out_dir)
    _remove_unit_files(out_dir, task.unit)
    rejects: list[dict[str, str]] = []
    num_clips = 0
    kinds: dict[str, str] = {}  # sidecar ext -> kind, over every listed video
    stats: dict[str, dict[str, Any]] = {}  # sidecar ext -> statistics of the rows written
    with ShardWriter(out_dir, prefix=_unit_prefix(task.unit), max_count=task.layout.max_clips_per_shard,
                     max_bytes=task.layout.max_shard_bytes) as writer:
        for video in task.videos:
            samples, reason = _process_video(video, task.spec)
            if reason is not None:
                logger.debug("rejected %s: %s", video.rel, reason)
                rejects.append({"video": video.rel, "reason": reason})
            for sc in video.sidecars:
                if kinds.setdefault(sc.ext, sc.kind) != sc.kind:
                    raise PrepError(f"sidecar {sc.ext!r} is listed as {kinds[sc.ext]!r} and as {sc.kind!r}")
            for sample in samples:
                writer.write(sample)
                for sc in video.sidecars:
                    rows = sample[sc.ext]
                    if sc.kind != "static" and rows.shape[0]:
                        stats[sc.ext] = merge_stats(stats.get(sc.ext), rows_stats(rows), sc.ext)
            num_clips += len(samples)
            if on_video is not None:
                on_video()
            elif _progress_queue is not None:
                _progress_queue.put(1)
    record = {
        "unit": task.unit,
        "params": task.params,
        "inputs_sha256": task.fingerprint,
        "num_videos": len(task.videos),
        "num_rejected": len(rejects),
        "num_clips": num_clips,
        "rejects": rejects,
        "shards": [{"path": info.path.name, "num_samples": info.num_samples,
                    "num_bytes": info.num_bytes, "sha256": info.sha256} for info in writer.shards],
    }
    if kinds:  # only for sources with sidecars: the records of the others stay as they were
        record["sidecars"] = {ext: stats_json(kind, stats.get(ext), final=False) for ext, kind in sorted(kinds.items())}
    _write_json_atomic(_done_path(out_dir, task.unit), record)
    return record


def _finished_record(out_dir: Path, unit: int, fingerprint: str) -> dict[str, Any] | None:
    """The unit's done record if the unit is complete and current, else None (redo it)."""
    path = _done_path(out_dir, unit)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("%s is unreadable (%s); redoing unit %d", path, e, unit)
        return None
    if record.get("inputs_sha256") != fingerprint:
        logger.warning("the inputs of unit %d changed since %s was written; redoing it", unit, path.name)
        return None
    for shard in record.get("shards", []):
        tar = out_dir / shard["path"]
        if not tar.is_file() or tar.stat().st_size != shard["num_bytes"] or not tar.with_suffix(".idx").is_file():
            logger.warning("unit %d: shard %s is missing or changed; redoing the unit", unit, tar.name)
            return None
    return record


# --------------------------------------------------------------------------------------------
# Parameter checks and the run
# --------------------------------------------------------------------------------------------


def _differences(recorded: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(params))
    return [f"{k} (has {recorded.get(k)!r}, asked {params.get(k)!r})" for k in keys
            if recorded.get(k) != params.get(k)]


def _check_existing(out_dir: Path, params: Mapping[str, Any]) -> None:
    """Refuse an output dir whose manifest or done files were made with other parameters."""
    recorded: list[tuple[Path, Any]] = []
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        try:
            recorded.append((manifest, read_manifest(out_dir).get("extra", {}).get("params")))
        except ShardError as e:
            raise PrepError(f"{manifest} is unreadable ({e}); delete it or use another --out") from e
    for p in sorted(out_dir.glob("unit-*.done.json")):
        try:
            recorded.append((p, json.loads(p.read_text()).get("params")))
        except (OSError, json.JSONDecodeError):
            continue  # an unreadable done file only means its unit is redone
    for path, rec in recorded:
        if not isinstance(rec, dict) or rec.get("source") != params.get("source"):
            what = rec.get("source") if isinstance(rec, dict) else "something else"
            raise PrepError(f"{out_dir} holds a dataset of another kind ({path.name} was made by "
                            f"{what!r}, this is {params.get('source')!r}); use another --out or delete it")
        diff = _differences(rec, params)
        if diff:
            raise PrepError(f"{out_dir} holds shards made with other parameters ({path.name}): "
                            f"{'; '.join(diff)}. Use the same parameters to resume, or another "
                            "--out (or delete it) to start over")


def _remove_stale_units(out_dir: Path, num_units: int) -> None:
    """Units past the current count (the input folder shrank) would leak old clips: delete them."""
    stale = [p for p in out_dir.iterdir()
             if (m := _SHARD_FILE.match(p.name) or _UNIT_FILE.match(p.name)) and int(m.group(1)) >= num_units]
    for p in sorted(stale):
        p.unlink()
    if stale:
        logger.warning("removed %d files of units >= %d (there are fewer inputs now) from %s",
                       len(stale), num_units, out_dir)


def _write_text_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _manifest_is_current(out_dir: Path, shards: list[dict[str, Any]], extra: dict[str, Any]) -> bool:
    try:
        manifest = read_manifest(out_dir)
    except ShardError:
        return False
    return manifest.get("shards") == shards and manifest.get("extra") == json.loads(json.dumps(extra))


def _run_units(tasks: Sequence[_UnitTask], workers: int, bar: tqdm) -> dict[int, dict[str, Any]]:
    """Run units inline (workers == 1) or in a forkserver pool; results by unit index.

    forkserver, not fork: the parent may hold torch's OpenMP pool and PyAV state (e.g. from an
    earlier in-process run), which a forked child can deadlock on.
    """
    if workers <= 1 or len(tasks) <= 1:
        return {t.unit: _run_unit(t, on_video=lambda: bar.update(1)) for t in tasks}
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.clips", "torch", "webdataset"])
    queue = ctx.Queue()

    def drain() -> None:
        while queue.get() is not None:
            bar.update(1)

    listener = threading.Thread(target=drain, daemon=True)
    listener.start()
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(queue,))
    try:
        results = {r["unit"]: r for r in pool.imap_unordered(_run_unit, tasks, chunksize=1)}
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        queue.put(None)
        listener.join(timeout=10)
    return results


def prepare(source: str, videos: Sequence[SourceVideo], out_dir: str | os.PathLike, spec: ClipSpec,
            layout: ShardLayout = ShardLayout(), *, workers: int = 1,
            source_params: Mapping[str, Any] | None = None,
            source_issues: Iterable[Mapping[str, str]] = (), info: Mapping[str, Any] | None = None,
            progress: bool = True) -> PrepResult:
    """Turn ``videos`` into clip shards in ``out_dir``; resumable and deterministic.

    ``source`` names the source format and ``source_params`` its settings (both are compared
    with an existing output, like ``spec`` and ``layout``); ``source_issues`` are report lines
    that are not input videos (a caption row naming no video); ``info`` is recorded in the
    manifest but not compared. Raises :class:`PrepError` when ``out_dir`` holds data made with
    other parameters. ``workers`` changes speed only, never the bytes written.
    """
    if workers < 1:
        raise PrepError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    videos = sorted(videos, key=lambda v: v.rel)
    if len({v.rel for v in videos}) != len(videos):
        raise PrepError("the same relative video path is listed twice")
    params: dict[str, Any] = {"source": source, "prep_version": PREP_VERSION, **asdict(spec),
                              **asdict(layout), **dict(source_params or {})}
    params = json.loads(json.dumps(params))  # as it reads back from JSON (tuples -> lists)
    if out_dir.is_dir():
        _check_existing(out_dir, params)
    out_dir.mkdir(parents=True, exist_ok=True)

    per = layout.videos_per_unit
    units = [tuple(videos[i:i + per]) for i in range(0, len(videos), per)]
    _remove_stale_units(out_dir, len(units))
    records: dict[int, dict[str, Any]] = {}
    todo: list[_UnitTask] = []
    for u, unit_videos in enumerate(units):
        fp = _fingerprint(unit_videos)
        record = _finished_record(out_dir, u, fp)
        if record is not None:
            records[u] = record
        else:
            todo.append(_UnitTask(str(out_dir), u, unit_videos, spec, layout, params, fp))
    if todo:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the set is incomplete until merged again
        logger.info("%d of %d units to do (%d already done) in %s", len(todo), len(units),
                    len(units) - len(todo), out_dir)
    bar = tqdm(total=len(videos), disable=not progress, desc=f"prep {source}", unit="video")
    bar.update(sum(len(units[u]) for u in records))
    try:
        records.update(_run_units(todo, workers, bar))
    finally:
        bar.close()
    result = _merge(out_dir, source, params, [records[u] for u in range(len(units))], list(source_issues),
                    dict(info or {}), units_skipped=len(units) - len(todo))
    return dataclasses.replace(result, spec=spec)


def _merge_sidecar_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``extra["sidecars"]``: per sidecar ext, its kind and the statistics of every row written."""
    kinds: dict[str, str] = {}
    merged: dict[str, dict[str, Any] | None] = {}
    for rec in records:
        for ext, entry in (rec.get("sidecars") or {}).items():
            if kinds.setdefault(ext, entry["kind"]) != entry["kind"]:
                raise PrepError(f"sidecar {ext!r} is {kinds[ext]!r} in one work unit and {entry['kind']!r} in another")
            merged.setdefault(ext, None)
            if entry.get("count"):
                merged[ext] = merge_stats(merged[ext], entry, ext)
    return {ext: stats_json(kinds[ext], merged[ext], final=True) for ext in sorted(kinds)}


def _merge(out_dir: Path, source: str, params: dict[str, Any], records: list[dict[str, Any]],
           source_issues: list[Mapping[str, str]], info: dict[str, Any], units_skipped: int) -> PrepResult:
    """Merge the done records into report.jsonl and manifest.json (rewritten only if changed, so
    a re-run with nothing to do writes nothing)."""
    rejects = [r for rec in records for r in rec["rejects"]]
    lines = [{"video": str(i["video"]), "reason": str(i["reason"])} for i in source_issues] + rejects
    report = out_dir / REPORT_NAME
    _write_text_if_changed(report, "".join(json.dumps(x, sort_keys=True, ensure_ascii=False) + "\n"
                                           for x in lines))
    shard_infos = [ShardInfo(path=out_dir / s["path"], num_samples=s["num_samples"],
                             num_bytes=s["num_bytes"], sha256=s["sha256"])
                   for rec in records for s in rec["shards"]]
    num_videos = sum(rec["num_videos"] for rec in records)
    num_clips = sum(rec["num_clips"] for rec in records)
    extra = {
        "source": source, "params": params, "info": info, "report": REPORT_NAME,
        "num_units": len(records), "num_videos": num_videos, "num_videos_ok": num_videos - len(rejects),
        "num_rejected": len(rejects), "num_source_issues": len(source_issues), "num_clips": num_clips,
    }
    sidecars = _merge_sidecar_stats(records)
    if sidecars:
        extra["sidecars"] = sidecars
    shard_rows = [{"path": s["path"], "num_samples": s["num_samples"], "num_bytes": s["num_bytes"],
                   "sha256": s["sha256"]} for rec in records for s in rec["shards"]]
    if not _manifest_is_current(out_dir, shard_rows, extra):
        write_manifest(out_dir, shard_infos, extra=extra)
    logger.info("%s: %d clips from %d of %d videos in %d shards; %d rejected (see %s)", out_dir,
                num_clips, num_videos - len(rejects), num_videos, len(shard_infos), len(rejects), report)
    return PrepResult(out_dir=out_dir, num_videos=num_videos, num_videos_ok=num_videos - len(rejects),
                      num_rejected=len(rejects), num_source_issues=len(source_issues), num_clips=num_clips,
                      num_shards=len(shard_infos), num_units=len(records), units_skipped=units_skipped,
                      report=report)


# --------------------------------------------------------------------------------------------
# The prep CLI's shared options -> the clip spec, the layout and the common arguments
# --------------------------------------------------------------------------------------------


def clip_options(args: Any, cfg: Any, keeps_source_fps: bool = False) -> tuple[ClipSpec, ShardLayout, dict[str, Any]]:
    """``python -m nemo_ext.cli.prep <source>``'s shared options (clips, sharding, workers) with the
    recipe's ``data.*`` values as defaults -> (spec, layout, keyword arguments of the converters:
    workers, progress, info). ``keeps_source_fps``: clips keep each input's frame rate (``spec.fps``
    None; the CLI refuses ``--fps`` for such sources)."""
    data = cfg.data
    if keeps_source_fps:
        fps = None
    else:
        fps = args.fps if hasattr(args, "fps") else (float(data.fps) if data.fps is not None else None)
    spec = ClipSpec(
        clip_frames=args.clip_frames if args.clip_frames is not None else int(data.num_frames),
        height=args.height if args.height is not None else int(data.height),
        width=args.width if args.width is not None else int(data.width),
        fps=fps, resize_mode=args.resize_mode or str(data.resize_mode),
        clips_per_video=args.clips_per_video, codec=args.codec)
    layout = ShardLayout(videos_per_unit=args.videos_per_unit, max_shard_bytes=args.max_shard_bytes,
                         max_clips_per_shard=args.max_clips_per_shard)
    if args.workers < 1:
        raise PrepError(f"--workers must be >= 1, got {args.workers}")
    info = {"recipe": args.recipe, "family": args.family, "overrides": list(args.overrides)}
    return spec, layout, {"workers": args.workers, "progress": not args.no_progress, "info": info}
