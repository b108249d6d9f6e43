"""Checkpoint conversion: diffusers <-> our sharded checkpoints (import / export)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from nemo_ext.checkpoint.diffusers_dit import (
    ConversionError,
    dit_config_from_diffusers,
    diffusers_to_ours,
    ours_to_diffusers,
    read_diffusers_dir,
    write_diffusers_dir,
)
from nemo_ext.checkpoint.plain import read_tensors, unstack_layers, write_model_checkpoint
from nemo_ext.models.dit.config import DiTConfig, architecture_diff

logger = logging.getLogger(__name__)

__all__ = ["ConversionError", "export_diffusers", "import_diffusers", "model_config_of"]


@contextlib.contextmanager
def single_process_world():
    """A one-process gloo group with megatron's TP1/PP1 state, unless one already exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    created = not dist.is_initialized()
    if created:
        for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(var, value)
        init_distributed("cpu")
        init_model_parallel(_Layout(), seed=0)
    try:
        yield
    finally:
        if created:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class _Layout:
    tp = pp = cp = 1
    sequence_parallel = False
    recompute = None
    recompute_method = "uniform"
    recompute_num_layers = 1


def meta_template(net_cls, build_transformer_config, cfg, dtype: torch.dtype, prefix: str = "model.net.") -> dict:
    """Sharded state dict of a family's one-process network (``net_cls(config, cfg)``) built on the
    meta device: no memory, ~0.1 s for 7B."""
    config = build_transformer_config(cfg, _Layout(), dtype)
    config.perform_initialization = False
    with torch.device("meta"):
        net = net_cls(config, cfg)
    return net.sharded_state_dict(prefix=prefix)


def dit_template(cfg: DiTConfig, dtype: torch.dtype, prefix: str = "model.net.") -> dict:
    """Sharded state dict of a one-process DiT built on the meta device."""
    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config

    return meta_template(CosmosDiT, build_transformer_config, cfg, dtype, prefix)


def model_config_of(ckpt_dir) -> DiTConfig:
    """The model config a checkpoint was written with (stored in its content metadata)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {}
    if "model" not in meta:
        raise ConversionError(f"{ckpt_dir}: no model config in the checkpoint metadata (not written by cosmos-recipes?)")
    fields = DiTConfig.__dataclass_fields__
    kwargs = {k: v for k, v in meta["model"].items() if k in fields and k not in ("tokenizer", "text_encoder", "edm")}
    return DiTConfig(**kwargs)


def import_diffusers(src, dst, expected: Optional[DiTConfig] = None) -> DiTConfig:
    """diffusers CosmosTransformer3DModel folder -> our checkpoint (loads at any TP/PP layout)."""
    config, sd = read_diffusers_dir(src)
    cfg = dit_config_from_diffusers(config, base=expected)
    if expected is not None:
        diff = architecture_diff(cfg.architecture(), expected.architecture())
        if diff:
            raise ConversionError(f"{src} does not match model={expected.name}: " + "; ".join(diff))
    ours = diffusers_to_ours(sd, cfg)
    dtypes = {v.dtype for v in ours.values()}
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else next(iter(dtypes))
    with single_process_world():
        template = dit_template(cfg, dtype)
        write_model_checkpoint(
            template, ours, dst, content_metadata={"model": asdict(cfg), "source": f"diffusers:{Path(src).resolve()}"},
            key_prefix="model.",
        )
    logger.info("imported %d tensors from %s into %s", len(ours), src, dst)
    return cfg


def exported_weights(src, weights: str, config_of):
    """The weights an export writes: a full checkpoint's (any layout; an adapter checkpoint is
    refused: merge it first) global tensors as per-layer module keys, EMA or raw per ``weights``
    (auto: EMA when present). Returns (checkpoint dir, ``config_of(dir)``, tensors, "ema" | "raw")."""
    from nemo_ext.checkpoint.lora import require_full_checkpoint
    from nemo_ext.training.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(str(src))
    require_full_checkpoint(ckpt)
    cfg = config_of(ckpt)
    ema = read_tensors(ckpt, prefixes=["ema.model.net."])
    if weights == "ema" and not ema:
        raise ConversionError(f"{ckpt} has no EMA weights (train with trainer.ema_decay to keep them)")
    use_ema = bool(ema) and weights in ("auto", "ema")
    tensors = ema if use_ema else read_tensors(ckpt, prefixes=["model.net."])
    ours = unstack_layers(tensors, prefix="ema.model." if use_ema else "model.")
    return ckpt, cfg, ours, "ema" if use_ema else "raw"


def export_diffusers(src, dst, weights: str = "auto") -> str:
    """Our checkpoint (any layout) -> diffusers folder. ``weights``: auto (EMA when present) | ema | raw.
    Returns which weights were written."""
    ckpt, cfg, ours, chosen = exported_weights(src, weights, model_config_of)
    write_diffusers_dir(dst, cfg, ours_to_diffusers(ours, cfg))
    logger.info("exported %s weights of %s to %s", chosen, ckpt, dst)
    return chosen
