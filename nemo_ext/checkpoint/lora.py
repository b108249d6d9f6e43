"""``convert merge``: fold a LoRA run's adapters into its base weights.

An adapter checkpoint (``strategy=lora``) holds only the adapters ``<linear>_lora.lora_{a,b}`` and the
modules that trained fully (the task's conditioner); its metadata names the base checkpoint it was
trained on. Merging reads both as *global* tensors (whatever TP/PP layout wrote them), computes
``W += (alpha / rank) * B @ A`` for every adapted linear (layer-stacked weights at once), puts the
fully trained modules over the base's, and writes a normal model checkpoint: it loads at any
layout (``trainer.init_from``), samples, and exports with ``convert export`` (diffusers / Cosmos
``.pt``) like any other.
"""

from __future__ import annotations

import logging
from typing import Optional

from nemo_ext.checkpoint.diffusers_dit import ConversionError

logger = logging.getLogger(__name__)

ADAPTER_MARK = "_lora.lora_"


def is_adapter_checkpoint(ckpt) -> bool:
    from megatron.core import dist_checkpointing

    from nemo_ext.training.checkpoint import checkpoint_strategy

    return checkpoint_strategy(dist_checkpointing.load_content_metadata(str(ckpt)) or {}).get("name") == "lora"


def require_full_checkpoint(ckpt) -> None:
    """Export needs whole weights: an adapter checkpoint is merged first."""
    if is_adapter_checkpoint(ckpt):
        raise ConversionError(
            f"{ckpt} holds LoRA adapters only (strategy=lora): merge them into their base first, "
            f"python -m nemo_ext.cli.convert merge --from {ckpt} --to <merged dir>, then export <merged dir>"
        )


def merge_lora_checkpoint(src, dst, base: Optional[str] = None, weights: str = "auto") -> dict:
    """Adapter checkpoint (or a LoRA run dir) ``src`` + its base -> a full checkpoint at ``dst``.
    ``base`` overrides the base recorded in the checkpoint; ``weights``: auto (the EMA of the trained
    tensors when the checkpoint has one) | ema | raw. Returns a summary."""
    from megatron.core import dist_checkpointing

    from nemo_ext.checkpoint import single_process_world
    from nemo_ext.checkpoint.plain import read_tensors, write_global_tensors
    from nemo_ext.models.dit.config import architecture_diff
    from nemo_ext.models.lora import merge_global
    from nemo_ext.training.checkpoint import checkpoint_strategy, lora_base_of, resolve_checkpoint

    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights={weights!r}: expected auto, ema or raw")
    ckpt = resolve_checkpoint(str(src))
    meta = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
    strategy = checkpoint_strategy(meta)
    if strategy.get("name") != "lora":
        raise ConversionError(f"{ckpt} is not a LoRA adapter checkpoint (strategy={strategy.get('name')}): "
                              "it already holds whole weights (export it directly)")
    base_ckpt = resolve_checkpoint(base) if base else lora_base_of(ckpt, meta)
    base_meta = dist_checkpointing.load_content_metadata(str(base_ckpt)) or {}
    if checkpoint_strategy(base_meta).get("name") == "lora":
        raise ConversionError(f"the base {base_ckpt} is itself an adapter checkpoint: merge it first")
    diffs = architecture_diff(base_meta.get("model") or {}, meta.get("model") or {})
    if diffs:
        raise ConversionError(f"the base {base_ckpt} is another model than the adapters' {ckpt}: " + "; ".join(diffs))

    ema = read_tensors(ckpt, prefixes=["ema.model."])
    if weights == "ema" and not ema:
        raise ConversionError(f"{ckpt} has no EMA weights (train with trainer.ema_decay to keep them)")
    use_ema = bool(ema) and weights in ("auto", "ema")
    trained = read_tensors(ckpt, prefixes=["model."])
    if use_ema:  # the averaged parameters over the raw ones (buffers such as statistics have no EMA)
        trained.update({k[len("ema."):]: v for k, v in ema.items()})
    adapters = {k: v for k, v in trained.items() if ADAPTER_MARK in k}
    if not adapters:
        raise ConversionError(f"{ckpt} has no LoRA adapter tensors")
    tensors = read_tensors(base_ckpt, prefixes=["model."])
    others = {k: v for k, v in trained.items() if ADAPTER_MARK not in k}
    tensors.update(others)  # the fully trained modules (task conditioner) replace the base's
    scale = float(strategy["alpha"]) / int(strategy["rank"])
    tensors, merged = merge_global(tensors, adapters, scale)
    summary = {"base": str(base_ckpt), "adapters": str(ckpt), "weights": "ema" if use_ema else "raw",
               "merged_weights": merged, "fully_trained_tensors": len(others), "scale": scale}
    content = {"model": meta.get("model"), "source": f"merged LoRA adapters {ckpt} into {base_ckpt}",
               "lora_merged": {**summary, "strategy": strategy}}
    with single_process_world():
        write_global_tensors(tensors, dst, content)
    logger.info("merged %d LoRA adapters (%s weights) of %s into %s -> %s", merged, summary["weights"], ckpt,
                base_ckpt, dst)
    return summary
