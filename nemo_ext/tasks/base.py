"""The task plugin interface (DESIGN.md section 3).

A task is data + conditioning, never a model fork. It declares its config dataclass (stored in the
``task`` config group), the shard members it reads, the sample-world variant that provides data for
its embedded default, the extra latent channels it adds, the model families it supports, and a
``conditioner``: a trainable module mapping a batch to :class:`~nemo_ext.conditioning.Conditioning`.
New conditioning paths start at zero so that step 0 of a post-trained model equals the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple

import torch.nn as nn


@dataclass
class TaskConfig:
    name: str = "task"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type
    families: Tuple[str, ...]
    # Shard members every sample must have (besides the video), e.g. ("json",) or ("json", "actions.npy").
    sample_exts: Tuple[str, ...]
    # The procedural sample-world variant that provides data for the embedded default run.
    sample_variant: str
    # (task_cfg, model_cfg, data_cfg) -> nn.Module; its forward(batch: dict) returns a Conditioning.
    # data_cfg lets a conditioner read statistics data_prep stored with the shards.
    build_conditioner: Callable[..., nn.Module]
    # (task_cfg, model_cfg) -> number of channels concatenated to the latent input.
    extra_channels: Callable[..., int] = lambda task_cfg, model_cfg: 0
    # Numeric per-sample arrays the task reads, ``<ext>`` -> how they line up with the video:
    # "frames" (a row per frame), "transitions" (a row per frame-to-frame step: T-1 for T frames)
    # or "static". Loaders cut them to the clip; e.g. {"actions.npy": "transitions"}.
    sidecars: Mapping[str, str] = field(default_factory=dict)
    # Whether the task reads the caption text (T5). A task that does not gets no text encoder; its
    # conditioner fills the cross-attention context itself (zeros, or action tokens for AR).
    uses_text: Callable[..., bool] = lambda task_cfg: True
    # (task_cfg, run cfg) -> None: raise ValueError naming the keys when the task cannot run this
    # configuration (called by make_plan before any work starts).
    check: Callable[..., None] = lambda task_cfg, cfg: None
    description: str = ""


_REGISTRY: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"task {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_tasks() -> list[TaskSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
