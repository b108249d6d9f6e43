"""Input/output embeddings of the Cosmos DiT: patchify, timestep embedding, 3D RoPE, learnable
absolute position embedding, AdaLN-LoRA modulation and the final layer.

All layouts follow ``diffusers.CosmosTransformer3DModel`` exactly (feature order of the patch
embedding and unpatchify, sin/cos order of the timestep projection, the [t, h, w] * 2 order of the
RoPE frequencies), so weights convert without reshuffling.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the reference implementation does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(dtype)


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [S, B, C*pt*ph*pw] tokens in (t, h, w) raster order, features (C, pt, ph, pw)."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)  # [B, S, C*p]
    return x.transpose(0, 1)


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """[S, B, ph*pw*pt*C] -> [B, C, T, H, W]; the output feature order is (ph, pw, pt, C)."""
    t, h, w = grid
    pt, ph, pw = patch
    x = tokens.transpose(0, 1)  # [B, S, F]
    x = x.unflatten(2, (ph, pw, pt, -1)).unflatten(1, (t, h, w))  # [B, t, h, w, ph, pw, pt, C]
    x = x.permute(0, 7, 1, 6, 2, 4, 3, 5)  # [B, C, t, pt, h, ph, w, pw]
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim]; [cos, sin] halves (flip_sin_to_cos=True, no frequency shift)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * exponent.exp()[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """c_noise -> (AdaLN-LoRA vector [N, 3D], normalized timestep embedding [N, D])."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear_1 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.linear_2 = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, eps=1e-6)

    def forward(self, timestep: torch.Tensor):
        proj = timestep_sinusoid(timestep.flatten(), self.hidden_size).to(self.linear_1.weight.dtype)
        adaln_lora = self.linear_2(F.silu(self.linear_1(proj)))
        return adaln_lora, self.norm(proj)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D, r) -> Linear(r, k*D), plus the shared AdaLN-LoRA vector; returns k chunks."""

    def __init__(self, hidden_size: int, lora_dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear_1 = nn.Linear(hidden_size, lora_dim, bias=False)
        self.linear_2 = nn.Linear(lora_dim, chunks * hidden_size, bias=False)

    def forward(self, timestep_emb: torch.Tensor, adaln_lora: Optional[torch.Tensor]):
        mod = self.linear_2(self.linear_1(F.silu(timestep_emb)))
        if adaln_lora is not None:
            mod = mod + adaln_lora[..., : mod.shape[-1]]
        return mod.chunk(self.chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class RoPE3D(nn.Module):
    """Cosmos 3D rotary embedding: head dim split into t/h/w bands with per-axis NTK scaling.

    Returns megatron-layout frequencies ``[S, 1, 1, head_dim]`` (``cat([t, h, w] * 2)``, i.e. the
    rotate-half convention that megatron's ``apply_rotary_pos_emb`` uses). ``theta`` is the base
    (10000 for the DiT, 5e5 for the AR models); subclasses may rescale an axis' frequencies by
    overriding :meth:`axis_freqs` (the AR 12B/13B models' YaRN).
    """

    def __init__(self, head_dim: int, rope_scale: Sequence[float], base_fps: int = 24, theta: float = 10000.0):
        super().__init__()
        self.base_fps = base_fps
        self.dim_h = head_dim // 6 * 2
        self.dim_w = head_dim // 6 * 2
        self.dim_t = head_dim - self.dim_h - self.dim_w
        st, sh, sw = rope_scale
        self.theta_t = theta * st ** (self.dim_t / (self.dim_t - 2))
        self.theta_h = theta * sh ** (self.dim_h / (self.dim_h - 2))
        self.theta_w = theta * sw ** (self.dim_w / (self.dim_w - 2))

    @staticmethod
    def _freqs(dim: int, theta: float, device) -> torch.Tensor:
        rng = torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim
        return 1.0 / (theta**rng)

    def axis_freqs(self, axis: str, device) -> torch.Tensor:
        """Inverse frequencies of one axis ("t", "h" or "w")."""
        dim, theta = {"t": (self.dim_t, self.theta_t), "h": (self.dim_h, self.theta_h), "w": (self.dim_w, self.theta_w)}[axis]
        return self._freqs(dim, theta, device)

    def forward(self, grid: Sequence[int], fps: Optional[float] = None, device=None) -> torch.Tensor:
        t, h, w = grid
        pos_t = torch.arange(t, device=device, dtype=torch.float32)
        if fps is not None:
            pos_t = pos_t / float(fps) * self.base_fps
        emb_t = torch.outer(pos_t, self.axis_freqs("t", device))
        emb_h = torch.outer(torch.arange(h, device=device, dtype=torch.float32), self.axis_freqs("h", device))
        emb_w = torch.outer(torch.arange(w, device=device, dtype=torch.float32), self.axis_freqs("w", device))
        emb_t = emb_t[:, None, None, :].expand(t, h, w, -1)
        emb_h = emb_h[None, :, None, :].expand(t, h, w, -1)
        emb_w = emb_w[None, None, :, :].expand(t, h, w, -1)
        freqs = torch.cat([emb_t, emb_h, emb_w] * 2, dim=-1).reshape(t * h * w, 1, 1, -1)
        return freqs


class LearnablePosEmbed(nn.Module):
    """Per-axis learnable absolute embedding, summed and RMS-normalized in fp32 ([S, 1, D])."""

    def __init__(self, hidden_size: int, max_grid: Sequence[int], eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        self.eps = eps
        self.pos_emb_t = nn.Parameter(torch.empty(max_grid[0], hidden_size))
        self.pos_emb_h = nn.Parameter(torch.empty(max_grid[1], hidden_size))
        self.pos_emb_w = nn.Parameter(torch.empty(max_grid[2], hidden_size))
        for p in (self.pos_emb_t, self.pos_emb_h, self.pos_emb_w):
            nn.init.trunc_normal_(p, std=init_std)

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        t, h, w = grid
        for size, p, axis in ((t, self.pos_emb_t, "t"), (h, self.pos_emb_h, "h"), (w, self.pos_emb_w, "w")):
            if size > p.shape[0]:
                raise ValueError(
                    f"latent {axis}={size} exceeds model.max_size for that axis ({p.shape[0]} after patching); "
                    "raise model.max_size or use a smaller clip"
                )
        emb = self.pos_emb_t[:t, None, None] + self.pos_emb_h[None, :h, None] + self.pos_emb_w[None, None, :w]
        emb = emb.reshape(t * h * w, 1, -1).float()
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        norm = self.eps + norm * math.sqrt(1.0 / emb.shape[-1])
        return emb / norm


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) + LayerNorm + projection to patch_volume * out_channels."""

    def __init__(self, hidden_size: int, lora_dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaln = AdaLNModulation(hidden_size, lora_dim, chunks=2)
        self.proj_out = nn.Linear(hidden_size, out_features, bias=False)

    def forward(self, x: torch.Tensor, timestep_emb: torch.Tensor, adaln_lora: Optional[torch.Tensor]):
        shift, scale = self.adaln(timestep_emb, adaln_lora)
        return self.proj_out(modulate(self.norm(x), shift, scale))
