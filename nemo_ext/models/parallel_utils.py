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
