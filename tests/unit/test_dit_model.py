"""The megatron DiT against the reference implementation (diffusers CosmosTransformer3DModel) on
the same weights, its FLOPs accounting against a FLOP counter, and the CPU compatibility layer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process gloo world with megatron's parallel state (CPU layer on when no GPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    init_model_parallel(types.SimpleNamespace(tp=1, pp=1, cp=1), seed=0)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _parallel(**kw):
    base = dict(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None, recompute_method="uniform",
                recompute_num_layers=1)
    return types.SimpleNamespace(**{**base, **kw})


def _reference_model(cfg):
    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel

    if not hasattr(tc, "transforms"):  # torchvision is absent here; its NEAREST resize is interpolate
        tc.transforms = types.SimpleNamespace(
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            functional=types.SimpleNamespace(resize=lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")),
        )
    torch.manual_seed(0)
    ref = CosmosTransformer3DModel(
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.num_layers, mlp_ratio=cfg.mlp_ratio,
        text_embed_dim=cfg.context_dim, adaln_lora_dim=cfg.adaln_lora_dim, max_size=tuple(cfg.max_size),
        patch_size=tuple(cfg.patch_size), rope_scale=tuple(cfg.rope_scale), concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    ).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ref


def _copy_reference_weights(ref, ours, cfg):
    """diffusers key layout -> ours (per-head interleaved fused QKV / KV, as megatron lays them out)."""
    sd, heads, hd = ref.state_dict(), cfg.num_attention_heads, cfg.head_dim

    def interleave(*ws):
        return torch.cat([w.view(heads, hd, -1) for w in ws], dim=1).reshape(-1, ws[0].shape[1])

    new = {"net.patch_embed.weight": sd["patch_embed.proj.weight"], "net.time_embed.norm.weight": sd["time_embed.norm.weight"],
           "net.final_layer.proj_out.weight": sd["proj_out.weight"]}
    for a in ("linear_1", "linear_2"):
        new[f"net.time_embed.{a}.weight"] = sd[f"time_embed.t_embedder.{a}.weight"]
        new[f"net.final_layer.adaln.{a}.weight"] = sd[f"norm_out.{a}.weight"]
    for ax in "thw":
        new[f"net.extra_pos_embed.pos_emb_{ax}"] = sd[f"learnable_pos_embed.pos_emb_{ax}"]
    for i in range(cfg.num_layers):
        r, o = f"transformer_blocks.{i}.", f"net.decoder.layers.{i}."
        for n, m in (("norm1", "adaln_self"), ("norm2", "adaln_cross"), ("norm3", "adaln_mlp")):
            for a in ("linear_1", "linear_2"):
                new[f"{o}{m}.{a}.weight"] = sd[f"{r}{n}.{a}.weight"]
        new[o + "self_attention.linear_qkv.weight"] = interleave(*(sd[f"{r}attn1.to_{x}.weight"] for x in "qkv"))
        new[o + "cross_attention.linear_q.weight"] = sd[r + "attn2.to_q.weight"]
        new[o + "cross_attention.linear_kv.weight"] = interleave(sd[r + "attn2.to_k.weight"], sd[r + "attn2.to_v.weight"])
        for ours_name, ref_name in (("self_attention", "attn1"), ("cross_attention", "attn2")):
            new[f"{o}{ours_name}.q_layernorm.weight"] = sd[f"{r}{ref_name}.norm_q.weight"]
            new[f"{o}{ours_name}.k_layernorm.weight"] = sd[f"{r}{ref_name}.norm_k.weight"]
            new[f"{o}{ours_name}.linear_proj.weight"] = sd[f"{r}{ref_name}.to_out.0.weight"]
        new[o + "mlp.linear_fc1.weight"] = sd[r + "ff.net.0.proj.weight"]
        new[o + "mlp.linear_fc2.weight"] = sd[r + "ff.net.2.weight"]
    missing, unexpected = ours.load_state_dict(new, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]


def _build(cfg):
    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
    from nemo_ext.models.world_model import WorldModel
    from nemo_ext.tasks.general import TextConditioner

    config = build_transformer_config(cfg, _parallel(), torch.float32)
    return WorldModel(config, CosmosDiT(config, cfg), TextConditioner()).eval()


def _tiny(**kw):
    from nemo_ext.models.dit.config import DiTConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, adaln_lora_dim=16, context_dim=32, max_size=[8, 32, 32],
                attention_backend="math")
    return DiTConfig(**{**base, **kw})


@pytest.mark.parametrize("per_frame_timestep", [False, True])
def test_dit_matches_diffusers_reference(megatron_world, per_frame_timestep):
    cfg = _tiny()
    ref, ours = _reference_model(cfg), _build(cfg)
    _copy_reference_weights(ref, ours, cfg)
    b, t, h, w = 2, 3, 8, 12  # non-square latent, several latent frames
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 16, t, h, w, generator=g)
    ctx = torch.randn(b, 8, cfg.context_dim, generator=g)
    ts = torch.rand(b, 1, t, 1, 1, generator=g) if per_frame_timestep else torch.rand(b, generator=g)
    with torch.no_grad():
        expected = ref(x, ts, ctx, fps=24, padding_mask=torch.zeros(1, 1, 8 * h, 8 * w), return_dict=False)[0]
        got = ours(x, ts, {"context": ctx}, fps=24)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_flops_per_sample_matches_a_flop_counter(megatron_world):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _tiny(num_layers=3)
    model = _build(cfg)
    thw, ctx_len = (3, 8, 12), 8
    x = torch.randn(1, 16, *thw)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1), {"context": torch.randn(1, ctx_len, cfg.context_dim)})
    measured_forward = counter.get_total_flops()
    assert cfg.flops_per_sample(thw, ctx_len) / 3 == pytest.approx(measured_forward, rel=1e-6)


def test_cpu_compat_is_a_noop_when_cuda_exists():
    script = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True
        before = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
        from nemo_ext.utils import cpu_compat
        assert cpu_compat.enable() is False and not cpu_compat.is_enabled()
        assert before == (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
