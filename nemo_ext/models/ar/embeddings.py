"""Position embeddings of the Cosmos AR model, all over the (t, h, w) token grid in raster order.

* :class:`ARRoPE3D` - the DiT's :class:`~nemo_ext.models.dit.embeddings.RoPE3D` (same head-dim split
  h = w = head_dim // 6 * 2, t = the rest; same ``cat([t, h, w] * 2)`` rotate-half layout) with
  base ``rope_theta`` (5e5) and no per-axis NTK scaling, plus the 12B/13B models' YaRN: each
  axis' inverse frequencies ``f`` are multiplied by ``(1 - m) / scale + m`` with
  ``m = clamp((f - 2 pi beta_slow / L) / (2 pi (beta_fast - beta_slow) / L), 0, 1)``, ``L`` being
  the pretraining grid's T for the time band and its H for both spatial bands (the release shares
  one spatial table for h and w). As in the release's default PyTorch RoPE ("v2") and its NeMo
  port, YaRN's magnitude factor (mscale) is *not* applied.
* :class:`SinCosPosEmbed3D` - the fixed absolute table of the Video2World models: the hidden size
  split like the RoPE head dim (h = w = D // 6 * 2, t = rest), each band a 1D ``[sin, cos]``
  embedding of that axis' position with base 10000, concatenated as (t, h, w). No weights.
* learnable: the DiT's :class:`~nemo_ext.models.dit.embeddings.LearnablePosEmbed` (per-axis
  tables summed and RMS-normalized), used as is.

:func:`position_rows` turns a full-grid table into the rows of a token window: a zero row first for
the <bov> token, zero rows for padding past the grid, then the slice ``[offset, offset + S)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from nemo_ext.models.dit.embeddings import RoPE3D


class ARRoPE3D(RoPE3D):
    def __init__(self, head_dim: int, theta: float, yarn_scale: Optional[float] = None,
                 yarn_original_grid: Optional[Sequence[int]] = None, beta_fast: float = 4.0, beta_slow: float = 1.0):
        super().__init__(head_dim, rope_scale=(1.0, 1.0, 1.0), theta=theta)
        self.yarn_scale = yarn_scale
        self.yarn_original_grid = list(yarn_original_grid) if yarn_original_grid is not None else None
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow

    def axis_freqs(self, axis: str, device) -> torch.Tensor:
        freqs = super().axis_freqs(axis, device)
        if self.yarn_scale is None:
            return freqs
        length = self.yarn_original_grid[0] if axis == "t" else self.yarn_original_grid[1]
        high = 2 * math.pi * self.beta_fast / length
        low = 2 * math.pi * self.beta_slow / length
        smooth = torch.clamp((freqs - low) / (high - low), min=0, max=1)
        return freqs * ((1 - smooth) / self.yarn_scale + smooth)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim]: [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim / 2)), in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class SinCosPosEmbed3D(nn.Module):
    """Fixed 3D sin-cos absolute embedding ``[S, 1, D]`` (float32) of a (t, h, w) grid."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dim_h = self.dim_w = hidden_size // 6 * 2
        self.dim_t = hidden_size - 2 * self.dim_h
        if self.dim_t % 2 or self.dim_h % 2:
            raise ValueError(f"sin-cos position embedding: hidden size {hidden_size} splits into odd bands")

    def forward(self, grid: Sequence[int], device=None) -> torch.Tensor:
        t, h, w = grid
        emb_t = _sincos_1d(self.dim_t, torch.arange(t, device=device))
        emb_h = _sincos_1d(self.dim_h, torch.arange(h, device=device))
        emb_w = _sincos_1d(self.dim_w, torch.arange(w, device=device))
        emb = torch.cat(
            [
                emb_t[:, None, None, :].expand(t, h, w, -1),
                emb_h[None, :, None, :].expand(t, h, w, -1),
                emb_w[None, None, :, :].expand(t, h, w, -1),
            ],
            dim=-1,
        )
        return emb.reshape(t * h * w, 1, -1).float()


def position_rows(table: torch.Tensor, bov: bool, offset: int, length: int) -> torch.Tensor:
    """Rows ``[offset, offset + length)`` of a position table ``[T*H*W, ...]`` of the video tokens,
    with a zero row in front for the <bov> token and zero rows past the grid (padding)."""
    zero = table.new_zeros((1, *table.shape[1:]))
    parts = [zero, table] if bov else [table]
    full = torch.cat(parts, dim=0)
    end = offset + length
    if end > full.shape[0]:
        full = torch.cat([full, table.new_zeros((end - full.shape[0], *table.shape[1:]))], dim=0)
    return full[offset:end]
