"""CPU/PyAV training loader: a map-style clip dataset and a resumable data-parallel sampler.

The sampler, not the dataset, owns all randomness: it hands the dataset ``(sample_idx,
clip_seed)`` pairs that are pure functions of ``(seed, position in the global stream)``. So the
data a step sees depends only on the step number, the seed and the data-parallel layout: a
resumed run (``start_step=k``) sees exactly what an uninterrupted one would, whatever the number
of DataLoader workers, and no loader state has to be checkpointed.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_ext.data.shards import ShardError, ShardIndex
from nemo_ext.data.video import VideoDecodeError, decode_frames, resize_and_crop

logger = logging.getLogger(__name__)

__all__ = ["VideoClipDataset", "DataParallelBatchSampler", "collate_clips", "clip_seed_for", "SIDECAR_KINDS"]

_CLIP_SAMPLING = ("random", "start")
# How a numeric sidecar lines up with the video: one row per frame, one per frame-to-frame
# transition (an episode of T frames has T-1 actions), or not per time step.
SIDECAR_KINDS = ("frames", "transitions", "static")
_RESIZE_MODES = ("crop", "pad")


CAPTION_CHOICES = ("first", "random")


def caption_for(meta: dict, sample_seed: int, choice: str = "first") -> str:
    """A sample's caption: json ``caption`` (``first``), or one of json ``instructions`` drawn from the
    sample's seed (``random``: one instruction per draw of the sample, the same in every loader and on
    resume); "" when the json has neither."""
    if choice == "random":
        options = [str(t) for t in (meta.get("instructions") or []) if t] or [str(meta.get("caption") or "")]
        return options[random.Random(f"caption:{sample_seed}").randrange(len(options))]
    return str(meta.get("caption") or "")


class VideoClipDataset(Dataset):
    """Clips of ``num_frames`` frames (every ``stride``-th), resized to ``height x width``.

    ``__getitem__((sample_idx, clip_seed))`` returns ``video`` float32 ``[3, F, H, W]`` in
    [-1, 1], ``caption`` (:func:`caption_for`: json ``caption``, or one of its ``instructions``), ``key``,
    ``fps`` (json ``fps``) and
    ``num_frames_total``. The clip starts at 0 (``clip_sampling="start"``) or uniformly at random
    in ``[0, n - span]`` drawn from ``random.Random(clip_seed)`` (``"random"``), where
    ``span = (num_frames - 1) * stride + 1`` and ``n`` comes from ``nframes.npy`` (else json
    ``num_frames``).
    """

    def __init__(self, index: ShardIndex, num_frames: int, height: int, width: int, stride: int = 1,
                 clip_sampling: str = "random", resize_mode: str = "crop",
                 video_ext: str = "mp4", sidecars: dict[str, str] | None = None,
                 max_substitutions: int = 8, caption_choice: str = "first") -> None:
        if num_frames < 1 or stride < 1 or height < 1 or width < 1:
            raise ValueError(f"need num_frames, stride, height, width >= 1; got {num_frames}, "
                             f"{stride}, {height}, {width}")
        if clip_sampling not in _CLIP_SAMPLING:
            raise ValueError(f"clip_sampling must be one of {_CLIP_SAMPLING}, got {clip_sampling!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES}, got {caption_choice!r}")
        self.caption_choice = caption_choice
        self.index = index
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.stride = stride
        self.clip_sampling = clip_sampling
        self.resize_mode = resize_mode
        self.video_ext = video_ext
        self.sidecars = dict(sidecars or {})
        for ext, kind in self.sidecars.items():
            if kind not in SIDECAR_KINDS:
                raise ValueError(f"sidecar {ext!r}: kind {kind!r} is not one of {SIDECAR_KINDS}")
            if kind == "transitions" and stride != 1:
                raise ValueError(f"sidecar {ext!r} holds per-transition rows; it needs data.frame_stride=1, got {stride}")
        self.max_substitutions = max_substitutions

    @property
    def span(self) -> int:
        """Frames a clip covers in the source video, first to last inclusive."""
        return (self.num_frames - 1) * self.stride + 1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        """The clip of ``item``; a video that fails to decode (corrupt) is replaced by the next
        decodable sample in index order and counted in ``failed_samples`` (data bugs such as a
        missing member or a bad sidecar raise ShardError)."""
        sample_idx, clip_seed = item if isinstance(item, tuple) else (int(item), int(item))
        failed: list[str] = []
        for attempt in range(self.max_substitutions + 1):
            idx = (sample_idx + attempt) % len(self.index)
            try:
                out = self._load(idx, clip_seed)
            except VideoDecodeError as e:
                ref = self.index[idx]
                logger.warning("skipping corrupt video %s:%s.%s: %s", ref.shard, ref.key, self.video_ext, e)
                failed.append(f"{ref.shard.name}:{ref.key}")
                continue
            out["failed_samples"] = len(failed)
            out["sample_seed"] = int(clip_seed)
            return out
        raise ShardError(f"{len(failed)} consecutive samples failed to decode: {failed}")

    def _load(self, sample_idx: int, clip_seed: int) -> dict[str, Any]:
        ref = self.index[sample_idx]
        meta = self._meta(sample_idx)
        total = self._total_frames(sample_idx, meta)
        if total < self.span:
            raise ShardError(
                f"shard {ref.shard}: sample {ref.key!r} has {total} frames, fewer than the "
                f"{self.span} a clip needs ({self.num_frames} frames with stride {self.stride})"
            )
        start = 0 if self.clip_sampling == "start" else random.Random(clip_seed).randint(0, total - self.span)
        data = self.index.read(sample_idx, self.video_ext)
        frames = decode_frames(data, start, self.num_frames, self.stride)
        frames = resize_and_crop(frames, self.height, self.width, self.resize_mode)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)
        out = {
            "video": video.contiguous(),
            "caption": caption_for(meta, clip_seed, self.caption_choice),
            "key": ref.key,
            "fps": float(meta.get("fps", 0.0)),
            "num_frames_total": int(total),
        }
        for ext, kind in self.sidecars.items():
            out[ext[: -len(".npy")] if ext.endswith(".npy") else ext] = self._sidecar(sample_idx, ext, kind, total, start)
        return out

    def _sidecar(self, i: int, ext: str, kind: str, total: int, start: int) -> torch.Tensor:
        """A numeric sidecar sliced to the clip: per-frame rows (``frames``), per-transition rows
        (``transitions``, total - 1 of them) or as stored (``static``)."""
        ref = self.index[i]
        try:
            arr = np.load(io.BytesIO(self.index.read(i, ext)), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ShardError(f"shard {ref.shard}: {ref.key}.{ext} is not a readable .npy array: {e}") from e
        if arr.dtype.kind not in "biuf":
            raise ShardError(f"shard {ref.shard}: {ref.key}.{ext} has dtype {arr.dtype}; expected a numeric array")
        if kind != "static":
            rows = total if kind == "frames" else total - 1
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise ShardError(
                    f"shard {ref.shard}: {ref.key}.{ext} has shape {arr.shape}; expected {rows} rows "
                    f"(one per {'frame' if kind == 'frames' else 'transition'} of its {total} frames)"
                )
            if kind == "frames":
                arr = arr[start : start + self.span : self.stride]
            else:
                arr = arr[start : start + self.num_frames - 1]
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _meta(self, i: int) -> dict[str, Any]:
        if not self.index.has(i, "json"):
            return {}
        raw = self.index.read(i, "json")
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            ref = self.index[i]
            raise ShardError(f"shard {ref.shard}: {ref.key}.json is not valid JSON: {e}") from e
        return meta if isinstance(meta, dict) else {}

    def _total_frames(self, i: int, meta: dict[str, Any]) -> int:
        ref = self.index[i]
        if self.index.has(i, "nframes.npy"):
            arr = np.load(io.BytesIO(self.index.read(i, "nframes.npy")), allow_pickle=False)
            return int(np.asarray(arr).reshape(-1)[0])
        if "num_frames" in meta:
            return int(meta["num_frames"])
        raise ShardError(f"shard {ref.shard}: sample {ref.key!r} has neither a nframes.npy member "
                         "nor a json 'num_frames' field; the clip sampler needs the frame count")


def clip_seed_for(seed: int, position: int) -> int:
    """A well-mixed 31-bit seed from (seed, global position): splitmix64 of the pair."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFF


class DataParallelBatchSampler:
    """Infinite, step-resumable micro-batches of ``(sample_idx, clip_seed)`` for one DP rank.

    The global stream of positions ``p = 0, 1, ...`` maps to samples by concatenating, epoch
    after epoch, a permutation of ``range(num_samples)`` seeded by ``(seed, epoch)`` (identity
    when ``shuffle=False``). Step ``s`` consumes positions ``[s*G, (s+1)*G)``; rank ``r`` takes
    the contiguous slice ``[s*G + r*G/dp, s*G + (r+1)*G/dp)`` as ``G/(dp*mbs)`` micro-batches.
    Starting at ``start_step=k`` therefore equals skipping ``k*G/(dp*mbs)`` micro-batches.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, start_step: int = 0,
                 shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"the dataset has {num_samples} samples; need at least one")
        if micro_batch_size < 1 or global_batch_size < 1 or dp_size < 1:
            raise ValueError(f"data.micro_batch_size ({micro_batch_size}), data.global_batch_size "
                             f"({global_batch_size}) and the data-parallel size ({dp_size}) must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"data.global_batch_size ({global_batch_size}) must be divisible by "
                f"data.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size}) "
                f"= {micro_batch_size * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_at(self, position: int) -> int:
        """Sample index at a global stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        assert self._perm is not None
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.global_batch_size // self.dp_size
        mbs = self.micro_batch_size
        step = self.start_step
        while True:
            base = step * self.global_batch_size + self.dp_rank * per_rank
            for m in range(self.micro_batches_per_step):
                positions = range(base + m * mbs, base + (m + 1) * mbs)
                yield [(self.sample_at(p), clip_seed_for(self.seed, p)) for p in positions]
            step += 1


def collate_clips(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors are stacked, numbers become tensors, strings stay lists."""
    if not items:
        raise ValueError("collate_clips got an empty batch")
    out: dict[str, Any] = {}
    for name in items[0]:
        values = [it[name] for it in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[name] = torch.stack(values)
        elif isinstance(first, bool):
            out[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            out[name] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            out[name] = torch.tensor(values, dtype=torch.float32)
        else:
            out[name] = list(values)
    return out
