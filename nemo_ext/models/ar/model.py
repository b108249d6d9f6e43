"""Cosmos-1 autoregressive world model on megatron-core: a Llama-3 style GPT over discrete video tokens.

Data flow (megatron layout ``[S, B, *]``)::

    tokens [B, S] (optionally <bov> first; padding past the grid)
      -> VocabParallelEmbedding (SP: reduce-scattered to this rank's token slice)      (first PP stage)
      -> DiTBlock of ARLayers: N x {+ abs pos, causal GQA self-attn + 3D RoPE,
                                   [cross-attn to the T5 context], SwiGLU MLP}
      -> final RMSNorm -> ColumnParallelLinear over the vocabulary (SP: gathers the sequence)
      -> per-token vocab-parallel cross entropy (labels given) or full-vocab logits  (last PP stage)

Positions: token ``i`` of the window ``[offset, offset + S)`` has the grid position of video token
``i - 1`` (with <bov>) or ``i``; <bov> and padding get zero RoPE (identity) and zero absolute rows.
The RoPE and the absolute table are computed on every pipeline stage; a learnable table's
parameters are replicated on the stages and their grads summed over the PP group
(``parallel_utils``), like the DiT's.

Context parallelism is refused (``ARConfig.check_parallel`` says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_ext.models.ar.config import ARConfig
from nemo_ext.models.ar.embeddings import ARRoPE3D, SinCosPosEmbed3D, position_rows
from nemo_ext.models.ar.layer import get_ar_layer_spec
from nemo_ext.models.dit.attention import HeadRMSNorm
from nemo_ext.models.dit.embeddings import LearnablePosEmbed
from nemo_ext.models.dit.layer import DiTBlock, select_layer_impl, te_available
from nemo_ext.models.parallel_utils import (
    local_tokens,
    make_pipeline_replicas,
    mark_pipeline_replicated,
    mark_sequence_parallel_replicated,
    sequence_slice,
    transformer_config_kwargs,
)

logger = logging.getLogger(__name__)


@dataclass
class ARTransformerConfig(TransformerConfig):
    """megatron TransformerConfig plus the AR-specific widths."""

    context_dim: int = 1024
    sdpa_backend: str = "auto"
    # Replicated embedders on every PP stage (learnable position table, task conditioners):
    # finalize_model_grads sums their grads over the PP group.
    has_cond_embedder: bool = True


def build_transformer_config(arch: ARConfig, parallel, dtype: torch.dtype) -> ARTransformerConfig:
    """``parallel`` is the ``parallel`` config group (tp/pp/cp/sequence_parallel/recompute*).
    Raises ValueError naming the keys when the layout cannot run the model."""
    arch.check_parallel(parallel.tp, parallel.pp, parallel.cp, parallel.sequence_parallel)
    return ARTransformerConfig(
        **transformer_config_kwargs(parallel, dtype, arch.num_layers, arch.init_std),
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        activation_func=F.silu,
        gated_linear_unit=True,
        layernorm_epsilon=arch.norm_eps,
        context_dim=arch.context_dim,
        sdpa_backend=arch.attention_backend if arch.attention_backend != "te" else "auto",
    )


class CosmosAR(MegatronModule):
    # The input embedding and the output layer are separate weights (megatron's finalize_model_grads asks).
    share_embeddings_and_output_weights = False
    # WorldModel hands this net the conditioning's cross-attention context, not the whole bundle.
    conditioned_by = "context"

    def __init__(
        self,
        config: ARTransformerConfig,
        arch: ARConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.arch = arch
        self.pre_process = pre_process
        self.post_process = post_process
        d = config.hidden_size

        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                arch.embedding_vocab_size,
                d,
                init_method=config.init_method,
                reduce_scatter_embeddings=config.sequence_parallel,
                config=config,
            )
        self.rope = ARRoPE3D(
            arch.head_dim, arch.rope_theta, arch.yarn_scale, arch.yarn_original_grid, arch.yarn_beta_fast, arch.yarn_beta_slow
        )
        self.pos_embed = None
        if arch.abs_pos_emb == "learnable":
            self.pos_embed = LearnablePosEmbed(d, arch.max_size, init_std=arch.init_std)
        elif arch.abs_pos_emb == "sincos":
            self.pos_embed = SinCosPosEmbed3D(d)
        self.layer_impl = select_layer_impl(arch.attention_backend, torch.cuda.is_available(), te_available())
        logger.info(
            "AR layers: %s",
            "transformer-engine (TE linears + fused attention; no KV-cache generation)"
            if self.layer_impl == "te"
            else f"megatron local linears + torch SDPA attention (model.attention_backend={arch.attention_backend})",
        )
        self.decoder = DiTBlock(
            config,
            get_ar_layer_spec(self.layer_impl, arch.cross_attention),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.final_norm = HeadRMSNorm(config=config, hidden_size=d, eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                d,
                arch.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
            )
        if arch.cross_attention:
            # New conditioning starts at zero: a freshly built Video2World model is its base model.
            for layer in self.decoder.layers:
                torch.nn.init.zeros_(layer.cross_attention.linear_proj.weight)
        self.to(config.params_dtype)
        if isinstance(self.pos_embed, LearnablePosEmbed):
            mark_pipeline_replicated(self.pos_embed)
        if config.sequence_parallel:
            mark_sequence_parallel_replicated(self)

    # Module prefixes held by every pipeline stage (see parallel_utils).
    pipeline_replicated = ("pos_embed.",)
    # Tensor-parallel linears outside the transformer layers (LoRA target roles, nemo_ext.models.lora).
    parallel_linears = ("output_layer",)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def positions(self, grid: Sequence[int], offset: int, length: int, device):
        """(RoPE freqs [S, 1, 1, head_dim], absolute table [S, 1, D] or None) of window [offset, offset + S)."""
        self.arch.check_grid(grid)
        bov = self.arch.bov_token
        rotary = position_rows(self.rope(grid, device=device), bov, offset, length)
        absolute = None
        if self.pos_embed is not None:
            absolute = position_rows(self.pos_embed(grid) if isinstance(self.pos_embed, LearnablePosEmbed)
                                     else self.pos_embed(grid, device=device), bov, offset, length)
        return rotary, absolute

    def forward(
        self,
        tokens: torch.Tensor,
        grid: Sequence[int],
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """tokens: [B, S] ids (on later PP stages only the shape is used), at positions
        ``[position_offset, position_offset + S)`` of the sequence ``[<bov>,] grid tokens (t,h,w
        raster), padding``; grid: the clip's token grid (T, H, W); context: [B, S_ctx, context_dim]
        and context_mask: [B, S_ctx] bool (True = valid) for cross-attention (ignored without it);
        labels: [B, S] target ids (the next token of each position).

        Returns, on the last PP stage, the per-token loss [B, S] (fp32; zero where ``loss_mask`` is
        0) when labels are given, else full-vocabulary logits [B, S, vocab_size]; on other stages
        the hidden states for the next one."""
        b, s = tokens.shape
        sp = self.config.sequence_parallel
        rotary, absolute = self.positions(grid, position_offset, s, tokens.device)
        if absolute is not None:
            absolute = local_tokens(absolute, sp)

        ctx = ctx_mask = None
        if self.arch.cross_attention:
            if context is None:
                raise ValueError("model.cross_attention=true: the model needs a context (T5 embeddings)")
            ctx = context.transpose(0, 1).to(self.config.params_dtype)  # [S_ctx, B, D_ctx]
            if sp:
                ctx = sequence_slice(ctx)
            if context_mask is not None:
                ctx_mask = ~context_mask.bool()[:, None, None, :]  # megatron: True = masked

        hidden = None
        if self.pre_process:
            hidden = self.embedding(tokens)  # [B, S, D], or [S/tp, B, D] under SP
            if not sp:
                hidden = hidden.transpose(0, 1).contiguous()

        hidden = self.decoder(hidden, ctx, ctx_mask, rotary, None, None, absolute)
        if not self.post_process:
            return hidden
        hidden = self.final_norm(hidden)
        logits, _ = self.output_layer(hidden)  # [S, B, V / tp] (SP: the sequence is gathered first)
        if labels is None:
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                logits = gather_from_tensor_model_parallel_region(logits)
            return logits.transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        loss = loss.transpose(0, 1).contiguous()  # [B, S]
        if loss_mask is not None:
            loss = loss * loss_mask.to(loss.dtype)
        return loss

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        make_pipeline_replicas(sd, [prefix + p for p in self.pipeline_replicated])
        return sd
