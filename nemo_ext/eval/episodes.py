"""Held-out episodes for the evaluation core: whole videos (not training clips) with their caption,
json and the task's signals, resized like the run's training data."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from nemo_ext.data.signals import Signal


class EvalError(ValueError):
    """A run or its data cannot be evaluated (the message says why)."""


@dataclass
class Episode:
    """One whole episode: ``frames`` [3, T, H, W] in [-1, 1] at the run's size, its task signals by
    batch key (e.g. ``actions`` [T - 1, D] float32), caption and json."""

    key: str
    index: int  # position in the evaluated split
    frames: torch.Tensor
    signals: dict = field(default_factory=dict)
    caption: str = ""
    fps: Optional[float] = None
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[1]


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _signal(index, i: int, sig: Signal, total: int, path: str, dims: Optional[tuple]) -> torch.Tensor:
    arr = np.load(io.BytesIO(index.read(i, sig.ext)), allow_pickle=False)
    key = index.key(i)
    rows = {"frames": total, "transitions": total - 1}.get(sig.align)
    if rows is not None and (arr.ndim != 2 or arr.shape[0] != rows):
        per = "transition" if sig.align == "transitions" else "frame"
        raise EvalError(f"{path}: {key}.{sig.ext} has shape {arr.shape}; expected [{rows}, dims] (one row per {per} "
                        f"of its {total} frames)")
    if dims is not None and arr.shape[-1] != dims[0]:
        raise EvalError(f"{path}: {key}.{sig.ext} has {arr.shape[-1]} dims per row but the run's {dims[1]}={dims[0]}")
    return torch.from_numpy(arr.astype(np.float32))


def read_episodes(paths: Sequence[str], height: int, width: int, *, signals: Sequence[Signal] = (),
                  dims: Optional[dict] = None, num: Optional[int] = None, start: int = 0,
                  resize_mode: str = "crop", what: str = "data") -> list[Episode]:
    """Whole episodes (video + json + ``signals``) of shard paths, ``start`` to ``start + num``;
    ``dims``: {batch key: (expected last dimension, the config key that says so)} of signals."""
    from nemo_ext.data.shards import ShardIndex
    from nemo_ext.data.video import decode_frames, probe_video, resize_and_crop

    episodes: list[Episode] = []
    position = 0
    dims = dims or {}
    for path in paths:
        try:
            index = ShardIndex.from_paths(path, required_exts=("mp4", *(s.ext for s in signals)))
        except Exception as exc:  # noqa: BLE001 - missing / empty / without the signals: say which
            raise EvalError(f"cannot read episodes from the {what} at {path}: {exc}") from exc
        try:
            for i in range(len(index)):
                if position < start:
                    position += 1
                    continue
                if num is not None and len(episodes) >= num:
                    break
                meta = json.loads(index.read(i, "json")) if index.has(i, "json") else {}
                data = index.read(i, "mp4")
                total = probe_video(data).num_frames
                frames = resize_and_crop(decode_frames(data, 0, total), height, width, resize_mode)
                values = {s.batch_key: _signal(index, i, s, total, path, dims.get(s.batch_key)) for s in signals}
                fps = float(meta.get("fps") or 0) or None
                episodes.append(Episode(key=index.key(i), index=position, frames=to_video(frames), signals=values,
                                        caption=str(meta.get("caption") or ""), fps=fps, meta=meta))
                position += 1
        finally:
            index.close()
        if num is not None and len(episodes) >= num:
            break
    return episodes


def episodes_of_run(cfg, signals: Sequence[Signal] = (), dims: Optional[dict] = None, split: str = "val",
                    num: Optional[int] = None, start: int = 0) -> tuple[list[Episode], str]:
    """The run's held-out (``val``) or training (``train``) episodes, and where they came from."""
    from nemo_ext.config.compose import ConfigError
    from nemo_ext.eval.generation import data_split_path

    if split not in ("val", "train"):
        raise EvalError(f"split={split!r}: expected val or train")
    if cfg.data.frame_stride != 1 and any(s.align == "transitions" for s in signals):
        raise EvalError(f"data.frame_stride={cfg.data.frame_stride}: the task's signals are per transition, evaluation "
                        "needs stride 1")
    try:
        named, _ = data_split_path(cfg, split)
    except ConfigError as exc:
        raise EvalError(f"no held-out episodes: {exc}") from exc
    paths = [p for _, p in named]
    episodes = read_episodes(paths, cfg.data.height, cfg.data.width, signals=signals, dims=dims, num=num, start=start,
                             resize_mode=cfg.data.resize_mode,
                             what="held-out data" if split == "val" else "training data")
    if not episodes:
        raise EvalError(f"no {'held-out' if split == 'val' else 'training'} episodes in {', '.join(paths)}"
                        + (f" from index {start}" if start else ""))
    return episodes, ", ".join(paths)
