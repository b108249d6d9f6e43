"""Attention pieces of the DiT built on megatron-core's ``Attention``.

* :class:`SDPACoreAttention`: the core attention used when transformer-engine is absent. It calls
  ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash / memory-efficient kernels on
  GPU) instead of megatron's unfused local attention, whose O(S^2) score matrix does not fit at
  video lengths (56k tokens).
* :class:`ContextCrossAttention`: cross-attention whose K/V project from the context width
  (1024 for T5-XXL) rather than from the hidden size (megatron's ``CrossAttention`` assumes the
  context already has the hidden width), with per-head Q/K RMSNorm as in Cosmos.
* :class:`HeadRMSNorm`: the per-head Q/K norm. Megatron's ``WrappedTorchNorm`` refuses sequence
  parallelism; a per-head norm acts after the QKV projection has gathered the sequence, so it is
  safe with SP (its grads are summed over TP ranks by megatron's ``q_layernorm``/``k_layernorm``
  rule in ``finalize_model_grads``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

logger = logging.getLogger(__name__)

_BACKEND_LOGGED = set()


def sdpa_backends(name: str):
    """Priority list of SDPA kernels for ``model.attention_backend`` (None = torch's default choice)."""
    from torch.nn.attention import SDPBackend

    table = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
        # One-query KV-cache decode steps: no mask, GQA; cuDNN would build a new plan for every
        # key length (measured on H100: 4.9 vs 135 tokens/s once warm), flash does not.
        "decode": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        # On H100 at DiT shapes cuDNN attention is ~1.8x flash (research/gpu_measurements.md);
        # the remaining entries are fallbacks for shapes/dtypes a kernel does not support.
        "auto": [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ],
    }
    if name not in table:
        raise ValueError(f"model.attention_backend={name!r}: expected one of {sorted(table)} or 'te'")
    return table[name]


def sdpa_context(backend: str, device_type: str):
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    if backend not in _BACKEND_LOGGED:
        _BACKEND_LOGGED.add(backend)
        logger.info("attention: torch SDPA, kernel priority %s", [b.name for b in sdpa_backends(backend)])
    return sdpa_kernel(sdpa_backends(backend), set_priority=True)


class SDPACoreAttention(MegatronModule):
    """megatron core-attention interface on top of ``F.scaled_dot_product_attention``.

    Inputs ``query [sq, b, np, hn]``, ``key/value [sk, b, ng, hn]``; output ``[sq, b, np * hn]``.
    ``attention_mask`` follows megatron's convention (True = masked out), broadcastable to
    ``[b, np, sq, sk]``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.backend = getattr(config, "sdpa_backend", "auto")
        # Context parallelism (self-attention only: a cross-attention context is not split):
        # queries stay local, keys/values are all-gathered over the CP group (the backward
        # reduce-scatters their grads). Works with any SDPA kernel, no transformer-engine needed.
        self.cp_group = None
        if attention_type == "self" and config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if self.cp_group is None:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        backend: Optional[str] = None,
        **_unused,
    ):
        """``backend`` overrides ``model.attention_backend`` for this call (KV-cache decode steps)."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed (THD) sequences are not supported by the SDPA core attention")
        sq, b, np_, hn = query.shape
        if self.cp_group is not None:
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and mask is None
        with sdpa_context(backend or self.backend, q.device.type):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != np_,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the head dimension (megatron ``LayerNormBuilder`` signature)."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


@dataclass
class ContextCrossAttentionSubmodules:
    linear_q: type
    linear_kv: type
    core_attention: type
    linear_proj: type
    q_layernorm: Optional[type] = None
    k_layernorm: Optional[type] = None


class ContextCrossAttention(Attention):
    """Cross-attention from video tokens [sq, b, h] to a context [sk, b, context_dim].

    Supports grouped-query attention (``config.num_query_groups < num_attention_heads``: the K/V
    projection has one [k_g; v_g] block per group), as the Cosmos AR Video2World layers use.

    ``linear_kv`` is a column-parallel projection of the context; under sequence parallelism it
    all-gathers its input along the sequence, so the caller passes the context split over the TP
    ranks like the hidden states (see ``CosmosDiT.forward``).
    """

    def __init__(
        self,
        config,
        submodules: ContextCrossAttentionSubmodules,
        layer_number: int,
        context_dim: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="cross",
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        column = dict(
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_group=self.pg_collection.tp,
        )
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, self.query_projection_size, **column)
        self.linear_kv = build_module(submodules.linear_kv, context_dim, 2 * self.kv_projection_size, **column)
        hn = self.hidden_size_per_attention_head
        norm_q = submodules.q_layernorm
        norm_k = submodules.k_layernorm
        self.q_layernorm = norm_q(config=config, hidden_size=hn, eps=config.layernorm_epsilon) if norm_q else None
        self.k_layernorm = norm_k(config=config, hidden_size=hn, eps=config.layernorm_epsilon) if norm_k else None

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False, split_qkv=True):
        assert split_qkv and not output_gate
        if key_value_states is None:
            raise ValueError("cross-attention needs a context (key_value_states)")
        mixed_kv, _ = self.linear_kv(key_value_states)
        # One [k_g; v_g] block per KV group (grouped-query attention: fewer groups than heads, the
        # core attention broadcasts them; the DiT has as many groups as heads).
        mixed_kv = mixed_kv.view(
            *mixed_kv.shape[:-1], self.num_query_groups_per_partition, 2 * self.hidden_size_per_attention_head
        )
        key, value = tensor_parallel.split_tensor_along_last_dim(mixed_kv, 2)
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:-1], self.num_attention_heads_per_partition, self.hidden_size_per_attention_head)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
