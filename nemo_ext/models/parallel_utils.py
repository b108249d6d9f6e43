"""Parameter attributes and checkpoint replica ids for modules that megatron does not shard.

Two kinds of replicated modules exist in our models:

* conditioning embedders (timestep MLP, learnable position embedding, task conditioners) that every
  pipeline stage needs: each stage holds a copy, their grads are summed over the PP group
  (megatron's ``pipeline_parallel`` param attribute + ``config.has_cond_embedder``), and the copy on
  stage 0 is the checkpoint's main replica and the one the grad norm counts;
* everything not tensor-parallel under sequence parallelism: the model applies such modules to
  its local slice of tokens only, so their grads are partial sums over the TP group (megatron's
  ``sequence_parallel`` param attribute makes ``finalize_model_grads`` sum them).
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedBase


def mark_pipeline_replicated(module: torch.nn.Module) -> None:
    """Grads summed over the PP group; the copies on stages > 0 are ``shared`` so that the grad
    norm (summed over the model-parallel group) counts each parameter once."""
    later_stage = parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_rank() > 0
    for p in module.parameters():
        p.pipeline_parallel = True
        if later_stage:
            p.shared = True


def mark_sequence_parallel_replicated(module: torch.nn.Module) -> None:
    """Tag every parameter that is not tensor-parallel sharded (call only when SP is on)."""
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.sequence_parallel = True


def make_pipeline_replicas(sharded_sd: dict, prefixes: Iterable[str]) -> None:
    """Give copies of PP-replicated modules on stages > 0 a non-main replica id."""
    if not parallel_state.model_parallel_is_initialized():
        return
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if pp_rank == 0:
        return
    prefixes = tuple(prefixes)
    for key, value in sharded_sd.items():
        if key.startswith(prefixes) and isinstance(value, ShardedBase):
            rid = value.replica_id
            rid = (rid,) if isinstance(rid, int) else tuple(rid)
            value.replica_id = (pp_rank,) + rid[1:]


def _chunk(x: torch.Tensor, dim: int, parts: int, index: int, what: str) -> torch.Tensor:
    if parts == 1:
        return x
    size = x.shape[dim]
    if size % parts:
        raise ValueError(f"sequence length {size} is not divisible by the {what} size {parts}")
    return x.narrow(dim, index * (size // parts), size // parts)


def local_tokens(x: torch.Tensor, sequence_parallel: bool, dim: int = 0) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor: its context-parallel chunk, then (under
    sequence parallelism) its tensor-parallel sub-chunk. Plain indexing, no communication: the
    backward zero-fills, so replicated params upstream receive partial grads (see above; summed
    over TP by the ``sequence_parallel`` attribute and over CP by megatron's DP x CP reduction)."""
    x = _chunk(
        x, dim, parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank(), "context-parallel"
    )
    if sequence_parallel:
        x = sequence_slice(x, dim)
    return x


def sequence_slice(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This TP rank's contiguous chunk of ``x`` along ``dim`` (sequence parallelism)."""
    return _chunk(
        x, dim, parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank(),
        "tensor-parallel",
    )


def scaled_init(std: float, num_layers: int):
    """Megatron's output-layer init: normal with ``std / sqrt(2 * num_layers)``."""
    import math

    scaled = std / math.sqrt(2.0 * num_layers)
    return lambda w: torch.nn.init.normal_(w, mean=0.0, std=scaled)


def transformer_config_kwargs(parallel, dtype: torch.dtype, num_layers: int, init_std) -> dict:
    """The TransformerConfig fields both families set alike: RMSNorm with Q/K norm, no dropout,
    no bias, megatron's fusions off (they need transformer-engine/apex), the ``parallel`` group's
    layout and recompute, the dtypes, and CPU master-weight init (the same seed gives the same
    weights for every TP layout). Each family adds its widths, activation and norm epsilon."""
    half = dtype in (torch.bfloat16, torch.float16)
    recompute = getattr(parallel, "recompute", None)
    full = recompute == "full"
    return dict(
        num_layers=num_layers,
        add_bias_linear=False,
        normalization="RMSNorm",
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        output_layer_init_method=None if init_std is None else scaled_init(init_std, num_layers),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype if half else None,
        use_cpu_initialization=True,
        recompute_granularity=recompute,
        recompute_method=getattr(parallel, "recompute_method", "uniform") if full else None,
        recompute_num_layers=getattr(parallel, "recompute_num_layers", 1) if full else None,
        recompute_modules=["core_attn"] if recompute == "selective" else None,
    )


def global_layer_number(config, layer_number: int, pg_collection=None, vp_stage=None) -> int:
    """A layer's 1-based number in the whole network: its number on this pipeline stage plus the
    stage's offset (megatron's ``get_transformer_layer_offset``; the PP rank from ``pg_collection``
    when given, else from parallel_state)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.core.utils import get_pg_rank

    pp_group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
    pp_rank = get_pg_rank(pp_group) if pp_group is not None else None
    return layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
