"""Exponential moving average of the trained weights (``trainer.ema_decay``).

Cosmos post-training keeps an EMA of the weights and releases it. The average is fp32, per local
shard (the same TP/PP slices as the parameters), updated after every optimizer step, and stored in
checkpoints as sharded tensors ``ema.<parameter key>`` beside the weights: it reshards across
layouts like them, and ``convert export`` writes it by default. A run that starts (or resumes from
a checkpoint without EMA) begins the average at the current weights.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay={decay} must be in (0, 1)")
        self.model = model
        self.decay = decay
        self.shadow: Optional[dict[str, torch.Tensor]] = None  # lazily = current weights

    def _params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _ensure(self) -> dict[str, torch.Tensor]:
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in self._params()}
        return self.shadow

    @torch.no_grad()
    def update(self) -> None:
        shadow = self._ensure()
        for name, p in self._params():
            shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def sharded_state_dict(self, model_sharded: dict, prefix: str = "model.") -> dict:
        """The EMA tensors with the sharding of ``model_sharded`` (the model's sharded state dict)
        under keys ``ema.<key>``."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        shadow = self._ensure()
        out = {}
        for name, tensor in shadow.items():
            sh = model_sharded.get(prefix + name)
            if isinstance(sh, ShardedTensor):
                out[prefix + name] = dataclasses.replace(sh, key="ema." + sh.key, data=tensor, dtype=tensor.dtype)
            elif isinstance(sh, ShardedTensorFactory):  # e.g. a SwiGLU fc1 saved as its two halves
                out[prefix + name] = dataclasses.replace(sh, key="ema." + sh.key, data=tensor)
        return out

    def load(self, loaded: dict, prefix: str = "model.") -> None:
        shadow = self._ensure()
        for name, tensor in shadow.items():
            if prefix + name in loaded:
                tensor.copy_(loaded[prefix + name])
