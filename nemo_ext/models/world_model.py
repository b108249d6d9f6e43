"""The trained model of every recipe: a task conditioner plus a family network.

The conditioner turns a batch into a :class:`~nemo_ext.conditioning.Conditioning`; the network
(diffusion DiT or autoregressive GPT) consumes it. Both sit in one megatron module so that one
DDP wrapper, one optimizer and one sharded checkpoint cover them. The conditioner is replicated on
every pipeline stage (each stage's layers need the conditioning).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from nemo_ext.models.parallel_utils import (
    make_pipeline_replicas,
    mark_pipeline_replicated,
    mark_sequence_parallel_replicated,
)


class WorldModel(MegatronModule):
    # No input embedding is tied to an output layer (megatron's finalize_model_grads asks).
    share_embeddings_and_output_weights = False

    def __init__(self, config, net: MegatronModule, conditioner: nn.Module):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.conditioner = conditioner.to(config.params_dtype)
        self.net = net
        mark_pipeline_replicated(self.conditioner)
        if config.sequence_parallel:
            mark_sequence_parallel_replicated(self.conditioner)

    # Pipeline stage flags, read by megatron's schedules.
    @property
    def pre_process(self) -> bool:
        return self.net.pre_process

    @property
    def post_process(self) -> bool:
        return self.net.post_process

    def set_input_tensor(self, input_tensor) -> None:
        self.net.set_input_tensor(input_tensor)

    def forward(self, x, timestep, batch: dict, **net_kwargs):
        """Diffusion: ``net(x_t, timestep, conditioning)``. Autoregressive nets (``timestep`` None)
        take the token ids and the conditioning's cross-attention context (text, or a task's tokens)."""
        cond = self.conditioner(batch)
        if getattr(self.net, "conditioned_by", "bundle") == "context":
            return self.net(x, context=cond.context, context_mask=cond.context_mask, **net_kwargs)
        return self.net(x, timestep, cond, **net_kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        make_pipeline_replicas(sd, [prefix + "conditioner."])
        return sd
