"""The conditioning bundle every task fills and both model families consume (DESIGN.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class Conditioning:
    """Every field is optional; a model uses what is set.

    context:      [B, S_ctx, D_ctx] cross-attention tokens (T5 text; action tokens for the AR family)
    context_mask: [B, S_ctx] bool, True where a context token is valid (None: attend to all)
    adaln:        [B, D] added to the timestep embedding (e.g. an action or camera summary), or
                  [B, T, D]: one vector per latent frame (each frame's own actions)
    adaln_lora:   [B, 3D] (or [B, T, 3D]) added to the AdaLN-LoRA vector
    channels:     [B, C_extra, T, H, W] concatenated to the latent input (patch embedding widened,
                  new columns zero-initialised)
    views:        number of views stacked on the time axis
    """

    context: Optional[Tensor] = None
    context_mask: Optional[Tensor] = None
    adaln: Optional[Tensor] = None
    adaln_lora: Optional[Tensor] = None
    channels: Optional[Tensor] = None
    views: int = 1


def tokens_then_text(tokens, batch: dict):
    """(context, mask) of a task's cross-attention tokens [B, N, D] followed by the batch's caption
    tokens (``context`` / ``context_mask``, when the task reads text): the AR tasks' context."""
    import torch

    if batch.get("context") is None:
        return tokens, None
    context = torch.cat([tokens, batch["context"].to(tokens.dtype)], dim=1)
    if batch.get("context_mask") is None:
        return context, None
    ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return context, torch.cat([ones, batch["context_mask"].bool()], dim=1)
