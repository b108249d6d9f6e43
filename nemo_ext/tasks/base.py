"""The task plugin interface (DESIGN.md section 3).

A task is data + conditioning, never a model fork. It declares its config dataclass (stored in the
``task`` config group), the shard members and signals it reads, the sample world that provides data
for its embedded default, the extra latent channels it adds, the model families it supports, and a
``conditioner``: a trainable module mapping a batch to :class:`~nemo_ext.conditioning.Conditioning`.
New conditioning paths start at zero so that step 0 of a post-trained model equals the base model.

A task is a package ``nemo_ext/tasks/<task>/`` that registers its TaskSpec, its world
(:func:`nemo_ext.worlds.register_world`) and its evaluation (:func:`nemo_ext.eval.core.register_evaluation`)
when imported; ``nemo_ext.tasks`` imports every such package, and the registries import
``nemo_ext.tasks`` the first time they are asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch.nn as nn

from nemo_ext.data.signals import Signal
from nemo_ext.registry import Registry, import_task_packages


@dataclass
class TaskConfig:
    name: str = "task"
    # Probability of replacing the caption by the empty prompt (classifier-free guidance training:
    # sample with --guidance > 1); read by both families' text conditioning.
    caption_dropout: float = 0.0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type
    families: Tuple[str, ...]
    # Shard members every sample must have (besides the video), e.g. ("json",).
    sample_exts: Tuple[str, ...]
    # The procedural sample world (nemo_ext.worlds) of the embedded default run: data.sample_variant.
    world: str
    # (task_cfg, model_cfg, data_cfg) -> nn.Module; its forward(batch: dict) returns a Conditioning.
    # data_cfg lets a conditioner read statistics data_prep stored with the shards.
    build_conditioner: Callable[..., nn.Module]
    # (task_cfg, model_cfg) -> number of channels concatenated to the latent input.
    extra_channels: Callable[..., int] = lambda task_cfg, model_cfg: 0
    # The numeric per-sample arrays the task reads (nemo_ext.data.signals.Signal: file, alignment with
    # the frames, batch key, normalised); loaders cut them to the clip.
    signals: Tuple[Signal, ...] = ()
    # Whether the task reads the caption text (T5). A task that does not gets no text encoder; its
    # conditioner fills the cross-attention context itself (zeros, or action tokens for AR).
    uses_text: Callable[..., bool] = lambda task_cfg: True
    # (task_cfg, run cfg) -> None: raise ValueError naming the keys when the task cannot run this
    # configuration (called by make_plan before any work starts).
    check: Callable[..., None] = lambda task_cfg, cfg: None
    # The families whose new conditioning paths start at zero (step 0 does not depend on the signals:
    # the contract test checks it); a family left out says why in its conditioner.
    zero_init: Tuple[str, ...] = ("diffusion", "ar")
    description: str = ""

    @property
    def sidecars(self) -> Dict[str, str]:
        """``{ext: alignment}`` of the task's signals (what the loaders cut)."""
        return {s.ext: s.align for s in self.signals}


def require_video2world(cfg, task: str, dit_why: str, ar_why: str) -> None:
    """For a task that continues the given first frame(s): the DiT must be Video2World, the AR model must
    take a cross-attention context and at least one given frame as the prompt (ValueError naming the keys)."""
    m = cfg.model
    if cfg.family == "diffusion" and not m.video2world:
        raise ValueError(f"{task} (diffusion) {dit_why}: use a Video2World model "
                         "(model.video2world=true, e.g. model=dit_tiny_v2w_s2d / dit_7b_v2w)")
    if cfg.family == "ar" and (not m.cross_attention or m.condition_frames < 1):
        raise ValueError(f"{task} (ar): {ar_why}; use a Video2World model (model.cross_attention=true, "
                         "model.condition_frames >= 1, e.g. model=ar_tiny_v2w_dv1x8x8 / ar_5b)")


TASKS: Registry[TaskSpec] = Registry("task", import_task_packages)


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.register(spec.name, spec)


def get_task(name: str) -> TaskSpec:
    return TASKS.get(name)


def all_tasks() -> list[TaskSpec]:
    return TASKS.values()
