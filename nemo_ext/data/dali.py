"""DALI training loader: webdataset shards -> clips -> ``[B, 3, F, H, W]`` micro-batches per DP rank.

Why DALI: on GPU, ``fn.decoders.video(device="mixed")`` decodes H.264/HEVC/AV1 with NVDEC, which
is what keeps a 720p video world model fed (CPU decode costs 0.4-1 core-second per clip,
research/data_feasibility.md section 2.5). The same code runs with ``device="cpu"`` in CI, where
DALI's CPU decoder reads VP9/VP8/MJPEG only.

Two pipelines, because DALI 2.4 cannot checkpoint ``fn.decoders.video``
(``enable_checkpointing=True`` fails at build: "Checkpointing is not implemented for this
operator"), and resuming mid-epoch needs a checkpoint:

* the *reader* pipeline (CPU, checkpointed): ``fn.readers.webdataset`` (sharded by DP rank,
  shuffled) -> ``fn.decoders.numpy`` of ``nframes.npy`` -> the clip start, drawn in-graph -> the
  encoded video, the raw json, ``source_info`` and the decoded numeric sidecars. It is cheap (no
  pixel work), so its state after every micro-batch is exactly known;
* the *decode* pipeline (stateless; ``cpu`` or ``mixed``): ``fn.external_source`` fed with the
  reader's output TensorList (which keeps each sample's ``source_info``, so decoder errors name
  ``<tar>:<offset>:<member>``) -> ``fn.decoders.video(start_frame, sequence_length, stride)`` ->
  aspect-preserving resize + centre crop or letterbox with the geometry of
  :func:`nemo_ext.data.video.resize_and_crop` -> ``crop_mirror_normalize`` to float [-1, 1],
  ``CFHW``.

The next micro-batch is read and its decode scheduled before the current one is returned, so
decoding overlaps the training step; :meth:`DaliVideoLoader.state_dict` still describes the
position right after the last *returned* micro-batch.

A corrupt video kills a DALI pipeline (there is no skip option). The loader recovers: it finds
the bad sample(s) of the failing micro-batch, excludes them through filtered copies of the
shard's ``.idx`` file, rebuilds the reader from the checkpoint taken after the previous
micro-batch and carries on, up to ``max_failed_samples`` / ``max_failed_fraction``.

Checked once on an H200 (DALI 2.4 carried over): H.264 decoded by NVDEC agrees with the PyAV
path (mean |diff| 0.009-0.014 on [-1, 1], frame markers within 1 grey level), resume and the
recovery from mid-stream corrupt and truncated H.264 work as on CPU; NVDEC refuses VP9 under
128x128 ("Video is too small"), which is reported as a configuration error.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_ext.data.dataset import CAPTION_CHOICES, caption_for, clip_seed_for
from nemo_ext.data.shards import ShardError, expand_paths, index_tar, read_idx, write_idx

logger = logging.getLogger(__name__)

__all__ = ["DaliVideoLoader", "SIDECAR_KINDS", "CPU_CODECS"]

# How a numeric sidecar lines up with the video (same meaning as in nemo_ext.data.dataset):
# one row per frame, one row per frame-to-frame transition (n - 1 rows), or not per time step.
SIDECAR_KINDS = ("frames", "transitions", "static")
# What DALI's CPU video decoder reads (libavcodec inside DALI); everything else needs NVDEC.
CPU_CODECS = ("vp9", "vp8", "mjpeg")
_CLIP_SAMPLING = ("random", "start")
_RESIZE_MODES = ("crop", "pad")
_DEVICES = ("cpu", "gpu")
_STATE_FORMAT = "nemo_ext.data.dali.DaliVideoLoader/1"
# DALI's error when a sample lacks one of the requested extensions (missing_component="error")
_UNDERFUL_RE = re.compile(r'Underful sample detected at index file at "([^"]+)" line (\d+)')
# decoder errors that mean "this valid video is outside what the decoder supports"
_DECODER_LIMIT_RE = re.compile(r"too small|too large|too big|not supported|unsupported", re.IGNORECASE)


def _import_dali():
    """Import DALI lazily: the package is an optional extra (``pip install .[dali]``)."""
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath
        from nvidia.dali.pipeline import Pipeline
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DaliVideoLoader needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                          "(the 'dali' extra), or use the PyAV loader (data.backend=pyav)") from e
    return fn, types, dmath, Pipeline


def _member_key(member: str) -> str:
    """``dir/key.ext.more`` -> ``dir/key``: the first dot of the base name splits, as in DALI."""
    dot = member.find(".", member.rfind("/") + 1)
    return member if dot < 0 else member[:dot]


def _idx_header_count(idx: Path) -> int:
    """Number of samples an index declares (first line only: DALI parses the rest itself)."""
    try:
        with open(idx) as f:
            header = f.readline().split()
    except OSError as e:
        raise ShardError(f"cannot read index file {idx}: {e}") from e
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not header[1].isdigit():
        raise ShardError(f"index file {idx}: expected a first line 'v1.2 <num_samples>', got {header}")
    return int(header[1])


@dataclass
class _SampleMeta:
    """What the reader pipeline said about one sample of a micro-batch."""

    shard: str  # tar path as DALI reports it
    member: str  # the video member's name inside the tar
    key: str
    source_info: str  # "<tar>:<offset>:<member>"
    num_frames_total: int
    start: int
    caption: str
    fps: float
    encoded: np.ndarray  # the encoded video bytes (kept to probe a failing micro-batch)
    instructions: list = field(default_factory=list)  # json "instructions" (data.caption_choice=random)
    sidecars: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Pending:
    """A micro-batch read and scheduled for decoding, not yet returned."""

    samples: list[_SampleMeta] | None = None
    checkpoint: bytes = b""  # reader state right after this micro-batch
    error: BaseException | None = None  # raised when this micro-batch is collected


class _BadSamples(Exception):
    """Internal: these samples of the pending micro-batch cannot be decoded."""

    def __init__(self, bad: list[tuple[_SampleMeta, str]]) -> None:
        super().__init__(", ".join(s.source_info for s, _ in bad))
        self.bad = bad


class DaliVideoLoader:
    """Infinite iterator of micro-batches of video clips for ONE data-parallel rank, via DALI.

    Each micro-batch is a dict like the PyAV path's (:class:`nemo_ext.data.dataset.VideoClipDataset`
    + ``collate_clips``): ``video`` float32 ``[B, 3, F, H, W]`` in [-1, 1] (CPU tensor for
    ``device="cpu"``, CUDA tensor on ``device_id`` for ``device="gpu"``), ``caption`` list[str]
    (json ``caption``, "" if absent), ``key`` list[str] (the tar key), ``fps`` float32 ``[B]``
    (json ``fps``, 0 if absent), ``num_frames_total`` int64 ``[B]`` (from ``nframes.npy``),
    ``sample_seed`` int64 ``[B]`` (unique per position in the global stream:
    ``clip_seed_for(seed, (micro_batch * dp_size + dp_rank) * B + i)``), ``failed_samples`` int64
    ``[B]`` (corrupt samples skipped since the previous micro-batch, counted in element 0), and one
    CPU tensor ``[B, ...]`` per sidecar (key = ext without ``.npy``). Every sample needs
    ``<key>.mp4``, ``<key>.json``, ``<key>.nframes.npy`` and the sidecars.

    Epochs roll over seamlessly: the reader runs with ``pad_last_batch=False`` (with ``True``,
    DALI repeats the shard's last sample to fill the epoch's last batch, i.e. duplicated data in
    an infinite stream), so a micro-batch may span two epochs, and each run of
    :attr:`samples_per_epoch` consecutive samples of this rank is one pass over its part of the
    data. Ranks split the samples (not the shards) as DALI's ``shard_id/num_shards`` does; every
    epoch, each rank moves on to the next rank's part (DALI's ``stick_to_shard=False``).

    Resume: ``state_dict()`` returns bytes (the DALI reader checkpoint plus the exclusion list and
    counters); a loader built with the same arguments and ``state=`` yields exactly the
    micro-batches the saved one would have yielded next.

    Corrupt samples: a micro-batch whose decode fails is probed sample by sample; each sample that
    fails alone is logged (shard, member, DALI's reason), added to :attr:`excluded` /
    :attr:`failed_keys`, and dropped from a filtered copy of its shard's index; the reader is
    rebuilt from the state after the previous micro-batch, so the stream goes on as if the sample
    had never been in the data. Limits: DALI restores a reader by replaying the epoch on the
    filtered index, so with ``shuffle=True`` the rest of *that* epoch follows another shuffle and
    may repeat or miss a few samples (exact with ``shuffle=False``, and in later epochs); and as
    DALI splits the filtered sample count, this rank's part can shift by one sample per exclusion
    (a sample of the next rank seen twice per epoch). A run stops (RuntimeError) once ``failed_samples >
    max_failed_samples``, or ``failed_samples > max_failed_fraction * samples_seen`` with at least
    :attr:`min_samples_for_fraction` samples seen. A video the decoder cannot read by design
    (H.264/HEVC/AV1 on ``device="cpu"``; sizes outside NVDEC's limits on ``device="gpu"``) raises
    ValueError at once and is not counted.
    """

    #: the failure fraction is only judged once this many samples were seen (1 bad of 10 is noise)
    min_samples_for_fraction: int = 100

    def __init__(self, shards: str | os.PathLike | Iterable[str | os.PathLike], num_frames: int,
                 height: int, width: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, stride: int = 1, clip_sampling: str = "random", resize_mode: str = "crop",
                 device: str = "cpu", device_id: int | None = None, num_threads: int = 2,
                 sidecars: Mapping[str, str] | None = None, shuffle: bool = True,
                 initial_fill: int = 64, state: bytes | None = None, max_failed_samples: int = 100,
                 max_failed_fraction: float = 0.01, video_ext: str = "mp4", caption_choice: str = "first") -> None:
        self._check_args(num_frames, height, width, micro_batch_size, dp_rank, dp_size, stride,
                         clip_sampling, resize_mode, device, num_threads, initial_fill,
                         max_failed_samples, max_failed_fraction)
        self.sidecars = self._check_sidecars(sidecars, stride)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.stride = int(seed), stride
        self.clip_sampling, self.resize_mode = clip_sampling, resize_mode
        self.device, self.num_threads = device, num_threads
        self.shuffle, self.initial_fill = shuffle, initial_fill
        self.max_failed_samples, self.max_failed_fraction = max_failed_samples, max_failed_fraction
        self.video_ext = video_ext
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES}, got {caption_choice!r}")
        self.caption_choice = caption_choice
        self.exts = [video_ext, "json", "nframes.npy", *self.sidecars]
        if device == "gpu":
            if device_id is None:
                if not torch.cuda.is_available():
                    raise ValueError('DaliVideoLoader(device="gpu") needs a CUDA GPU; none is visible '
                                     '(use device="cpu" with VP9/VP8/MJPEG videos)')
                device_id = torch.cuda.current_device()
            self.device_id: int | None = int(device_id)
        else:
            self.device_id = None  # DALI 2.x CPU-only pipelines: device_id=None, never CPU_ONLY_DEVICE_ID

        self._tmp: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.shards: list[Path] = self._resolve(shards)
        self._shard_names = [str(p) for p in self.shards]
        self._shard_pos = {name: i for i, name in enumerate(self._shard_names)}
        self._orig_idx: list[Path] = [self._index_for(i, p) for i, p in enumerate(self.shards)]
        self._counts: list[int] = [_idx_header_count(i) for i in self._orig_idx]
        self._idx: list[Path] = list(self._orig_idx)  # current (possibly filtered) index per shard
        self._idx_owner: dict[str, int] = {str(p): i for i, p in enumerate(self._orig_idx)}

        #: samples excluded after a decode failure: (shard position, key)
        self.excluded: list[tuple[int, str]] = []
        #: keys of the excluded samples, in the order they failed
        self.failed_keys: list[str] = []
        self.failed_samples = 0
        #: samples this loader drew from the reader: returned ones plus failed ones
        self.samples_seen = 0
        self.micro_batches = 0  # micro-batches returned (across resumes)
        self._new_failures = 0

        self._reader: Any = None
        self._decoder: Any = None
        self._pending: _Pending | None = None
        self._checkpoint: bytes | None = None
        if state is not None:
            self._load_state(state)
        self._build_reader(self._checkpoint)

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    @property
    def span(self) -> int:
        """Frames a clip covers in the source video, first to last inclusive."""
        return (self.num_frames - 1) * self.stride + 1

    @property
    def num_samples(self) -> int:
        """Samples over all shards, excluded ones not counted."""
        return sum(self._counts)

    @property
    def samples_per_epoch(self) -> int:
        """Samples of this rank's part of the data (DALI's split: ``[N*r//dp, N*(r+1)//dp)``)."""
        n = self.num_samples
        return n * (self.dp_rank + 1) // self.dp_size - n * self.dp_rank // self.dp_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._pending is None:
                self._pending = self._launch()
            pending = self._pending
            try:
                batch = self._collect(pending)
            except _BadSamples as e:
                self._pending = None
                self._recover(e.bad)
                continue
            except BaseException:
                self._pending = None
                raise
            self._checkpoint = pending.checkpoint
            self.samples_seen += len(batch["key"])
            self.micro_batches += 1
            self._check_thresholds()
            self._pending = self._launch()  # read + schedule the next one: decode overlaps the step
            return batch

    def state_dict(self) -> bytes:
        """The position right after the last returned micro-batch (bytes, for the checkpoint).

        Holds the DALI reader checkpoint, the excluded samples (so a resumed loader reads the
        same filtered shards) and the failure/stream counters. The micro-batch already read
        ahead is not part of it: a loader restored from this state reads it again.
        """
        assert self._checkpoint is not None
        state = {
            "format": _STATE_FORMAT,
            "dali_checkpoint": base64.b64encode(self._checkpoint).decode("ascii"),
            "excluded": [[i, k] for i, k in self.excluded],
            "failed_keys": list(self.failed_keys),
            "failed_samples": self.failed_samples,
            "samples_seen": self.samples_seen,
            "micro_batches": self.micro_batches,
            "fingerprint": self._fingerprint(),
        }
        return json.dumps(state, sort_keys=True).encode("utf-8")

    def close(self) -> None:
        """Drop the DALI pipelines and the temporary index files."""
        self._pending = None
        self._reader = None
        self._decoder = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> DaliVideoLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_args(num_frames: int, height: int, width: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int, stride: int, clip_sampling: str, resize_mode: str, device: str,
                    num_threads: int, initial_fill: int, max_failed_samples: int,
                    max_failed_fraction: float) -> None:
        if min(num_frames, height, width, micro_batch_size, stride, num_threads, initial_fill) < 1:
            raise ValueError(
                f"num_frames ({num_frames}), height ({height}), width ({width}), micro_batch_size "
                f"({micro_batch_size}), stride ({stride}), num_threads ({num_threads}) and "
                f"initial_fill ({initial_fill}) must all be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need dp_size >= 1 and 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        if clip_sampling not in _CLIP_SAMPLING:
            raise ValueError(f"clip_sampling must be one of {_CLIP_SAMPLING}, got {clip_sampling!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        if device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
        if max_failed_samples < 0 or not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"need max_failed_samples >= 0 and 0 <= max_failed_fraction <= 1, got "
                             f"{max_failed_samples}, {max_failed_fraction}")

    @staticmethod
    def _check_sidecars(sidecars: Mapping[str, str] | None, stride: int) -> dict[str, str]:
        out = dict(sidecars or {})
        for ext, kind in out.items():
            if kind not in SIDECAR_KINDS:
                raise ValueError(f"sidecar {ext!r}: kind {kind!r} is not one of {SIDECAR_KINDS}")
            if not ext.endswith("npy") or ext in ("nframes.npy",):
                raise ValueError(f"sidecar {ext!r}: expected a '<name>.npy' extension (decoded with "
                                 "fn.decoders.numpy), other than nframes.npy")
            if kind == "transitions" and stride != 1:
                raise ValueError(
                    f"sidecar {ext!r} holds one row per frame-to-frame transition; with stride "
                    f"{stride} a clip's {stride}-step transitions cannot be cut from it (use stride=1)")
        return out

    def _resolve(self, shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
        """Expand dirs/globs/brace patterns/lists to tar paths (errors name the pattern)."""
        specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        if not specs:
            raise ShardError("no shards: the list of shard paths/patterns is empty")
        paths: list[Path] = []
        for spec in specs:
            paths += expand_paths(spec)
        if not paths:
            raise ShardError(f"no shards found for {[os.fspath(s) for s in specs]}")
        return paths

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="dali_idx_"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        return self._tmp

    def _index_for(self, pos: int, tar: Path) -> Path:
        """The tar's ``.idx`` next to it, else one built now into a temp dir.

        DALI can infer a missing index itself, but it then scans the tar on every rank at every
        start and only warns; building it here is explicit and uses the same scanner as data prep.
        """
        idx = tar.with_suffix(".idx")
        if idx.is_file():
            return idx
        logger.warning("shard %s has no index file %s; building one in a temp dir (write index "
                       "files with the shards to avoid this scan)", tar, idx.name)
        out = self._tmpdir() / f"built-{pos:06d}-{tar.stem}.idx"
        return write_idx(tar, index_tar(tar), out)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """What must match between the saving and the resuming loader for the state to mean the
        same position (shard *names*, not full paths: the data may be mounted elsewhere)."""
        return {
            "shards": [p.name for p in self.shards],
            "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size, "seed": self.seed,
            "shuffle": self.shuffle, "initial_fill": self.initial_fill,
            "num_frames": self.num_frames, "stride": self.stride,
            "clip_sampling": self.clip_sampling, "sidecars": sorted(self.sidecars),
        }

    def _load_state(self, state: bytes) -> None:
        try:
            raw = json.loads(bytes(state).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"DaliVideoLoader state is not a state_dict() of this loader: {e}") from e
        fmt = raw.get("format") if isinstance(raw, dict) else None
        if fmt != _STATE_FORMAT:
            raise ValueError(f"DaliVideoLoader state has format {fmt!r}; expected {_STATE_FORMAT!r}")
        saved, now = raw["fingerprint"], self._fingerprint()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items())
                               if k != "shards")
            if "shards" in diff:
                detail = (detail + "; " if detail else "") + (
                    f"shards: saved {len(saved['shards'])} shards, now {len(now['shards'])} "
                    "(names or order differ)")
            raise ValueError(f"cannot resume the DALI loader: the state was saved with other "
                             f"settings ({detail})")
        self._checkpoint = base64.b64decode(raw["dali_checkpoint"])
        self.failed_keys = list(raw["failed_keys"])
        self.failed_samples = int(raw["failed_samples"])
        self.samples_seen = int(raw["samples_seen"])
        self.micro_batches = int(raw["micro_batches"])
        for pos, key in raw["excluded"]:
            self.excluded.append((int(pos), str(key)))
        for pos in sorted({p for p, _ in self.excluded}):
            self._write_filtered_idx(pos)

    def _write_filtered_idx(self, pos: int) -> None:
        """Index of shard ``pos`` without its excluded samples, in the temp dir."""
        drop = {k for p, k in self.excluded if p == pos}
        samples = [s for s in read_idx(self._orig_idx[pos]) if _member_key(s[0][3]) not in drop]
        out = self._tmpdir() / f"filtered-{pos:06d}-{self.shards[pos].stem}.idx"
        self._idx[pos] = write_idx(self.shards[pos], samples, out)
        self._idx_owner[str(self._idx[pos])] = pos
        self._counts[pos] = len(samples)

    # ------------------------------------------------------------------------------------------
    # pipelines
    # ------------------------------------------------------------------------------------------
    def _build_reader(self, checkpoint: bytes | None) -> None:
        """(Re)build the reader pipeline, restored from ``checkpoint`` when given."""
        fn, types, dmath, Pipeline = _import_dali()
        live = [i for i in range(len(self.shards)) if self._counts[i] > 0]
        if not live:
            raise RuntimeError(f"every sample of the {len(self.shards)} shards was excluded as "
                               f"corrupt (failed: {self.failed_keys[:10]})")
        self._reader = None
        pipe = Pipeline(batch_size=self.micro_batch_size, num_threads=self.num_threads,
                        device_id=None, seed=clip_seed_for(self.seed, 1_000_003 + self.dp_rank),
                        prefetch_queue_depth=1, enable_checkpointing=True, checkpoint=checkpoint)
        with pipe:
            outs = fn.readers.webdataset(
                paths=[self._shard_names[i] for i in live],
                index_paths=[str(self._idx[i]) for i in live],
                ext=self.exts, missing_component_behavior="error",
                shard_id=self.dp_rank, num_shards=self.dp_size,
                random_shuffle=self.shuffle, initial_fill=self.initial_fill, seed=self.seed,
                pad_last_batch=False, name="Reader")
            encoded, meta, nframes, *side = outs
            n = fn.reshape(fn.cast(fn.decoders.numpy(nframes), dtype=types.INT32), shape=[])
            last = dmath.max(n - self.span, 0)  # latest clip start
            if self.clip_sampling == "random":
                u = fn.random.uniform(range=[0.0, 1.0])  # [0, 1): start uniform in [0, last]
                start = fn.cast(u * fn.cast(last + 1, dtype=types.FLOAT), dtype=types.INT32)
                start = dmath.min(start, last)
            else:
                start = n * 0
            pipe.set_outputs(encoded, meta, n, start, encoded.source_info(),
                             *[fn.decoders.numpy(s) for s in side])
        try:
            pipe.build()
        except RuntimeError as e:
            raise self._reader_error(e) from e
        self._reader = pipe
        if self._checkpoint is None:
            self._checkpoint = pipe.checkpoint()  # "nothing read yet": recovery may return here

    def _build_decoder(self, batch_size: int) -> Any:
        """The stateless decode pipeline: encoded bytes + clip start -> ``CFHW`` float clips."""
        fn, types, dmath, Pipeline = _import_dali()
        H, W = self.height, self.width
        pipe = Pipeline(batch_size=batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        seed=0, prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
            video = fn.decoders.video(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                      start_frame=start, sequence_length=self.num_frames,
                                      stride=self.stride, pad_mode="none")
            shape = video.shape(device="cpu")  # [F, h, w, C]; F < num_frames if the video is short
            # >= 1 so that a degenerate (empty) decode can never divide by zero in-graph; such a
            # sample is caught afterwards by the frame-count check
            h, w = dmath.max(shape[1], 1), dmath.max(shape[2], 1)

            def rounded_div(a: Any, b: Any) -> Any:
                # round(a / b) for a, b >= 0 with Python's round-half-to-even, in integers: the
                # same sizes as video._target_hw's round(h * scale), without float drift
                q = a // b
                r = a - q * b
                up = (r * 2 > b) | ((r * 2 == b) & (q % 2 == 1))
                return q + fn.cast(up, dtype=types.INT64)

            if self.resize_mode == "crop":  # scale = max(H/h, W/w): cover, then centre-crop
                height_rules = (w * H) >= (W * h)
            else:  # scale = min(H/h, W/w): fit, then centre on black
                height_rules = (w * H) <= (W * h)
            by_h = fn.cast(height_rules, dtype=types.INT64)
            new_h = by_h * H + (1 - by_h) * rounded_div(h * W, w)
            new_w = by_h * rounded_div(w * H, h) + (1 - by_h) * W
            if self.resize_mode == "crop":
                new_h, new_w = dmath.max(new_h, H), dmath.max(new_w, W)
                top, left = (new_h - H) // 2, (new_w - W) // 2
            else:
                new_h, new_w = dmath.clamp(new_h, 1, H), dmath.clamp(new_w, 1, W)
                top, left = -((H - new_h) // 2), -((W - new_w) // 2)  # negative: padding
            size = fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT)
            # bilinear with antialiasing, like torch's interpolate(antialias=True) in video._resize;
            # resizing to the same size is an identity (checked in the tests)
            video = fn.resize(video, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            anchor = fn.cast(fn.stack(top, left), dtype=types.INT32)
            video = fn.slice(video, anchor, np.array([H, W], dtype=np.int32), axes=[1, 2],
                             out_of_bounds_policy="pad", fill_values=0)
            video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, mean=[127.5] * 3,
                                             std=[127.5] * 3, output_layout="CFHW")
            pipe.set_outputs(video, fn.cast(shape[0], dtype=types.INT32))
        pipe.build()
        return pipe

    def _reader_error(self, e: BaseException) -> BaseException:
        """Turn DALI's reader errors into ones that name the shard, the key and what is missing."""
        text = str(e)
        m = _UNDERFUL_RE.search(text)
        if m:
            idx_path, line = m.group(1), int(m.group(2))
            pos = self._idx_owner.get(idx_path)
            tar = self._shard_names[pos] if pos is not None else idx_path
            try:
                incomplete = [(sample, [x for x in self.exts if x not in {e for e, _, _, _ in sample}])
                              for sample in read_idx(idx_path)]
                incomplete = [(sample, miss) for sample, miss in incomplete if miss]
            except ShardError:
                incomplete = []
            if incomplete:
                sample, missing = incomplete[0]
                have = sorted(ext for ext, _, _, _ in sample)
                more = (f" ({len(incomplete) - 1} more samples of this shard too)"
                        if len(incomplete) > 1 else "")
                return ShardError(f"shard {tar}: sample {_member_key(sample[0][3])!r} is missing "
                                  f"{', '.join(missing)} (it has: {', '.join(have)}; required: "
                                  f"{', '.join(self.exts)}){more}")
            return ShardError(f"shard {tar}: the sample at line {line} of {idx_path} is missing a "
                              f"required member (required: {', '.join(self.exts)})")
        return RuntimeError(f"the DALI reader failed on shards {self._shard_names[:3]}"
                            f"{'...' if len(self.shards) > 3 else ''}: {_dali_message(text)}")

    # ------------------------------------------------------------------------------------------
    # one micro-batch
    # ------------------------------------------------------------------------------------------
    def _launch(self) -> _Pending:
        """Read the next micro-batch and schedule its decode (errors surface when collected)."""
        try:
            try:
                out = self._reader.run()
            except RuntimeError as e:
                raise self._reader_error(e) from e
            checkpoint = self._reader.checkpoint()
            samples = self._parse(out)
            if self._decoder is None:
                self._decoder = self._build_decoder(self.micro_batch_size)
            self._decoder.feed_input("encoded", out[0])  # TensorList: keeps source_info for errors
            self._decoder.feed_input("start", [np.array(s.start, dtype=np.int32) for s in samples])
            self._decoder.schedule_run()
            return _Pending(samples=samples, checkpoint=checkpoint)
        except Exception as e:  # noqa: BLE001 - delivered with the micro-batch it belongs to
            return _Pending(error=e)

    def _parse(self, out: list[Any]) -> list[_SampleMeta]:
        encoded, meta, nframes, start, source = out[:5]
        side = out[5:]
        samples = []
        for i in range(len(encoded)):
            info = bytes(np.array(source[i])).decode("utf-8", "replace")
            shard, _, member = info.rsplit(":", 2)
            key = _member_key(member)
            n = int(np.array(nframes[i]))
            if n < self.span:
                raise ShardError(
                    f"shard {shard}: sample {key!r} has {n} frames (nframes.npy), fewer than the "
                    f"{self.span} a clip needs ({self.num_frames} frames with stride {self.stride})")
            try:
                info_json = json.loads(bytes(np.array(meta[i])).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ShardError(f"shard {shard}: {key}.json is not valid JSON: {e}") from e
            if not isinstance(info_json, dict):
                info_json = {}
            s = _SampleMeta(shard=shard, member=member, key=key, source_info=info,
                            num_frames_total=n, start=int(np.array(start[i])),
                            caption=str(info_json.get("caption") or ""),
                            fps=float(info_json.get("fps", 0.0) or 0.0),
                            encoded=np.array(encoded[i]),
                            instructions=list(info_json.get("instructions") or []))
            for (ext, kind), arrays in zip(self.sidecars.items(), side):
                s.sidecars[ext] = self._cut_sidecar(np.array(arrays[i]), ext, kind, s)
            samples.append(s)
        return samples

    def _cut_sidecar(self, arr: np.ndarray, ext: str, kind: str, s: _SampleMeta) -> np.ndarray:
        """A numeric sidecar cut to the clip, as VideoClipDataset cuts it."""
        if arr.dtype.kind not in "biuf":
            raise ShardError(f"shard {s.shard}: {s.key}.{ext} has dtype {arr.dtype}; expected a "
                             "numeric array")
        if kind == "static":
            return arr
        rows = s.num_frames_total if kind == "frames" else s.num_frames_total - 1
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise ShardError(
                f"shard {s.shard}: {s.key}.{ext} has shape {tuple(arr.shape)}; expected {rows} rows "
                f"(one per {'frame' if kind == 'frames' else 'transition'} of its "
                f"{s.num_frames_total} frames)")
        if kind == "frames":
            return arr[s.start: s.start + self.span: self.stride]
        return arr[s.start: s.start + self.num_frames - 1]

    def _collect(self, pending: _Pending) -> dict[str, Any]:
        """Wait for the decode of ``pending`` and assemble the micro-batch dict."""
        if pending.error is not None:
            raise pending.error
        samples = pending.samples
        assert samples is not None
        try:
            video_tl, frames_tl = self._decoder.outputs()
        except RuntimeError as e:
            self._decoder = None  # a failed DALI pipeline is dead
            raise _BadSamples(self._find_bad(samples, e)) from e
        got = [int(np.array(frames_tl[i])) for i in range(len(samples))]
        short = [(s, f"decoded only {g} of the {self.num_frames} frames asked for from frame "
                     f"{s.start} with stride {self.stride} (nframes.npy says {s.num_frames_total})")
                 for s, g in zip(samples, got) if g < self.num_frames]
        if short:
            raise _BadSamples(short)
        video = _to_torch(video_tl.as_tensor(), self.device_id)
        base = (self.micro_batches * self.dp_size + self.dp_rank) * self.micro_batch_size
        seeds = [clip_seed_for(self.seed, base + i) for i in range(len(samples))]
        batch: dict[str, Any] = {
            "video": video,
            "caption": [caption_for({"caption": s.caption, "instructions": s.instructions}, seed, self.caption_choice)
                        for s, seed in zip(samples, seeds)],
            "key": [s.key for s in samples],
            "fps": torch.tensor([s.fps for s in samples], dtype=torch.float32),
            "num_frames_total": torch.tensor([s.num_frames_total for s in samples], dtype=torch.int64),
        }
        batch["sample_seed"] = torch.tensor(seeds, dtype=torch.int64)
        failed = torch.zeros(len(samples), dtype=torch.int64)
        failed[0] = self._new_failures
        self._new_failures = 0
        batch["failed_samples"] = failed
        for ext in self.sidecars:
            arrays = [s.sidecars[ext] for s in samples]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ShardError(f"sidecar {ext!r} has different shapes in one micro-batch "
                                 f"({', '.join(f'{s.key}: {a.shape}' for s, a in zip(samples, arrays))}); "
                                 "they must stack")
            name = ext[: -len(".npy")] if ext.endswith(".npy") else ext
            batch[name] = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
        return batch

    # ------------------------------------------------------------------------------------------
    # corrupt samples
    # ------------------------------------------------------------------------------------------
    def _find_bad(self, samples: list[_SampleMeta], error: BaseException) -> list[tuple[_SampleMeta, str]]:
        """Which samples of a micro-batch made the decoder fail.

        DALI names the sample only for some errors ("Failed to create video decoder for
        "<tar>:<offset>:<member>""); a stream that breaks mid-way says "memory file" or nothing.
        So each sample is decoded alone in a one-sample pipeline, and the ones that fail are the
        bad ones. A video the decoder cannot handle by design is a configuration error, raised
        and not counted: an H.264/HEVC/AV1 stream on the CPU backend, or a size outside NVDEC's
        limits (seen on an H200: "Video is too small in at least one dimension. Provided: 64x64
        vs supported:128x128" for VP9).
        """
        message = _dali_message(str(error))
        if self.device == "cpu":
            for s in samples:
                header = _video_header(s.encoded)
                if header is not None and header[0] not in CPU_CODECS:
                    raise ValueError(
                        f"shard {s.shard}: member {s.member} is {header[0]}; DALI's CPU video decoder "
                        f"(device=\"cpu\") reads {'/'.join(c.upper() for c in CPU_CODECS)} only. "
                        f"H.264/HEVC/AV1 need NVDEC: use device=\"gpu\", or the PyAV loader on CPU")
        named = [s for s in samples if s.source_info in message]
        bad: list[tuple[_SampleMeta, str]] = []
        probe = None
        for s in samples:
            if named and s not in named:
                continue
            if probe is None:
                probe = self._build_decoder(1)
            probe.feed_input("encoded", [s.encoded])
            probe.feed_input("start", [np.array(s.start, dtype=np.int32)])
            try:
                probe.run()
            except RuntimeError as e:
                reason = _dali_message(str(e))
                self._raise_if_decoder_limit(s, reason)
                bad.append((s, reason))
                probe = None  # dead; the next sample gets a fresh one
        if not bad:
            raise RuntimeError(
                "the DALI video decoder failed on a micro-batch but every one of its samples "
                f"decodes on its own ({', '.join(s.source_info for s in samples)}), so this is not "
                f"a corrupt video: {message}") from error
        return bad

    def _raise_if_decoder_limit(self, s: _SampleMeta, reason: str) -> None:
        """Raise if ``reason`` is a decoder limit hit by a well-formed video (not corruption).

        The header check keeps a corrupt file whose header claims a nonsense size from being
        reported as a configuration error: it must open cleanly with PyAV to count as well-formed.
        """
        if not _DECODER_LIMIT_RE.search(reason):
            return
        header = _video_header(s.encoded)
        if header is None:
            return
        codec, width, height = header
        backend = "NVDEC (device=\"gpu\")" if self.device == "gpu" else "CPU (device=\"cpu\")"
        raise ValueError(
            f"shard {s.shard}: member {s.member} ({codec}, {width}x{height}) is a valid video that "
            f"DALI's {backend} video decoder cannot decode: {reason}. This is a decoder limit, not a "
            "corrupt file: re-encode the videos (e.g. at least 128x128 for NVDEC VP9) or use the "
            "other backend")

    def _recover(self, bad: list[tuple[_SampleMeta, str]]) -> None:
        """Exclude ``bad`` and rebuild the reader from the state after the last good micro-batch."""
        seen: set[tuple[str, str]] = set()
        for s, reason in bad:
            if (s.shard, s.key) in seen:  # a tiny shard can put one sample twice in a micro-batch
                continue
            seen.add((s.shard, s.key))
            pos = self._shard_pos.get(s.shard)
            if pos is None:
                raise RuntimeError(f"DALI reported sample {s.source_info} from a shard this loader "
                                   "does not know")
            self.excluded.append((pos, s.key))
            self.failed_keys.append(s.key)
            self.failed_samples += 1
            self.samples_seen += 1
            self._new_failures += 1
            logger.warning("skipping corrupt sample %s in shard %s (member %s): %s [%d failed so far]",
                           s.key, s.shard, s.member, reason, self.failed_samples)
            self._write_filtered_idx(pos)
        self._check_thresholds()
        self._decoder = None
        self._build_reader(self._checkpoint)

    def _check_thresholds(self) -> None:
        too_many = self.failed_samples > self.max_failed_samples
        too_often = (self.samples_seen >= self.min_samples_for_fraction
                     and self.failed_samples > self.max_failed_fraction * self.samples_seen)
        if too_many or too_often:
            which = (f"max_failed_samples={self.max_failed_samples}" if too_many else
                     f"max_failed_fraction={self.max_failed_fraction} (of {self.samples_seen} "
                     "samples seen)")
            shown = ", ".join(self.failed_keys[:10]) + (" ..." if len(self.failed_keys) > 10 else "")
            raise RuntimeError(
                f"DALI loader (dp rank {self.dp_rank}): {self.failed_samples} corrupt samples "
                f"skipped after {self.samples_seen} seen, over {which}; failed keys: {shown}. "
                "Fix or re-prepare those shards (data prep validates every video with PyAV).")


def _dali_message(text: str) -> str:
    """The informative part of a DALI error (it repeats the pipeline traceback around it)."""
    i = text.find("encountered:")
    core = text[i + len("encountered:"):] if i >= 0 else text
    core = core.split("Current pipeline object is no longer valid")[0]
    core = re.sub(r"\s*C\+\+ context: \[[^\]]*\]\s*", " ", core)
    return " ".join(core.split())


def _video_header(encoded: np.ndarray) -> tuple[str, int, int] | None:
    """(codec, width, height) of an encoded stream from a PyAV header probe; None if unreadable."""
    import av

    try:
        with av.open(io.BytesIO(encoded.tobytes()), mode="r") as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            return ctx.name, ctx.width, ctx.height
    except Exception:  # noqa: BLE001 - unreadable: the decoder probe decides
        return None


def _to_torch(tensor: Any, device_id: int | None) -> torch.Tensor:
    """Copy a dense DALI tensor into a new torch tensor (CPU, or CUDA on ``device_id``)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device_id is not None else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out
