"""The Cosmos AR transformer layer as megatron-core modules.

A layer is (pre-norm, Llama-3 style)::

    x += abs_pos                                              (when the model has an absolute table)
    x += SelfAttn(RMSNorm(x))      GQA, causal, per-head Q/K RMSNorm, 3D RoPE
    x += CrossAttn(RMSNorm(x), ctx)   Video2World only: GQA, Q/K RMSNorm, no RoPE, context_dim-wide K/V input
    x += MLP(RMSNorm(x))           SwiGLU: fc2(silu(w1 x) * w3 x)

Its parts are megatron ``ModuleSpec`` s (megatron's ``SelfAttention`` and ``MLP``, the DiT's
``ContextCrossAttention`` / ``HeadRMSNorm`` / ``SDPACoreAttention``), so TP linears and the
attention kernel swap without subclassing. Module names follow megatron's ``TransformerLayer``
(``input_layernorm``, ``pre_cross_attn_layernorm``, ``pre_mlp_layernorm``).

The layers run inside the DiT's :class:`~nemo_ext.models.dit.layer.DiTBlock` (PP layer split,
activation recompute, SP RNG fork), which hands every layer the same positional arguments
``(context, context_mask, rotary_pos_emb, timestep_emb, adaln_lora, extra_pos_emb)``; the AR layer
ignores the two AdaLN slots (always None).

KV cache: the self-attention's core attention is :class:`CachedSDPACoreAttention`; while a
:class:`KVCache` is attached to it (``nemo_ext.models.ar.generate``), it appends the new keys and
values and attends over the whole prefix with a bottom-right aligned causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import make_viewless_tensor

from nemo_ext.models.dit.attention import (
    ContextCrossAttention,
    ContextCrossAttentionSubmodules,
    HeadRMSNorm,
    SDPACoreAttention,
)
from nemo_ext.models.parallel_utils import global_layer_number


class KVCache:
    """Keys and values of one self-attention layer, preallocated for ``max_length`` positions."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0
        self.key: Optional[torch.Tensor] = None  # [max_length, b, ng, hn]
        self.value: Optional[torch.Tensor] = None

    def append(self, key: torch.Tensor, value: torch.Tensor):
        """Store [s, b, ng, hn] new keys/values; returns (keys, values) of the whole prefix and its start."""
        if self.key is None:
            shape = (self.max_length, *key.shape[1:])
            self.key = key.new_zeros(shape)
            self.value = value.new_zeros(shape)
        start, end = self.length, self.length + key.shape[0]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, {end} requested")
        self.key[start:end] = key
        self.value[start:end] = value
        self.length = end
        return self.key[:end], self.value[:end], start


class CachedSDPACoreAttention(SDPACoreAttention):
    """The DiT's SDPA core attention with an optional KV cache (causal self-attention only)."""

    kv_cache: Optional[KVCache] = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        cache = self.kv_cache
        if cache is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
        if attention_mask is not None or attention_bias is not None:
            raise NotImplementedError("the KV cache supports the plain causal mask only")
        key, value, start = cache.append(key, value)
        if start == 0:  # prefill: the ordinary causal mask
            return super().forward(query, key, value, None, attn_mask_type=AttnMaskType.causal)
        sq, sk = query.shape[0], key.shape[0]
        if sq == 1:  # one new token sees the whole cache: no mask, a kernel without per-length plans
            return super().forward(query, key, value, None, attn_mask_type=AttnMaskType.no_mask, backend="decode")
        # Query i sits at position start + i and sees keys 0 .. start + i (megatron: True = masked).
        masked = torch.arange(sk, device=query.device)[None, :] > (start + torch.arange(sq, device=query.device))[:, None]
        return super().forward(query, key, value, masked[None, None], attn_mask_type=AttnMaskType.no_mask)


@dataclass
class ARLayerSubmodules:
    input_layernorm: type
    self_attention: ModuleSpec
    pre_mlp_layernorm: type
    mlp: ModuleSpec
    pre_cross_attn_layernorm: Optional[type] = None
    cross_attention: Optional[ModuleSpec] = None


class ARLayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config,
        submodules: ARLayerSubmodules,
        layer_number: int = 1,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = global_layer_number(config, layer_number, pg_collection, vp_stage)
        d, eps = config.hidden_size, config.layernorm_epsilon
        extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
        self.input_layernorm = submodules.input_layernorm(config=config, hidden_size=d, eps=eps)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=self.layer_number,
            attn_mask_type=AttnMaskType.causal, **extra,
        )
        self.pre_cross_attn_layernorm = self.cross_attention = None
        if submodules.cross_attention is not None:
            self.pre_cross_attn_layernorm = submodules.pre_cross_attn_layernorm(config=config, hidden_size=d, eps=eps)
            self.cross_attention = build_module(
                submodules.cross_attention, config=config, layer_number=self.layer_number,
                context_dim=config.context_dim, **extra,
            )
        self.pre_mlp_layernorm = submodules.pre_mlp_layernorm(config=config, hidden_size=d, eps=eps)
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        self.mlp = build_module(submodules.mlp, config=config, tp_group=tp_group)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor],
        timestep_emb=None,  # DiTBlock's AdaLN slots: unused by the AR layer
        adaln_lora=None,
        extra_pos_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = hidden_states
        if extra_pos_emb is not None:
            x = x + extra_pos_emb.to(x.dtype)
        out, _ = self.self_attention(self.input_layernorm(x), attention_mask=None, rotary_pos_emb=rotary_pos_emb)
        x = x + out
        if self.cross_attention is not None:
            out, _ = self.cross_attention(
                self.pre_cross_attn_layernorm(x), attention_mask=context_mask, key_value_states=context
            )
            x = x + out
        out, _ = self.mlp(self.pre_mlp_layernorm(x))
        x = x + out
        return make_viewless_tensor(x, requires_grad=x.requires_grad, keep_graph=True)


def _local_modules():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear, CachedSDPACoreAttention, SDPACoreAttention, HeadRMSNorm


def _te_modules():
    """transformer-engine parts (import-guarded by the caller's ``select_layer_impl``; unverified:
    TE cannot be installed on the CPU machines)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TEDotProductAttention, TENorm


def get_ar_layer_spec(impl: str = "local", cross_attention: bool = False) -> ModuleSpec:
    """``impl``: "local" (megatron linears + torch SDPA, KV cache capable) or "te" (transformer-engine)."""
    column, row, self_core, cross_core, norm = _te_modules() if impl == "te" else _local_modules()
    cross = None
    if cross_attention:
        cross = ModuleSpec(
            module=ContextCrossAttention,
            submodules=ContextCrossAttentionSubmodules(
                linear_q=column, linear_kv=column, core_attention=cross_core, linear_proj=row,
                q_layernorm=norm, k_layernorm=norm,
            ),
        )
    return ModuleSpec(
        module=ARLayer,
        submodules=ARLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column, core_attention=self_core, linear_proj=row, q_layernorm=norm, k_layernorm=norm,
                ),
            ),
            pre_cross_attn_layernorm=norm if cross_attention else None,
            cross_attention=cross,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )
