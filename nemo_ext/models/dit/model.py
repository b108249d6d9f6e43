"""Cosmos-1 diffusion DiT on megatron-core (same function as ``diffusers.CosmosTransformer3DModel``).

Data flow (megatron layout ``[S, B, *]``)::

    latents [B,C,T,H,W] (+ condition mask, padding mask, task channels)
      -> patchify [S, B, C*p] -> (SP: local slice) -> patch_embed            (first PP stage)
      -> DiTBlock: N x AdaLN-modulated {self-attn + 3D RoPE, cross-attn to context, MLP}
      -> final AdaLN + projection -> (SP: gather) -> unpatchify [B,C,T,H,W]   (last PP stage)

The timestep embedding, RoPE and learnable position embedding are computed on every pipeline stage
(each layer needs them); their parameters are replicated on the stages and their grads summed over
the PP group (``parallel_utils``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_ext.conditioning import Conditioning
from nemo_ext.models.dit.config import DiTConfig
from nemo_ext.models.dit.embeddings import (
    FinalLayer,
    LearnablePosEmbed,
    RoPE3D,
    TimestepEmbedding,
    patchify,
    unpatchify,
)
from nemo_ext.models.dit.layer import DiTBlock, get_dit_layer_spec, select_layer_impl, te_available
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
class DiTTransformerConfig(TransformerConfig):
    """megatron TransformerConfig plus the DiT-specific widths."""

    context_dim: int = 1024
    adaln_lora_dim: int = 256
    sdpa_backend: str = "auto"
    # Replicated conditional embedders on every PP stage: finalize_model_grads sums their grads.
    has_cond_embedder: bool = True


def build_transformer_config(arch: DiTConfig, parallel, dtype: torch.dtype) -> DiTTransformerConfig:
    """``parallel`` is the ``parallel`` config group (tp/pp/cp/sp/recompute)."""
    return DiTTransformerConfig(
        **transformer_config_kwargs(parallel, dtype, arch.num_layers, arch.init_std),
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_attention_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        activation_func=F.gelu,
        gated_linear_unit=False,
        layernorm_epsilon=1e-5,  # the per-head Q/K RMSNorm of the reference model
        context_dim=arch.context_dim,
        adaln_lora_dim=arch.adaln_lora_dim,
        sdpa_backend=arch.attention_backend if arch.attention_backend != "te" else "auto",
    )


class CosmosDiT(MegatronModule):
    def __init__(
        self,
        config: DiTTransformerConfig,
        arch: DiTConfig,
        extra_channels: int = 0,
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
        self.patch_size = tuple(arch.patch_size)
        d = config.hidden_size
        patch_vol = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.in_channels = arch.in_channels(extra_channels)

        if pre_process:
            self.patch_embed = nn.Linear(self.in_channels * patch_vol, d, bias=False)
        self.time_embed = TimestepEmbedding(d)
        self.rope = RoPE3D(arch.head_dim, arch.rope_scale, arch.rope_base_fps)
        max_grid = [m // p for m, p in zip(arch.max_size, self.patch_size)]
        self.extra_pos_embed = (
            LearnablePosEmbed(d, max_grid, init_std=arch.init_std) if arch.extra_pos_embed == "learnable" else None
        )
        self.layer_impl = select_layer_impl(arch.attention_backend, torch.cuda.is_available(), te_available())
        logger.info(
            "DiT layers: %s",
            "transformer-engine (TE linears + fused attention)"
            if self.layer_impl == "te"
            else f"megatron local linears + torch SDPA attention (model.attention_backend={arch.attention_backend})",
        )
        self.decoder = DiTBlock(
            config,
            get_dit_layer_spec(self.layer_impl),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.final_layer = FinalLayer(d, arch.adaln_lora_dim, patch_vol * arch.latent_channels)

        self._init_replicated_weights(arch.init_std)
        # Every parameter in params_dtype (the optimizer keeps fp32 master copies): megatron's
        # mixed-precision optimizer cannot checkpoint fp32 params mixed into a bf16 model. The
        # position embedding, kept in fp32 by the reference, still computes its norm in fp32.
        self.to(config.params_dtype)
        mark_pipeline_replicated(self.time_embed)
        if self.extra_pos_embed is not None:
            mark_pipeline_replicated(self.extra_pos_embed)
        if config.sequence_parallel:
            mark_sequence_parallel_replicated(self)

    # Module prefixes held by every pipeline stage (see parallel_utils).
    pipeline_replicated = ("time_embed.", "extra_pos_embed.")
    # Weights whose input columns follow the input channels: a task's extra channels (Plücker rays, ...)
    # are concatenated last and patchify orders features (C, pt, ph, pw), so a checkpoint with fewer
    # channels holds exactly the first columns; the loader widens it with zero columns (step 0 = base).
    input_widened = ("patch_embed.weight",)

    def _init_replicated_weights(self, std: float) -> None:
        """DiT init: normal linears, AdaLN-Zero (modulations output zero, so every block starts as
        the identity) and a zero output projection. Replaced by imported weights in real runs."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
        for layer in self.decoder.layers:
            for mod in (layer.adaln_self, layer.adaln_cross, layer.adaln_mlp):
                nn.init.zeros_(mod.linear_2.weight)
        nn.init.zeros_(self.time_embed.linear_2.weight)
        if self.pre_process:  # a task's extra channels start with no effect (step 0 = the model without them)
            vol = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
            with torch.no_grad():
                self.patch_embed.weight[:, self.arch.in_channels(0) * vol:].zero_()
        if self.post_process:
            nn.init.zeros_(self.final_layer.adaln.linear_2.weight)
            nn.init.zeros_(self.final_layer.proj_out.weight)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def grid(self, latent_shape) -> tuple[int, int, int]:
        t, h, w = latent_shape[-3:]
        pt, ph, pw = self.patch_size
        return t // pt, h // ph, w // pw

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        padding_mask: Optional[torch.Tensor] = None,
        condition_mask: Optional[torch.Tensor] = None,
        fps: Optional[float] = None,
    ) -> torch.Tensor:
        """x: [B, C, T, H, W] latents (on later PP stages only its shape is used); timestep: [B]
        (or [B, 1, T, 1, 1] per latent frame) EDM c_noise; padding_mask: [B, 1, H', W'] pixel-space
        padding (resized to the latent grid); condition_mask: [B, 1, T, H, W] (Video2World)."""
        b, _, t, h, w = x.shape
        grid = self.grid(x.shape)
        s = grid[0] * grid[1] * grid[2]
        sp = self.config.sequence_parallel
        dtype = self.config.params_dtype

        # Conditioning vectors: [1, B, *] shared by all tokens, or [S, B, *] per latent frame.
        adaln_lora, temb = self.time_embed(timestep)
        if timestep.dim() == 5:
            adaln_lora, temb = (self._per_token(v, b, grid) for v in (adaln_lora, temb))
        else:
            adaln_lora, temb = adaln_lora[None], temb[None]
        if cond.adaln is not None:
            temb = temb + self._conditioning_vector(cond.adaln, b, grid).to(temb.dtype)
        if cond.adaln_lora is not None:
            adaln_lora = adaln_lora + self._conditioning_vector(cond.adaln_lora, b, grid).to(adaln_lora.dtype)
        # Token-dimension tensors are cut to this rank's tokens: its context-parallel chunk and,
        # under sequence parallelism, its tensor-parallel sub-chunk (see parallel_utils).
        if s in (temb.shape[0], adaln_lora.shape[0]):  # per token (either one may still be shared)
            temb, adaln_lora = (local_tokens(v.expand(s, -1, -1), sp) for v in (temb, adaln_lora))
        # RoPE of this CP rank's tokens (the projections gather the TP sub-chunks back first).
        rotary = local_tokens(self.rope(grid, fps=fps, device=x.device), False)
        pos = None
        if self.extra_pos_embed is not None:
            pos = local_tokens(self.extra_pos_embed(grid), sp)

        context = context_mask = None
        if cond.context is not None:
            context = cond.context.transpose(0, 1).to(dtype)  # [S_ctx, B, D_ctx]
            if sp:
                context = sequence_slice(context)
            if cond.context_mask is not None:
                context_mask = ~cond.context_mask.bool()[:, None, None, :]  # megatron: True = masked

        hidden = None
        if self.pre_process:
            inputs = [x]
            if self.arch.video2world:
                inputs.append(condition_mask if condition_mask is not None else x.new_zeros(b, 1, t, h, w))
            if self.arch.concat_padding_mask:
                if padding_mask is None:
                    inputs.append(x.new_zeros(b, 1, t, h, w))
                else:
                    pm = F.interpolate(padding_mask.float(), size=(h, w), mode="nearest")
                    inputs.append(pm[:, :, None].expand(b, 1, t, h, w).to(x.dtype))
            if cond.channels is not None:
                inputs.append(cond.channels.to(x.dtype))
            x_in = torch.cat(inputs, dim=1)
            if x_in.shape[1] != self.in_channels:
                raise ValueError(
                    f"DiT input has {x_in.shape[1]} channels, the model was built for {self.in_channels} "
                    "(latents + masks + task channels)"
                )
            hidden = self.patch_embed(local_tokens(patchify(x_in.to(dtype), self.patch_size), sp))

        hidden = self.decoder(hidden, context, context_mask, rotary, temb, adaln_lora, pos)
        if not self.post_process:
            return hidden
        out = self.final_layer(hidden, temb, adaln_lora)
        # Every rank gets the full output for the loss; the gathers' backward only splits (the
        # loss is the same on all of them): TP sub-chunks first, then CP chunks.
        if sp:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        if parallel_state.get_context_parallel_world_size() > 1:
            out = gather_from_sequence_parallel_region(
                out, tensor_parallel_output_grad=False, group=parallel_state.get_context_parallel_group()
            )
        return unpatchify(out, grid, self.patch_size)

    def _conditioning_vector(self, v: torch.Tensor, b: int, grid) -> torch.Tensor:
        """A task's AdaLN vector: [B, D] for the whole clip -> [1, B, D]; [B, T, D], one per latent
        frame -> [S, B, D] per token (a temporal patch of several latent frames takes their mean)."""
        if v.dim() == 2:
            return v[None]
        pt = self.patch_size[0]
        if v.dim() != 3 or v.shape[0] != b or v.shape[1] != grid[0] * pt:
            raise ValueError(f"a per-frame conditioning vector must be [B={b}, T={grid[0] * pt} latent frames, D], "
                             f"got {tuple(v.shape)}")
        if pt > 1:
            v = v.unflatten(1, (grid[0], pt)).mean(2)
        return self._per_token(v.contiguous(), b, grid)

    @staticmethod
    def _per_token(v: torch.Tensor, b: int, grid) -> torch.Tensor:
        gt, gh, gw = grid
        v = v.view(b, gt, 1, 1, -1).expand(b, gt, gh, gw, v.shape[-1])
        return v.reshape(b, gt * gh * gw, -1).transpose(0, 1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        make_pipeline_replicas(sd, [prefix + p for p in self.pipeline_replicated])
        return sd

