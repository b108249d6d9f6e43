"""The Cosmos DiT block as megatron-core modules: an AdaLN(-LoRA) modulated layer and the block.

A layer is ``x += pos; x += g1 * SelfAttn(mod(LN(x))); x += g2 * CrossAttn(mod(LN(x)), ctx);
x += g3 * MLP(mod(LN(x)))`` where (shift, scale, gate) come from the timestep embedding through an
AdaLN-LoRA projection plus the shared LoRA vector. Its parts are megatron ``ModuleSpec`` s, so TP
linears, the attention kernel (SDPA or transformer-engine) and future task variants swap in
without subclassing.

The layout is megatron's ``[s, b, h]``. Under sequence parallelism ``s`` is the local slice, and
the modulation / position tensors passed in are sliced the same way by the model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import make_viewless_tensor

from nemo_ext.models.dit.attention import (
    ContextCrossAttention,
    ContextCrossAttentionSubmodules,
    HeadRMSNorm,
    SDPACoreAttention,
)
from nemo_ext.models.dit.embeddings import AdaLNModulation, modulate
from nemo_ext.models.parallel_utils import global_layer_number

logger = logging.getLogger(__name__)


@dataclass
class DiTLayerSubmodules:
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    mlp: ModuleSpec


class DiTLayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config,
        submodules: DiTLayerSubmodules,
        layer_number: int = 1,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = global_layer_number(config, layer_number, pg_collection, vp_stage)
        d = config.hidden_size
        lora = config.adaln_lora_dim
        # LayerNorms without affine parameters: the AdaLN modulation supplies scale and shift.
        self.norm_self = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm_cross = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm_mlp = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaln_self = AdaLNModulation(d, lora, chunks=3)
        self.adaln_cross = AdaLNModulation(d, lora, chunks=3)
        self.adaln_mlp = AdaLNModulation(d, lora, chunks=3)
        extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
        self.self_attention = build_module(
            submodules.self_attention,
            config=config,
            layer_number=self.layer_number,
            attn_mask_type=AttnMaskType.no_mask,
            **extra,
        )
        self.cross_attention = build_module(
            submodules.cross_attention,
            config=config,
            layer_number=self.layer_number,
            context_dim=config.context_dim,
            **extra,
        )
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        self.mlp = build_module(submodules.mlp, config=config, tp_group=tp_group)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor],
        timestep_emb: torch.Tensor,
        adaln_lora: Optional[torch.Tensor],
        extra_pos_emb: Optional[torch.Tensor],
    ) -> torch.Tensor:
        x = hidden_states
        if extra_pos_emb is not None:
            x = x + extra_pos_emb.to(x.dtype)

        shift, scale, gate = self.adaln_self(timestep_emb, adaln_lora)
        out, _ = self.self_attention(modulate(self.norm_self(x), shift, scale), attention_mask=None, rotary_pos_emb=rotary_pos_emb)
        x = x + gate * out

        shift, scale, gate = self.adaln_cross(timestep_emb, adaln_lora)
        out, _ = self.cross_attention(
            modulate(self.norm_cross(x), shift, scale), attention_mask=context_mask, key_value_states=context
        )
        x = x + gate * out

        shift, scale, gate = self.adaln_mlp(timestep_emb, adaln_lora)
        out, _ = self.mlp(modulate(self.norm_mlp(x), shift, scale))
        x = x + gate * out
        return make_viewless_tensor(x, requires_grad=x.requires_grad, keep_graph=True)


def _local_modules():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear, SDPACoreAttention, HeadRMSNorm


def _te_modules():
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TENorm


def te_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - a broken TE install must not break the CPU path
        return False
    return bool(HAVE_TE)


def select_layer_impl(attention_backend: str, cuda: bool, have_te: bool) -> str:
    """'te' when transformer-engine is requested or (auto) usable on a GPU, else 'local' (SDPA)."""
    if attention_backend == "te":
        if not have_te:
            raise ValueError("model.attention_backend=te but transformer-engine is not importable")
        if not cuda:
            raise ValueError("model.attention_backend=te needs a CUDA GPU")
        return "te"
    if attention_backend == "auto" and cuda and have_te:
        return "te"
    return "local"


def get_dit_layer_spec(impl: str = "local") -> ModuleSpec:
    column, row, core, norm = _te_modules() if impl == "te" else _local_modules()
    return ModuleSpec(
        module=DiTLayer,
        submodules=DiTLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core,
                    linear_proj=row,
                    q_layernorm=norm,
                    k_layernorm=norm,
                ),
            ),
            cross_attention=ModuleSpec(
                module=ContextCrossAttention,
                submodules=ContextCrossAttentionSubmodules(
                    linear_q=column,
                    linear_kv=column,
                    core_attention=core,
                    linear_proj=row,
                    q_layernorm=norm,
                    k_layernorm=norm,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


class DiTBlock(TransformerBlock):
    """megatron ``TransformerBlock`` (PP layer split, layer numbering, sharded checkpoints) whose
    forward threads the DiT's per-sample conditioning (timestep embedding, AdaLN-LoRA vector,
    absolute position embedding) to every layer, with full activation recompute when configured."""

    def __init__(self, config, spec: ModuleSpec, pre_process: bool, post_process: bool, pg_collection=None, vp_stage=None):
        super().__init__(
            config=config,
            spec=spec,
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )

    def _run_layers(self, start: int, end: int):
        def run(hidden_states, *args):
            for layer in self.layers[start:end]:
                hidden_states = layer(hidden_states, *args)
            return hidden_states

        return run

    def forward(self, hidden_states, context, context_mask, rotary_pos_emb, timestep_emb, adaln_lora, extra_pos_emb):
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden_states = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        if recompute and not hidden_states.requires_grad:
            # A frozen embedding (strategy=lora) hands in a tensor without grad (make_viewless_tensor
            # returns a non-view as it is). Megatron's reentrant checkpoint only back-propagates into
            # its segment when an input requires grad: without this, every recomputed layer's
            # adapters would get no gradient at all, silently.
            hidden_states = hidden_states.detach().requires_grad_()
        args = (context, context_mask, rotary_pos_emb, timestep_emb, adaln_lora, extra_pos_emb)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            n = len(self.layers)
            if recompute:
                chunk = max(1, self.config.recompute_num_layers or 1)
                if self.config.recompute_method == "block":
                    # Recompute the first `chunk` layers of this stage, keep activations of the rest.
                    for i in range(n):
                        if i < chunk:
                            hidden_states = tensor_parallel.checkpoint(
                                self._run_layers(i, i + 1), self.config.distribute_saved_activations, hidden_states, *args
                            )
                        else:
                            hidden_states = self.layers[i](hidden_states, *args)
                else:  # uniform: recompute every `chunk` consecutive layers as one unit
                    for i in range(0, n, chunk):
                        hidden_states = tensor_parallel.checkpoint(
                            self._run_layers(i, min(n, i + chunk)),
                            self.config.distribute_saved_activations,
                            hidden_states,
                            *args,
                        )
            else:
                hidden_states = self._run_layers(0, n)(hidden_states, *args)
        if not self.pre_process and n == 0:
            hidden_states = hidden_states.clone()
        return hidden_states
