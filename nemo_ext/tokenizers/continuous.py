"""Frozen continuous video tokenizer: Cosmos CV8x8x8 in diffusers' ``AutoencoderKLCosmos`` format.

``model.tokenizer.path`` points at a local diffusers directory (``config.json`` + safetensors,
e.g. the ``vae/`` folder of a Cosmos-1 diffusers release). Without a path the tiny tokenizer is
built: the same class, random weights, seed 0, a few channels - enough for plumbing and tests, no
hub access anywhere. Latents are normalized as the Cosmos pipelines do:
``(z - mean) / std * sigma_data`` with the per-latent-frame statistics stored in the VAE config
(``z * sigma_data`` when it has none).

``model.tokenizer.kind: space_to_depth`` is a weight-free, exactly invertible tokenizer for small
experiments whose metrics are in pixel space (the random tiny VAE only serves plumbing): see
:func:`space_to_depth` / :func:`depth_to_space`. Its latents are the pixels ([-1, 1]) rearranged,
not scaled.
"""

from __future__ import annotations

import logging
import os

import torch

from nemo_ext.models.dit.config import TokenizerConfig

logger = logging.getLogger(__name__)


def build_tiny_autoencoder(cfg: TokenizerConfig):
    """The tiny tokenizer: random weights (seed 0) plus latent statistics, like a released one.

    A random encoder's latents are small and similar across inputs; Cosmos VAEs ship per-channel
    latent mean/std for normalization, so the tiny one gets them too, calibrated on random smooth
    videos (deterministic, independent of any dataset). Measured on the sample world: normalized
    latent std 1.0, between-sample std 0.56 (0.05 before normalization).
    """
    import torch.nn.functional as F
    from diffusers import AutoencoderKLCosmos

    ch = cfg.tiny_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLCosmos(
            latent_channels=cfg.latent_channels,
            encoder_block_out_channels=(ch, ch, ch, ch),
            decode_block_out_channels=(ch, ch, ch, ch),
            attention_resolutions=(),
            resolution=64,
            num_layers=1,
            patch_size=4,
            # A random "rearrange" front end keeps more sample-to-sample variation than Haar.
            patch_type="rearrange",
            spatial_compression_ratio=cfg.spatial_compression,
            temporal_compression_ratio=cfg.temporal_compression,
            latents_mean=None,
            latents_std=None,
        )
    gen = torch.Generator(device="cpu").manual_seed(0)
    frames = 1 + 2 * cfg.temporal_compression
    size = 8 * cfg.spatial_compression
    coarse = torch.rand(8, 3, 3, 8, 8, generator=gen, device="cpu") * 2 - 1
    videos = F.interpolate(coarse, size=(frames, size, size), mode="trilinear")
    with torch.no_grad():
        z = vae.encode(videos).latent_dist.mode()
    max_latent_frames = 16  # the statistics layout of released Cosmos VAEs: [C * T_max]
    mean = z.mean(dim=(0, 2, 3, 4)).repeat_interleave(max_latent_frames)
    std = z.std(dim=(0, 2, 3, 4)).repeat_interleave(max_latent_frames)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return vae


TOKENIZER_KINDS = ("vae", "space_to_depth")


def space_to_depth_channels(cfg: TokenizerConfig) -> int:
    """The latent channels of the space-to-depth tokenizer: 3 x spatial^2 x temporal."""
    return 3 * cfg.spatial_compression ** 2 * cfg.temporal_compression


def space_to_depth(video: torch.Tensor, spatial: int, temporal: int) -> torch.Tensor:
    """video [B, 3, F, H, W], F = 1 + temporal * k -> latents [B, 3 * s * s * temporal, 1 + k, H / s, W / s].

    Each frame is pixel-unshuffled (``s x s`` blocks -> channels); latent frame 0 is the first
    frame alone, repeated ``temporal`` times (the causal layout: it depends on nothing later), then
    each group of ``temporal`` frames is stacked along channels. Channel order: (frame in group,
    color, row in block, column in block)."""
    import torch.nn.functional as F

    b, c, f, h, w = video.shape
    if (f - 1) % temporal or h % spatial or w % spatial:
        raise ValueError(f"space_to_depth: a video of {f} frames at {h}x{w} does not fit temporal_compression="
                         f"{temporal} (1 + {temporal}k frames) and spatial_compression={spatial}")
    x = F.pixel_unshuffle(video.transpose(1, 2).reshape(b * f, c, h, w), spatial)  # [B*F, C*s*s, h, w]
    x = x.reshape(b, f, c * spatial * spatial, h // spatial, w // spatial)
    first = x[:, :1].expand(b, temporal, *x.shape[2:])
    groups = torch.cat([first, x[:, 1:]], dim=1)  # [B, temporal * (1 + k), ...]
    t = 1 + (f - 1) // temporal
    groups = groups.reshape(b, t, temporal * x.shape[2], *x.shape[3:])
    return groups.transpose(1, 2).contiguous()


def depth_to_space(latents: torch.Tensor, spatial: int, temporal: int) -> torch.Tensor:
    """The inverse of :func:`space_to_depth`, exact (latent frame 0: its first copy of the first frame)."""
    import torch.nn.functional as F

    b, ch, t, h, w = latents.shape
    per_frame = ch // temporal
    if per_frame * temporal != ch or per_frame % (spatial * spatial):
        raise ValueError(f"depth_to_space: {ch} channels do not fit temporal_compression={temporal} and "
                         f"spatial_compression={spatial} (expected 3 x {spatial}^2 x {temporal})")
    x = latents.transpose(1, 2).reshape(b, t, temporal, per_frame, h, w)
    first = x[:, :1, 0]  # [B, 1, per_frame, h, w]
    rest = x[:, 1:].reshape(b, (t - 1) * temporal, per_frame, h, w)
    frames = torch.cat([first, rest], dim=1)  # [B, F, per_frame, h, w]
    f = frames.shape[1]
    out = F.pixel_shuffle(frames.reshape(b * f, per_frame, h, w), spatial)
    return out.reshape(b, f, per_frame // (spatial * spatial), h * spatial, w * spatial).transpose(1, 2).contiguous()


def _load_autoencoder(path: str):
    from diffusers import AutoencoderKLCosmos

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.tokenizer.path={path}: expected a diffusers AutoencoderKLCosmos directory with config.json"
        )
    return AutoencoderKLCosmos.from_pretrained(path, local_files_only=True)


class ContinuousVideoTokenizer(torch.nn.Module):
    def __init__(self, cfg: TokenizerConfig, sigma_data: float):
        super().__init__()
        self.cfg = cfg
        self.sigma_data = sigma_data
        kind = getattr(cfg, "kind", "vae")
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"model.tokenizer.kind={kind!r}: expected one of {list(TOKENIZER_KINDS)}")
        self.kind = kind
        if kind == "space_to_depth":
            want = space_to_depth_channels(cfg)
            if cfg.path:
                raise ValueError(f"model.tokenizer.kind=space_to_depth has no weights; unset model.tokenizer.path={cfg.path}")
            if cfg.latent_channels != want:
                raise ValueError(
                    f"model.tokenizer.kind=space_to_depth with spatial_compression={cfg.spatial_compression} and "
                    f"temporal_compression={cfg.temporal_compression} has 3 x {cfg.spatial_compression}^2 x "
                    f"{cfg.temporal_compression} = {want} latent channels, but model.tokenizer.latent_channels="
                    f"{cfg.latent_channels} (set it and model.latent_channels to {want})")
            self.vae = None
            self.register_buffer("latents_mean", None, persistent=False)
            self.register_buffer("latents_std", None, persistent=False)
            return
        self.vae = _load_autoencoder(cfg.path) if cfg.path else build_tiny_autoencoder(cfg)
        vc = self.vae.config
        for field, want, got in (
            ("latent_channels", cfg.latent_channels, vc.latent_channels),
            ("temporal_compression", cfg.temporal_compression, vc.temporal_compression_ratio),
            ("spatial_compression", cfg.spatial_compression, vc.spatial_compression_ratio),
        ):
            if want != got:
                raise ValueError(f"model.tokenizer.{field}={want} but the tokenizer at {cfg.path} has {got}")
        self.vae.requires_grad_(False).eval()
        mean = torch.tensor(vc.latents_mean) if vc.latents_mean is not None else None
        std = torch.tensor(vc.latents_std) if vc.latents_std is not None else None
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        tc, sc = self.cfg.temporal_compression, self.cfg.spatial_compression
        return self.cfg.latent_channels, 1 + (num_frames - 1) // tc, height // sc, width // sc

    def _stats(self, t: int, like: torch.Tensor):
        c = self.cfg.latent_channels
        mean = self.latents_mean.view(1, c, -1, 1, 1)[:, :, :t].to(like)
        std = self.latents_std.view(1, c, -1, 1, 1)[:, :, :t].to(like)
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, C, T, H/8, W/8] (fp32)."""
        if self.vae is None:  # space_to_depth: the pixels themselves
            return space_to_depth(video.float(), self.cfg.spatial_compression, self.cfg.temporal_compression)
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(video.to(dtype)).latent_dist.mode().float()
        if self.latents_mean is None:
            return z * self.sigma_data
        mean, std = self._stats(z.shape[2], z)
        return (z - mean) / std * self.sigma_data

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> video [B, 3, F, H, W] in [-1, 1]."""
        if self.vae is None:
            return depth_to_space(latents.float(), self.cfg.spatial_compression,
                                  self.cfg.temporal_compression).clamp(-1, 1)
        z = latents.float()
        if self.latents_mean is None:
            z = z / self.sigma_data
        else:
            mean, std = self._stats(z.shape[2], z)
            z = z * std / self.sigma_data + mean
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(dtype)).sample.float().clamp(-1, 1)

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode (no dropout) when Lightning switches the module to train."""
        return super().train(False)
