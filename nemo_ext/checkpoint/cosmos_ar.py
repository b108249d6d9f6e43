"""Released Cosmos-1 autoregressive checkpoints (``model.pt``) <-> our CosmosAR weights.

The release (``nvidia/Cosmos-1.0-Autoregressive-{4B,5B-Video2World,12B,13B-Video2World}/model.pt``)
is a flat PyTorch state dict of the native ``cosmos1.models.autoregressive.networks.transformer.
Transformer`` with a ``model.`` prefix (the native loader also accepts it nested under ``"model"``
or unprefixed, and drops TransformerEngine ``_extra_state`` keys; so does :func:`read_cosmos_ar_pt`).
Key names and layouts were read in NVIDIA/NeMo ``nemo/collections/physicalai/Cosmos/cosmos1/
models/autoregressive/``: ``networks/transformer.py`` (module names), ``modules/attention.py``
(``wq/wk/wv/wo``, ``q_norm``/``k_norm`` over the head dim, GQA), ``modules/mlp.py`` (SwiGLU
``w2(silu(w1 x) * w3 x)``), and the NeMo importers ``nemo/cosmos.py`` / ``nemo/cosmos_video2world.py``
(``PTCosmosImporter``: the same ``model.*`` keys mapped onto megatron names). Not checked against a
downloaded ``model.pt`` (no network here): the tests build state dicts of this layout.

Mapping (``i`` = layer; ours are module keys of ``CosmosAR``, written under ``model.net.``):

=====================================================  =====================================================
Cosmos ``model.pt``                                    ours (``net.`` ...)
=====================================================  =====================================================
``model.tok_embeddings.weight`` [V_in, D]              ``embedding.weight``
``model.layers.i.attention_norm.weight``               ``decoder.layers.i.input_layernorm.weight``
``model.layers.i.attention.{wq,wk,wv}.weight``         ``decoder.layers.i.self_attention.linear_qkv.weight``
                                                       (per KV group g: [q heads of g; k_g; v_g])
``model.layers.i.attention.{q_norm,k_norm}.weight``    ``...self_attention.{q_layernorm,k_layernorm}.weight``
``model.layers.i.attention.wo.weight``                 ``...self_attention.linear_proj.weight``
``model.layers.i.cross_attention_norm.weight``         ``...pre_cross_attn_layernorm.weight``      (V2W)
``model.layers.i.cross_attention.wq.weight``           ``...cross_attention.linear_q.weight``      (V2W)
``model.layers.i.cross_attention.{wk,wv}.weight``      ``...cross_attention.linear_kv.weight``     (V2W)
  [KV*hd, context_dim]                                 (per KV group g: [k_g; v_g])
``model.layers.i.cross_attention.{q_norm,k_norm}``     ``...cross_attention.{q_layernorm,k_layernorm}.weight``
``model.layers.i.cross_attention.wo.weight``           ``...cross_attention.linear_proj.weight``   (V2W)
``model.layers.i.ffn_norm.weight``                     ``...pre_mlp_layernorm.weight``
``model.layers.i.feed_forward.{w1,w3}.weight``         ``...mlp.linear_fc1.weight`` = cat(w1, w3)
``model.layers.i.feed_forward.w2.weight``              ``...mlp.linear_fc2.weight``
``model.norm.weight``                                  ``final_norm.weight``
``model.output.weight`` [64000, D]                     ``output_layer.weight``
=====================================================  =====================================================

The RoPE and the Video2World sin-cos table are computed, not stored. ``V_in`` is 64000 for the
base models and 64064 for Video2World (64000 codes + <bov>, rounded up to 64: the native loader
expands the embedding to that size *before* its strict load, so the file must hold it; our reading,
unconfirmed on a real file). Import and export are exact inverses (bit-exact round trip).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from nemo_ext.checkpoint.diffusers_dit import ConversionError
from nemo_ext.models.ar.config import ARConfig

logger = logging.getLogger(__name__)

PREFIX = "model."
_SKIP = ("_extra_state",)


# ---------------------------------------------------------------- tensors
def _qkv_to_ours(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], heads: int, groups: int) -> torch.Tensor:
    """Separate projections -> megatron's per-group interleaving [q_g (heads/groups heads); k_g; v_g]
    (``q`` may be None for the cross-attention's [k_g; v_g])."""
    parts = []
    hd = k.shape[0] // groups
    if q is not None:
        parts.append(q.reshape(groups, heads // groups * hd, -1))
    parts += [k.reshape(groups, hd, -1), v.reshape(groups, hd, -1)]
    return torch.cat(parts, dim=1).reshape(-1, k.shape[1])


def _qkv_from_ours(fused: torch.Tensor, heads: int, groups: int, with_q: bool) -> list[torch.Tensor]:
    per_group = (heads // groups if with_q else 0) + 2
    hd = fused.shape[0] // groups // per_group
    blocks = fused.reshape(groups, per_group * hd, -1)
    out, start = [], 0
    if with_q:
        qh = heads // groups * hd
        out.append(blocks[:, :qh].reshape(heads * hd, -1))
        start = qh
    out.append(blocks[:, start:start + hd].reshape(groups * hd, -1))
    out.append(blocks[:, start + hd:start + 2 * hd].reshape(groups * hd, -1))
    return out


def _expected_shapes(cfg: ARConfig) -> dict[str, tuple]:
    d, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    out = {"tok_embeddings.weight": (cfg.embedding_vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        r = f"layers.{i}."
        out.update({
            r + "attention_norm.weight": (d,), r + "ffn_norm.weight": (d,),
            r + "attention.wq.weight": (q, d), r + "attention.wk.weight": (kv, d), r + "attention.wv.weight": (kv, d),
            r + "attention.wo.weight": (d, q), r + "attention.q_norm.weight": (hd,), r + "attention.k_norm.weight": (hd,),
            r + "feed_forward.w1.weight": (f, d), r + "feed_forward.w3.weight": (f, d), r + "feed_forward.w2.weight": (d, f),
        })
        if cfg.cross_attention:
            c = cfg.context_dim
            out.update({
                r + "cross_attention_norm.weight": (d,),
                r + "cross_attention.wq.weight": (q, d), r + "cross_attention.wk.weight": (kv, c),
                r + "cross_attention.wv.weight": (kv, c), r + "cross_attention.wo.weight": (d, q),
                r + "cross_attention.q_norm.weight": (hd,), r + "cross_attention.k_norm.weight": (hd,),
            })
    return out


def _check_supported(cfg: ARConfig) -> None:
    if cfg.abs_pos_emb == "learnable":
        raise ConversionError(
            "model.abs_pos_emb=learnable: the released Cosmos AR checkpoints have no learnable position table "
            "(base models: none, Video2World: a fixed sin-cos one); use abs_pos_emb=null or sincos"
        )


def cosmos_ar_to_ours(sd: dict[str, torch.Tensor], cfg: ARConfig) -> dict[str, torch.Tensor]:
    """Released layout (keys without the ``model.`` prefix, see :func:`read_cosmos_ar_pt`) -> our
    ``net.`` module keys. Raises ConversionError naming missing, unknown or mis-shaped tensors."""
    _check_supported(cfg)
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ConversionError(f"missing tensors for model={cfg.name} ({len(missing)}): {missing[:10]}")
    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise ConversionError(
            f"tensors model={cfg.name} has no place for ({len(unknown)}; e.g. a Video2World checkpoint for a base "
            f"preset): {unknown[:10]}"
        )
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ConversionError(f"model.{key}: shape {tuple(sd[key].shape)} in the checkpoint, model={cfg.name} expects {shape}")
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    out = {
        "net.embedding.weight": sd["tok_embeddings.weight"],
        "net.final_norm.weight": sd["norm.weight"],
        "net.output_layer.weight": sd["output.weight"],
    }
    for i in range(cfg.num_layers):
        r, o = f"layers.{i}.", f"net.decoder.layers.{i}."
        out[o + "input_layernorm.weight"] = sd[r + "attention_norm.weight"]
        out[o + "self_attention.linear_qkv.weight"] = _qkv_to_ours(
            sd[r + "attention.wq.weight"], sd[r + "attention.wk.weight"], sd[r + "attention.wv.weight"], heads, groups
        )
        out[o + "self_attention.q_layernorm.weight"] = sd[r + "attention.q_norm.weight"]
        out[o + "self_attention.k_layernorm.weight"] = sd[r + "attention.k_norm.weight"]
        out[o + "self_attention.linear_proj.weight"] = sd[r + "attention.wo.weight"]
        if cfg.cross_attention:
            out[o + "pre_cross_attn_layernorm.weight"] = sd[r + "cross_attention_norm.weight"]
            out[o + "cross_attention.linear_q.weight"] = sd[r + "cross_attention.wq.weight"]
            out[o + "cross_attention.linear_kv.weight"] = _qkv_to_ours(
                None, sd[r + "cross_attention.wk.weight"], sd[r + "cross_attention.wv.weight"], heads, groups
            )
            out[o + "cross_attention.q_layernorm.weight"] = sd[r + "cross_attention.q_norm.weight"]
            out[o + "cross_attention.k_layernorm.weight"] = sd[r + "cross_attention.k_norm.weight"]
            out[o + "cross_attention.linear_proj.weight"] = sd[r + "cross_attention.wo.weight"]
        out[o + "pre_mlp_layernorm.weight"] = sd[r + "ffn_norm.weight"]
        out[o + "mlp.linear_fc1.weight"] = torch.cat([sd[r + "feed_forward.w1.weight"], sd[r + "feed_forward.w3.weight"]], 0)
        out[o + "mlp.linear_fc2.weight"] = sd[r + "feed_forward.w2.weight"]
    return out


def ours_to_cosmos_ar(sd: dict[str, torch.Tensor], cfg: ARConfig) -> dict[str, torch.Tensor]:
    """Our ``net.`` module keys -> the released layout with the ``model.`` prefix (the exact inverse
    of :func:`cosmos_ar_to_ours`)."""
    _check_supported(cfg)
    sd = {k: v for k, v in sd.items() if k.startswith("net.") and not k.endswith(_SKIP)}
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"missing tensor {key!r} in the checkpoint")
        return sd.pop(key)

    out["tok_embeddings.weight"] = take("net.embedding.weight")
    out["norm.weight"] = take("net.final_norm.weight")
    out["output.weight"] = take("net.output_layer.weight")
    for i in range(cfg.num_layers):
        r, o = f"layers.{i}.", f"net.decoder.layers.{i}."
        out[r + "attention_norm.weight"] = take(o + "input_layernorm.weight")
        q, k, v = _qkv_from_ours(take(o + "self_attention.linear_qkv.weight"), heads, groups, with_q=True)
        out[r + "attention.wq.weight"], out[r + "attention.wk.weight"], out[r + "attention.wv.weight"] = q, k, v
        out[r + "attention.q_norm.weight"] = take(o + "self_attention.q_layernorm.weight")
        out[r + "attention.k_norm.weight"] = take(o + "self_attention.k_layernorm.weight")
        out[r + "attention.wo.weight"] = take(o + "self_attention.linear_proj.weight")
        if cfg.cross_attention:
            out[r + "cross_attention_norm.weight"] = take(o + "pre_cross_attn_layernorm.weight")
            out[r + "cross_attention.wq.weight"] = take(o + "cross_attention.linear_q.weight")
            k, v = _qkv_from_ours(take(o + "cross_attention.linear_kv.weight"), heads, groups, with_q=False)
            out[r + "cross_attention.wk.weight"], out[r + "cross_attention.wv.weight"] = k, v
            out[r + "cross_attention.q_norm.weight"] = take(o + "cross_attention.q_layernorm.weight")
            out[r + "cross_attention.k_norm.weight"] = take(o + "cross_attention.k_layernorm.weight")
            out[r + "cross_attention.wo.weight"] = take(o + "cross_attention.linear_proj.weight")
        out[r + "ffn_norm.weight"] = take(o + "pre_mlp_layernorm.weight")
        w1, w3 = take(o + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[r + "feed_forward.w1.weight"], out[r + "feed_forward.w3.weight"] = w1, w3
        out[r + "feed_forward.w2.weight"] = take(o + "mlp.linear_fc2.weight")
    if sd:
        raise ConversionError(f"tensors the released Cosmos AR layout has no place for: {sorted(sd)[:10]}")
    return {PREFIX + k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- files
def read_cosmos_ar_pt(path) -> dict[str, torch.Tensor]:
    """The tensors of a released ``model.pt`` / ``.pth`` / ``.safetensors``, keys without ``model.``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("model.pt", "model.pth", "model.safetensors") if (path / n).is_file()]
        if not candidates:
            raise ConversionError(f"{path}: no model.pt / model.pth / model.safetensors (a Cosmos AR checkpoint folder)")
        path = candidates[0]
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors (optionally under 'model')")
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in sd.items() if not k.endswith(_SKIP)}


def write_cosmos_ar_pt(path, sd: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        path = path / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))


# ---------------------------------------------------------------- our checkpoints
def ar_template(cfg: ARConfig, dtype: torch.dtype, prefix: str = "model.net.") -> dict:
    """Sharded state dict of a one-process CosmosAR built on the meta device."""
    from nemo_ext.checkpoint import meta_template
    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config

    return meta_template(CosmosAR, build_transformer_config, cfg, dtype, prefix)


def ar_config_of(ckpt_dir) -> ARConfig:
    """The ARConfig a checkpoint was written with (its content metadata)."""
    from megatron.core import dist_checkpointing

    from nemo_ext.models.dit.config import TextEncoderConfig
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    meta = dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {}
    model = meta.get("model")
    if not model or model.get("family") != "ar":
        raise ConversionError(f"{ckpt_dir}: not an AR-family checkpoint of cosmos-recipes (no model.family=ar in its metadata)")
    fields = ARConfig.__dataclass_fields__
    kwargs = {k: v for k, v in model.items() if k in fields and k not in ("tokenizer", "text_encoder")}
    tok_fields = DiscreteTokenizerConfig.__dataclass_fields__
    txt_fields = TextEncoderConfig.__dataclass_fields__
    kwargs["tokenizer"] = DiscreteTokenizerConfig(**{k: v for k, v in (model.get("tokenizer") or {}).items() if k in tok_fields})
    kwargs["text_encoder"] = TextEncoderConfig(**{k: v for k, v in (model.get("text_encoder") or {}).items() if k in txt_fields})
    return ARConfig(**kwargs)


def write_ar_checkpoint(template: dict, tensors: dict[str, torch.Tensor], out_dir, content_metadata: dict,
                        key_prefix: str = "model.") -> None:
    """:func:`nemo_ext.checkpoint.plain.write_model_checkpoint` with the AR keys' prefix."""
    from nemo_ext.checkpoint.plain import write_model_checkpoint

    write_model_checkpoint(template, tensors, out_dir, content_metadata, key_prefix=key_prefix)


def import_cosmos_ar(src, dst, cfg: ARConfig) -> ARConfig:
    """A released ``model.pt`` with the architecture of ``cfg`` (a model preset) -> our sharded
    checkpoint (loads at any TP/PP layout: ``trainer.init_from=<dst>``)."""
    from nemo_ext.checkpoint import single_process_world

    ours = cosmos_ar_to_ours(read_cosmos_ar_pt(src), cfg)
    dtypes = {v.dtype for v in ours.values()}
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else next(iter(dtypes))
    with single_process_world():
        write_ar_checkpoint(
            ar_template(cfg, dtype), ours, dst,
            content_metadata={"model": asdict(cfg), "source": f"cosmos_ar:{Path(src).resolve()}"},
        )
    logger.info("imported %d tensors from %s into %s", len(ours), src, dst)
    return cfg


def export_cosmos_ar(src, dst, weights: str = "auto") -> str:
    """Our AR checkpoint (any layout) -> a released-layout ``model.pt`` (``dst``: a .pt path or a
    folder). ``weights``: auto (EMA when present) | ema | raw. Returns which weights were written."""
    from nemo_ext.checkpoint import exported_weights

    ckpt, cfg, ours, chosen = exported_weights(src, weights, ar_config_of)
    write_cosmos_ar_pt(dst, ours_to_cosmos_ar(ours, cfg))
    logger.info("exported %s weights of %s to %s", chosen, ckpt, dst)
    return chosen
