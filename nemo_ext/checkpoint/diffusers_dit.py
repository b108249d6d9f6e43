"""Import / export between diffusers' ``CosmosTransformer3DModel`` and our megatron DiT.

The released Cosmos-1 diffusion checkpoints are most widely available in diffusers format: a
``transformer/`` folder with ``config.json`` and safetensors. Import maps every tensor to our
module names (fusing Q/K/V and K/V into megatron's per-head interleaved projections) and writes a
sharded checkpoint that loads at any TP/PP layout (``trainer.init_from=<dir>``); export does the
inverse from any of our checkpoints (EMA weights when the checkpoint has them), bit-exact.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from nemo_ext.models.dit.config import DiTConfig

logger = logging.getLogger(__name__)

# diffusers config keys that describe features our DiT does not have (Cosmos 2.5 / Transfer).
UNSUPPORTED = {"use_crossattn_projection": False, "controlnet_block_every_n": None, "img_context_dim_in": None}
ADALN = (("norm1", "adaln_self"), ("norm2", "adaln_cross"), ("norm3", "adaln_mlp"))


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file, key or field."""


# ---------------------------------------------------------------- config
def dit_config_from_diffusers(config: dict, base: Optional[DiTConfig] = None) -> DiTConfig:
    """A DiTConfig with the architecture of a diffusers config.json (other fields from ``base``)."""
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, 0, False):
            raise ConversionError(f"config.json: {key}={config[key]!r} is not supported by this DiT")
    latent = config.get("out_channels", 16)
    extra_in = config.get("in_channels", 16) - latent
    if extra_in not in (0, 1):
        raise ConversionError(
            f"config.json: in_channels={config['in_channels']} with out_channels={latent}: expected equal "
            "(Text2World) or one more (Video2World condition mask)"
        )
    cfg = copy.deepcopy(base) if base is not None else DiTConfig()
    heads = config.get("num_attention_heads", 32)
    cfg.num_layers = config.get("num_layers", 28)
    cfg.num_attention_heads = heads
    cfg.hidden_size = heads * config.get("attention_head_dim", 128)
    cfg.mlp_ratio = float(config.get("mlp_ratio", 4.0))
    cfg.context_dim = config.get("text_embed_dim", 1024)
    cfg.adaln_lora_dim = config.get("adaln_lora_dim", 256)
    cfg.latent_channels = latent
    cfg.max_size = list(config.get("max_size", (128, 240, 240)))
    cfg.patch_size = list(config.get("patch_size", (1, 2, 2)))
    cfg.rope_scale = [float(x) for x in config.get("rope_scale", (2.0, 1.0, 1.0))]
    cfg.concat_padding_mask = bool(config.get("concat_padding_mask", True))
    cfg.extra_pos_embed = config.get("extra_pos_embed_type", "learnable")
    cfg.video2world = extra_in == 1
    return cfg


def diffusers_config(cfg: DiTConfig) -> dict:
    import diffusers

    return {
        "_class_name": "CosmosTransformer3DModel",
        "_diffusers_version": diffusers.__version__,
        "in_channels": cfg.latent_channels + (1 if cfg.video2world else 0),
        "out_channels": cfg.latent_channels,
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_layers,
        "mlp_ratio": cfg.mlp_ratio,
        "text_embed_dim": cfg.context_dim,
        "adaln_lora_dim": cfg.adaln_lora_dim,
        "max_size": list(cfg.max_size),
        "patch_size": list(cfg.patch_size),
        "rope_scale": list(cfg.rope_scale),
        "concat_padding_mask": cfg.concat_padding_mask,
        "extra_pos_embed_type": cfg.extra_pos_embed,
    }


# ---------------------------------------------------------------- tensors
def _interleave(heads: int, *weights: torch.Tensor) -> torch.Tensor:
    """[q; k; v] row blocks -> megatron's per-head [q_h, k_h, v_h] interleaving."""
    hd = weights[0].shape[0] // heads
    return torch.cat([w.reshape(heads, hd, -1) for w in weights], dim=1).reshape(-1, weights[0].shape[1])


def _deinterleave(heads: int, fused: torch.Tensor, parts: int) -> list[torch.Tensor]:
    hd = fused.shape[0] // heads // parts
    blocks = fused.reshape(heads, parts, hd, -1)
    return [blocks[:, i].reshape(heads * hd, -1) for i in range(parts)]


def diffusers_to_ours(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """diffusers state dict -> our ``net.`` module keys. Raises ConversionError on unknown keys."""
    sd = dict(sd)
    heads = cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"missing tensor {key!r} in the diffusers checkpoint")
        return sd.pop(key)

    out["net.patch_embed.weight"] = take("patch_embed.proj.weight")
    for a in ("linear_1", "linear_2"):
        out[f"net.time_embed.{a}.weight"] = take(f"time_embed.t_embedder.{a}.weight")
        out[f"net.final_layer.adaln.{a}.weight"] = take(f"norm_out.{a}.weight")
    out["net.time_embed.norm.weight"] = take("time_embed.norm.weight")
    out["net.final_layer.proj_out.weight"] = take("proj_out.weight")
    if cfg.extra_pos_embed == "learnable":
        for ax in "thw":
            out[f"net.extra_pos_embed.pos_emb_{ax}"] = take(f"learnable_pos_embed.pos_emb_{ax}")
    for i in range(cfg.num_layers):
        r, o = f"transformer_blocks.{i}.", f"net.decoder.layers.{i}."
        for theirs, ours in ADALN:
            for a in ("linear_1", "linear_2"):
                out[f"{o}{ours}.{a}.weight"] = take(f"{r}{theirs}.{a}.weight")
        out[o + "self_attention.linear_qkv.weight"] = _interleave(heads, *(take(f"{r}attn1.to_{x}.weight") for x in "qkv"))
        out[o + "cross_attention.linear_q.weight"] = take(r + "attn2.to_q.weight")
        out[o + "cross_attention.linear_kv.weight"] = _interleave(heads, take(r + "attn2.to_k.weight"), take(r + "attn2.to_v.weight"))
        for ours, theirs in (("self_attention", "attn1"), ("cross_attention", "attn2")):
            out[f"{o}{ours}.q_layernorm.weight"] = take(f"{r}{theirs}.norm_q.weight")
            out[f"{o}{ours}.k_layernorm.weight"] = take(f"{r}{theirs}.norm_k.weight")
            out[f"{o}{ours}.linear_proj.weight"] = take(f"{r}{theirs}.to_out.0.weight")
        out[o + "mlp.linear_fc1.weight"] = take(r + "ff.net.0.proj.weight")
        out[o + "mlp.linear_fc2.weight"] = take(r + "ff.net.2.weight")
    if sd:
        raise ConversionError(f"unknown tensors in the diffusers checkpoint (not part of this DiT): {sorted(sd)[:10]}")
    return out


def ours_to_diffusers(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Our ``net.`` module keys -> diffusers state dict (the exact inverse of diffusers_to_ours)."""
    sd = {k: v for k, v in sd.items() if k.startswith("net.")}
    heads = cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"missing tensor {key!r} in the checkpoint")
        return sd.pop(key)

    out["patch_embed.proj.weight"] = take("net.patch_embed.weight")
    for a in ("linear_1", "linear_2"):
        out[f"time_embed.t_embedder.{a}.weight"] = take(f"net.time_embed.{a}.weight")
        out[f"norm_out.{a}.weight"] = take(f"net.final_layer.adaln.{a}.weight")
    out["time_embed.norm.weight"] = take("net.time_embed.norm.weight")
    out["proj_out.weight"] = take("net.final_layer.proj_out.weight")
    if cfg.extra_pos_embed == "learnable":
        for ax in "thw":
            out[f"learnable_pos_embed.pos_emb_{ax}"] = take(f"net.extra_pos_embed.pos_emb_{ax}")
    for i in range(cfg.num_layers):
        r, o = f"transformer_blocks.{i}.", f"net.decoder.layers.{i}."
        for theirs, ours in ADALN:
            for a in ("linear_1", "linear_2"):
                out[f"{r}{theirs}.{a}.weight"] = take(f"{o}{ours}.{a}.weight")
        q, k, v = _deinterleave(heads, take(o + "self_attention.linear_qkv.weight"), 3)
        out[r + "attn1.to_q.weight"], out[r + "attn1.to_k.weight"], out[r + "attn1.to_v.weight"] = q, k, v
        out[r + "attn2.to_q.weight"] = take(o + "cross_attention.linear_q.weight")
        k, v = _deinterleave(heads, take(o + "cross_attention.linear_kv.weight"), 2)
        out[r + "attn2.to_k.weight"], out[r + "attn2.to_v.weight"] = k, v
        for ours, theirs in (("self_attention", "attn1"), ("cross_attention", "attn2")):
            out[f"{r}{theirs}.norm_q.weight"] = take(f"{o}{ours}.q_layernorm.weight")
            out[f"{r}{theirs}.norm_k.weight"] = take(f"{o}{ours}.k_layernorm.weight")
            out[f"{r}{theirs}.to_out.0.weight"] = take(f"{o}{ours}.linear_proj.weight")
        out[r + "ff.net.0.proj.weight"] = take(o + "mlp.linear_fc1.weight")
        out[r + "ff.net.2.weight"] = take(o + "mlp.linear_fc2.weight")
    if sd:
        raise ConversionError(f"tensors the diffusers model has no place for: {sorted(sd)[:10]}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- files
def read_diffusers_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a diffusers model folder (single or sharded safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        path = path / "transformer"  # a whole pipeline folder
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: no config.json (expected a diffusers CosmosTransformer3DModel folder)")
    config = json.loads(cfg_file.read_text())
    if config.get("_class_name", "CosmosTransformer3DModel") != "CosmosTransformer3DModel":
        raise ConversionError(f"{cfg_file}: _class_name={config['_class_name']!r}, expected CosmosTransformer3DModel")
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    single = path / "diffusion_pytorch_model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise ConversionError(f"{path}: no diffusion_pytorch_model.safetensors (or its .index.json)")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise ConversionError(f"{path / name}: listed in the index but missing")
        sd.update(load_file(str(path / name)))
    return config, sd


def write_diffusers_dir(path, cfg: DiTConfig, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n")
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
