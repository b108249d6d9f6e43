"""action_control: robot actions in, next frames out.

A clip of ``data.num_frames`` = 1 + ``task.chunk`` frames comes with the ``chunk`` actions between
them (``<key>.actions.npy``, one row per transition, DESIGN.md section 0). The default chunk follows
the tokenizers' 8x time compression: 8 actions -> 9 frames = 1 conditioning frame (one latent /
token frame) + 8 predicted frames (the next latent / token frame).

* diffusion (DiT, Video2World): the normalized action chunk -> MLP -> added to the timestep
  embedding (``adaln``) and to the AdaLN-LoRA vector (``adaln_lora``); both heads are
  zero-initialised, so step 0 of a post-trained model is the base model. With ``task.per_frame``
  (default) every latent frame gets its own vector ([B, T, D], as Cosmos-Predict2's action model
  adds actions to per-frame timestep embeddings): the MLP sees the causal prefix of the chunk, the
  actions that led up to that frame (later ones zeroed; the given first frame sees none), so a frame's
  displacement from the given frame is a linear function of its input. ``per_frame=false``: one
  vector for the whole clip from all its actions ([B, D]). The text context is zeros
  (``task.instruction=false``) or the instruction's T5 embedding.
* autoregressive: each normalized action -> MLP -> one cross-attention context token
  (``context`` [B, chunk, context_dim]); the first token frame (current frame) conditions, the
  next frame's tokens are predicted. The model needs cross-attention (``model=ar_*_v2w`` style
  presets; checked).

Actions are normalized with the per-dimension mean/std of the training data (the shard set's
manifest, ``extra.sidecars["actions.npy"]``, written by the converters and the action world:
:func:`nemo_ext.data.signals.signal_stats`) or given as ``task.action_mean`` / ``task.action_std``;
the statistics are buffers of the conditioner, so checkpoints carry them. The data's action dimension
must equal ``task.action_dim`` (a clear error otherwise, at the first batch and from the stats up front).

The task's folder holds its whole story: this file (config, conditioners, TaskSpec), ``world.py`` (the
procedural action world and its simulator) and ``evaluation.py`` (rollouts under true vs permuted
actions on the shared evaluation core); its converters are ``data_prep/action_control.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from nemo_ext.conditioning import Conditioning, tokens_then_text
from nemo_ext.data.signals import Signal, signal_stats
from nemo_ext.tasks.base import TaskConfig, TaskSpec, register_task

logger = logging.getLogger(__name__)

ACTIONS = Signal("actions.npy", "transitions", "actions", normalised=True,
                 description="one action row per frame-to-frame transition (T - 1 rows for T frames)")


@dataclass
class ActionControlTaskConfig(TaskConfig):
    name: str = "action_control"
    action_dim: int = 7
    chunk: int = 8  # actions per clip = data.num_frames - 1
    hidden: int = 256  # width of the action MLP
    # diffusion: one AdaLN vector per latent frame from the actions up to it (false: one per clip)
    per_frame: bool = True
    # Use the clip's instruction (caption) as text; false = the text context is zeros.
    instruction: bool = False
    # Normalization; null = read action_stats.json beside the (first) training shards, else identity.
    action_mean: Optional[List[float]] = None
    action_std: Optional[List[float]] = None


def find_action_stats(data_cfg) -> Optional[dict]:
    """The actions' statistics of the run's training data (data.path, the first data.sources entry, or
    the sample world) with ``action_dim`` (the row width), or None when no manifest records them (the
    sample world is generated at the start of the run; identity normalisation until then)."""
    path = data_cfg.path or (data_cfg.sources[0].path if data_cfg.sources else data_cfg.sample_dir)
    stats = signal_stats(path, ACTIONS.ext)
    if stats is None:
        return None
    return {**stats, "action_dim": int(stats["shape"][0]) if stats.get("shape") else None}


def _stats_vectors(task_cfg, stats: Optional[dict]):
    dim = task_cfg.action_dim
    if task_cfg.action_mean is not None or task_cfg.action_std is not None:
        mean = task_cfg.action_mean or [0.0] * dim
        std = task_cfg.action_std or [1.0] * dim
    elif stats is not None:
        mean, std = stats["mean"], stats["std"]
    else:
        mean, std = [0.0] * dim, [1.0] * dim
    if len(mean) != dim or len(std) != dim:
        raise ValueError(f"action statistics have {len(mean)} dims but task.action_dim={dim}")
    std = [s if s > 1e-6 else 1.0 for s in std]  # a constant dimension stays as it is
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


class ActionEncoder(nn.Module):
    """Normalized actions -> features; the statistics are (persistent) buffers."""

    def __init__(self, task_cfg, in_features: int, stats: Optional[dict]):
        super().__init__()
        self.action_dim, self.chunk = task_cfg.action_dim, task_cfg.chunk
        mean, std = _stats_vectors(task_cfg, stats)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.mlp = nn.Sequential(nn.Linear(in_features, task_cfg.hidden), nn.SiLU(),
                                 nn.Linear(task_cfg.hidden, task_cfg.hidden), nn.SiLU())

    def normalized(self, batch: dict) -> torch.Tensor:
        if "actions" not in batch:
            raise KeyError("action_control: the batch has no 'actions' (the shards need <key>.actions.npy)")
        actions = batch["actions"]
        if actions.shape[-1] != self.action_dim or actions.shape[-2] != self.chunk:
            raise ValueError(
                f"actions of shape {tuple(actions.shape[-2:])} (steps, dims) but task.chunk={self.chunk}, "
                f"task.action_dim={self.action_dim}: the data's action dimension or the clip length differs"
            )
        dtype = self.mlp[0].weight.dtype
        # float32 statistics: the world model casts the conditioner, buffers included, to bf16
        return ((actions.float() - self.mean.float()) / self.std.float()).to(dtype)


class DiTActionConditioner(ActionEncoder):
    def __init__(self, task_cfg, model_cfg, stats: Optional[dict]):
        super().__init__(task_cfg, task_cfg.chunk * task_cfg.action_dim, stats)
        d = model_cfg.hidden_size
        self.to_adaln = nn.Linear(task_cfg.hidden, d)
        self.to_adaln_lora = nn.Linear(task_cfg.hidden, 3 * d)
        for head in (self.to_adaln, self.to_adaln_lora):  # zero: step 0 is the base model
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.instruction = task_cfg.instruction
        self.context_shape = (model_cfg.text_encoder.max_length, model_cfg.context_dim)
        self.per_frame = task_cfg.per_frame
        self.frames_per_latent = model_cfg.tokenizer.temporal_compression

    def causal_prefixes(self, a: torch.Tensor) -> torch.Tensor:
        """[B, chunk, A] -> [B, T, chunk * A]: latent frame k (1 + chunk / temporal_compression of
        them) sees the first k * temporal_compression actions, the rest zeroed."""
        latent_frames = 1 + self.chunk // self.frames_per_latent
        seen = torch.arange(latent_frames, device=a.device)[:, None] * self.frames_per_latent
        mask = (torch.arange(self.chunk, device=a.device)[None, :] < seen).to(a.dtype)  # [T, chunk]
        return (a[:, None] * mask[None, :, :, None]).flatten(2)

    def forward(self, batch: dict) -> Conditioning:
        a = self.normalized(batch)
        h = self.mlp(self.causal_prefixes(a) if self.per_frame else a.flatten(1))
        context, mask = batch.get("context"), batch.get("context_mask")
        if context is None:  # no instruction: attend to a zero context
            context = torch.zeros(a.shape[0], *self.context_shape, dtype=a.dtype, device=a.device)
            mask = None
        return Conditioning(context=context, context_mask=mask, adaln=self.to_adaln(h),
                            adaln_lora=self.to_adaln_lora(h))


class ARActionConditioner(ActionEncoder):
    def __init__(self, task_cfg, model_cfg, stats: Optional[dict]):
        super().__init__(task_cfg, task_cfg.action_dim, stats)
        # not zero-initialised, unlike the DiT heads: megatron's cross-attention has no biases, so an
        # all-zero context gives zero keys and values and no gradient reaches the tokens (measured: zero
        # gradient to this layer at init). Exact base equality at step 0 would need a zero-init gate on the
        # cross-attention output, a model change (open).
        self.to_context = nn.Linear(task_cfg.hidden, model_cfg.context_dim)
        self.step_embedding = nn.Parameter(torch.zeros(task_cfg.chunk, task_cfg.hidden))
        nn.init.normal_(self.step_embedding, std=0.02)

    def forward(self, batch: dict) -> Conditioning:
        a = self.normalized(batch)  # [B, chunk, action_dim]
        tokens = self.to_context(self.mlp(a) + self.step_embedding.to(a.dtype))  # (steps are ordered)
        context, mask = tokens_then_text(tokens, batch)  # an instruction / caption: its T5 tokens after these
        return Conditioning(context=context, context_mask=mask)


def build_conditioner(task_cfg, model_cfg, data_cfg=None):
    stats = find_action_stats(data_cfg) if data_cfg is not None else None
    if stats is not None and int(stats.get("action_dim", task_cfg.action_dim)) != task_cfg.action_dim:
        raise ValueError(f"the data's actions have {stats['action_dim']} dims (its manifest.json) but "
                         f"task.action_dim={task_cfg.action_dim}")
    if model_cfg.family == "ar":
        return ARActionConditioner(task_cfg, model_cfg, stats)
    return DiTActionConditioner(task_cfg, model_cfg, stats)


def check(task_cfg, cfg) -> None:
    d, m = cfg.data, cfg.model
    if task_cfg.action_dim < 1 or task_cfg.chunk < 1:
        raise ValueError(f"task.action_dim={task_cfg.action_dim} and task.chunk={task_cfg.chunk} must be >= 1")
    if d.num_frames != task_cfg.chunk + 1:
        raise ValueError(
            f"data.num_frames={d.num_frames} but task.chunk={task_cfg.chunk}: a clip of T frames has T-1 actions "
            f"(set data.num_frames={task_cfg.chunk + 1})"
        )
    if cfg.family == "diffusion" and not m.video2world:
        raise ValueError("action_control (diffusion) predicts frames from a given one: use a Video2World model "
                         "(model.video2world=true, e.g. model=dit_tiny_v2w / dit_7b_v2w)")
    if cfg.family == "ar" and not m.cross_attention:
        raise ValueError("action_control (ar): action tokens enter through cross-attention; use a model with "
                         "model.cross_attention=true (e.g. model=ar_tiny_v2w / ar_5b)")
    stats = find_action_stats(d)
    if stats is not None and int(stats.get("action_dim", task_cfg.action_dim)) != task_cfg.action_dim:
        raise ValueError(f"task.action_dim={task_cfg.action_dim} but the data's actions have {stats['action_dim']} "
                         f"dims (the shards' manifest.json)")


ACTION_CONTROL = register_task(
    TaskSpec(
        name="action_control",
        config_cls=ActionControlTaskConfig,
        families=("diffusion", "ar"),
        sample_exts=("json",),
        world="action",
        build_conditioner=build_conditioner,
        signals=(ACTIONS,),
        uses_text=lambda task_cfg: task_cfg.instruction,
        check=check,
        zero_init=("diffusion",),  # AR: the action tokens are a cross-attention context (ARActionConditioner)
        description="next frames from robot action vectors (action MLP -> AdaLN for the DiT, cross-attention tokens for AR)",
    )
)

from nemo_ext.tasks.action_control import evaluation, world  # noqa: E402,F401  (register the world and eval)
