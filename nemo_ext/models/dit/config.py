"""Typed configuration of the Cosmos diffusion DiT (the ``model`` config group, diffusion family).

One dataclass describes every size: ``dit_tiny`` used by the tests and the CPU default run, and the
``dit_7b`` / ``dit_14b`` shapes of the released Cosmos-1 models, are presets of it (YAML files in
``recipes/_base/model``). Shapes follow ``diffusers.CosmosTransformer3DModel`` so that its
checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from nemo_ext.diffusion.edm import EDMConfig


@dataclass
class TokenizerConfig:
    """The frozen continuous video tokenizer (Cosmos CV8x8x8 / diffusers ``AutoencoderKLCosmos``).

    ``kind: vae`` (default): ``path`` is a local directory in diffusers format (``config.json`` +
    safetensors); ``null`` builds the tiny deterministic random-weight tokenizer of the same class
    (plumbing and tests only: its decoder output is not an image).
    ``kind: space_to_depth``: no weights, exactly invertible (pixel-unshuffle ``spatial_compression``
    x ``spatial_compression``, then ``temporal_compression`` frames stacked per latent frame after
    the first frame, which stands alone as in the causal Cosmos layout); ``latent_channels`` must be
    ``3 * spatial_compression**2 * temporal_compression`` (192 for 8x8 spatial in image mode,
    ``temporal_compression: 1``). For small experiments whose metrics are in pixel space.
    """

    path: Optional[str] = None
    latent_channels: int = 16
    temporal_compression: int = 8
    spatial_compression: int = 8
    # Channel widths of the built-in tiny tokenizer (ignored when ``path`` is set).
    tiny_channels: int = 16
    kind: str = "vae"  # vae | space_to_depth


@dataclass
class TextEncoderConfig:
    """The frozen T5 text encoder. ``path``: a local transformers directory; ``null``: tiny random T5."""

    path: Optional[str] = None
    max_length: int = 512
    # Shape of the built-in tiny T5 (ignored when ``path`` is set). Its d_model is ``model.context_dim``.
    tiny_layers: int = 2
    tiny_heads: int = 2


@dataclass
class DiTConfig:
    family: str = "diffusion"
    name: str = "dit"
    # Transformer
    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    mlp_ratio: float = 4.0
    adaln_lora_dim: int = 256
    context_dim: int = 1024  # cross-attention context width (T5-XXL: 1024)
    # Latent video interface
    latent_channels: int = 16
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
    max_size: List[int] = field(default_factory=lambda: [128, 240, 240])  # latent T, H, W
    rope_scale: List[float] = field(default_factory=lambda: [2.0, 1.0, 1.0])
    rope_base_fps: int = 24
    extra_pos_embed: Optional[str] = "learnable"  # learnable | null
    concat_padding_mask: bool = True
    # Video2World: the model takes a condition-mask channel; the first `condition_latent_frames`
    # latent frames of a clip are given (lightly noised) and only the rest is generated.
    # Cosmos-1 Video2World conditions on 9 pixel frames = 2 latent frames.
    video2world: bool = False
    condition_latent_frames: int = 2
    condition_augment_sigma: float = 0.001
    # Attention kernel: auto picks cuDNN > flash > efficient SDPA on GPU; "math" is the reference path.
    attention_backend: str = "auto"
    init_std: float = 0.02
    # The learning rate recipes use for this model size (optim presets interpolate it).
    post_training_lr: float = 5e-5
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)

    # Fields that define the weights (checkpoints are compatible iff these agree).
    ARCHITECTURE = (
        "num_layers", "hidden_size", "num_attention_heads", "mlp_ratio", "context_dim", "adaln_lora_dim",
        "latent_channels", "max_size", "patch_size", "rope_scale", "concat_padding_mask", "extra_pos_embed",
        "video2world",
    )

    def architecture(self) -> dict:
        return {f: _plain(getattr(self, f)) for f in self.ARCHITECTURE}

    # ---- derived values (computed here, once) ----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def in_channels(self, extra_channels: int = 0) -> int:
        """Channels entering the patch embedding: latents + masks + task channels."""
        return (
            self.latent_channels
            + (1 if self.video2world else 0)
            + (1 if self.concat_padding_mask else 0)
            + extra_channels
        )

    def num_tokens(self, latent_thw) -> int:
        t, h, w = latent_thw
        pt, ph, pw = self.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def flops_per_sample(self, latent_thw, context_len: int, extra_channels: int = 0) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one sample, matmuls only.

        Counts: per-token linear layers (self-attn QKV/out, cross-attn Q/out, MLP), the self-attention
        S^2 term, the cross-attention S*S_ctx term and its K/V projection of the context, patch embed
        and final projection per token; the AdaLN(-LoRA) modulation and timestep MLP once per sample.
        Activation recompute is not counted (it is not useful work).
        """
        d, f, n = self.hidden_size, self.ffn_hidden_size, self.num_layers
        s = self.num_tokens(latent_thw)
        patch_vol = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        per_token_params = n * (4 * d * d + 2 * d * d + 2 * d * f)
        per_token_params += self.in_channels(extra_channels) * patch_vol * d  # patch embed
        per_token_params += d * patch_vol * self.latent_channels  # final projection
        fwd = 2 * per_token_params * s
        fwd += n * 4 * d * s * s  # self-attention QK^T and AV
        fwd += n * 4 * d * s * context_len  # cross-attention QK^T and AV
        fwd += n * 2 * (2 * self.context_dim * d) * context_len  # cross-attention K/V projections
        lora = self.adaln_lora_dim
        per_sample_params = n * 3 * (d * lora + lora * 3 * d) + (d * lora + lora * 2 * d)
        per_sample_params += d * d + d * 3 * d  # timestep MLP
        fwd += 2 * per_sample_params
        return 3.0 * fwd


def _plain(value):
    """Lists of numbers compare equal whether they came from YAML ints or JSON floats."""
    return [float(x) for x in value] if isinstance(value, (list, tuple)) else value


def architecture_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two ``architecture()`` dicts (keys present in both)."""
    return [
        f"{k}: {saved[k]!r} vs {current[k]!r}"
        for k in current
        if k in saved and _plain(saved[k]) != _plain(current[k])
    ]
