"""Our megatron DiT is diffusers' CosmosTransformer3DModel: a tiny random reference model is
imported through the converter and both run on the same inputs (several configurations); export
gives back identical tensors; bad sources fail naming the file, key or field."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from support import REPO

CONFIGS = {
    # name: (diffusers kwargs, latent [T, H, W], per-frame timestep)
    "t2w_non_square": (dict(num_layers=2, max_size=(8, 32, 32)), (3, 8, 12), False),
    "t2w_per_frame_timestep": (dict(num_layers=2, max_size=(8, 32, 32)), (3, 8, 8), True),
    "t2w_no_pos_embed": (dict(num_layers=1, extra_pos_embed_type=None), (2, 4, 6), False),
    "v2w": (dict(num_layers=2, in_channels=17, max_size=(8, 32, 32)), (3, 6, 10), False),
}
BASE = dict(out_channels=16, in_channels=16, num_attention_heads=4, attention_head_dim=16, mlp_ratio=4.0,
            text_embed_dim=32, adaln_lora_dim=16, patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
            concat_padding_mask=True, extra_pos_embed_type="learnable")


def _diffusers_model(**overrides):
    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel

    if not hasattr(tc, "transforms"):  # torchvision is not installed: its NEAREST resize is interpolate
        tc.transforms = types.SimpleNamespace(
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            functional=types.SimpleNamespace(resize=lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")),
        )
    torch.manual_seed(0)
    model = CosmosTransformer3DModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return model


def _load_ours(ckpt, cfg):
    from nemo_ext.checkpoint import read_tensors, unstack_layers
    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
    from nemo_ext.models.world_model import WorldModel
    from nemo_ext.tasks.general import TextConditioner

    layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None,
                                   recompute_method="uniform", recompute_num_layers=1)
    cfg.attention_backend = "math"
    config = build_transformer_config(cfg, layout, torch.float32)
    model = WorldModel(config, CosmosDiT(config, cfg), TextConditioner()).eval()
    weights = unstack_layers(read_tensors(ckpt, prefixes=["model."]), prefix="model.")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_model_matches_diffusers(megatron_world, tmp_path, name):
    from nemo_ext.checkpoint import import_diffusers

    kwargs, (t, h, w), per_frame = CONFIGS[name]
    ref = _diffusers_model(**kwargs)
    ref.save_pretrained(tmp_path / "diffusers")
    cfg = import_diffusers(tmp_path / "diffusers", tmp_path / "ckpt")
    ours = _load_ours(tmp_path / "ckpt", cfg)

    g = torch.Generator().manual_seed(1)
    b = 2
    x = torch.randn(b, 16, t, h, w, generator=g)
    ctx = torch.randn(b, 8, 32, generator=g)
    ts = torch.rand(b, 1, t, 1, 1, generator=g) if per_frame else torch.rand(b, generator=g)
    kw = {}
    if cfg.video2world:
        cond = torch.zeros(b, 1, t, h, w)
        cond[:, :, :1] = 1.0
        kw["condition_mask"] = cond
    with torch.no_grad():
        expected = ref(x, ts, ctx, fps=24, padding_mask=torch.zeros(1, 1, 8 * h, 8 * w), return_dict=False, **kw)[0]
        got = ours(x, ts, {"context": ctx}, fps=24, **kw)
    assert got.shape == expected.shape == x.shape
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-5, rel


def test_export_round_trip_is_bit_exact(megatron_world, tmp_path):
    from nemo_ext.checkpoint import export_diffusers, import_diffusers

    ref = _diffusers_model(num_layers=2, in_channels=17, max_size=(8, 32, 32))
    ref.save_pretrained(tmp_path / "src")
    import_diffusers(tmp_path / "src", tmp_path / "ckpt")
    assert export_diffusers(tmp_path / "ckpt", tmp_path / "dst") == "raw"
    original = load_file(str(tmp_path / "src" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(tmp_path / "dst" / "diffusion_pytorch_model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    dst_cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    for key, value in dst_cfg.items():
        if not key.startswith("_"):
            assert src_cfg[key] == value, key


def test_conversion_errors_name_the_problem(megatron_world, tmp_path):
    from nemo_ext.checkpoint import ConversionError, import_diffusers
    from nemo_ext.models.dit.config import DiTConfig

    with pytest.raises(ConversionError, match="no config.json"):
        import_diffusers(tmp_path / "nowhere", tmp_path / "a")

    ref = _diffusers_model(num_layers=1)
    ref.save_pretrained(tmp_path / "src")
    weights = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))

    save_file({**sd, "transformer_blocks.0.extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(ConversionError, match="transformer_blocks.0.extra.weight"):
        import_diffusers(tmp_path / "src", tmp_path / "b")

    bad = dict(sd)
    bad["proj_out.weight"] = torch.zeros(3, 3)
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"model\.net\.final_layer\.proj_out\.weight: shape \(3, 3\)"):
        import_diffusers(tmp_path / "src", tmp_path / "c")

    save_file(sd, str(weights))
    with pytest.raises(ConversionError, match="num_layers: 1"):
        import_diffusers(tmp_path / "src", tmp_path / "d", expected=DiTConfig(name="dit_7b"))


def test_convert_cli_round_trip(tmp_path):
    ref = _diffusers_model(num_layers=4, max_size=(16, 32, 32))  # the dit_tiny architecture
    ref.save_pretrained(tmp_path / "src")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nemo_ext.cli.convert", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    out = cli("import", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "ckpt"), "--model", "dit_tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dit_tiny" in out.stdout  # reported as a matching preset
    out = cli("import", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "ckpt2"), "--model", "dit_7b")
    assert out.returncode == 2 and "does not match model=dit_7b" in out.stderr
    out = cli("export", "--from", str(tmp_path / "ckpt"), "--to", str(tmp_path / "dst"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "dst" / "config.json").is_file()

