"""The DiT's FLOPs accounting against a FLOP counter, and the CPU compatibility layer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
import torch


def _tiny(**kw):
    from nemo_ext.models.dit.config import DiTConfig

    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, adaln_lora_dim=16, context_dim=32, max_size=[8, 32, 32],
                attention_backend="math")
    return DiTConfig(**{**base, **kw})


@pytest.mark.parametrize("video2world", [False, True])
def test_flops_per_sample_matches_a_flop_counter(megatron_world, video2world):
    """Our FLOPs (what MFU is computed from) are the forward's matmul work x 3: every linear of the
    model, the self-attention S^2 and cross-attention S x S_ctx terms, as torch's FLOP counter counts
    them op by op (attention included whichever SDPA kernel torch picks: support.count_matmul_flops)."""
    from support import count_matmul_flops

    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
    from nemo_ext.models.world_model import WorldModel
    from nemo_ext.tasks.general import TextConditioner

    cfg = _tiny(video2world=video2world)
    layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None,
                                   recompute_method="uniform", recompute_num_layers=1)
    config = build_transformer_config(cfg, layout, torch.float32)
    model = WorldModel(config, CosmosDiT(config, cfg), TextConditioner())
    thw, ctx_len = (3, 8, 12), 8
    counted = count_matmul_flops(
        lambda: model(torch.randn(1, 16, *thw), torch.rand(1), {"context": torch.randn(1, ctx_len, cfg.context_dim)}))
    assert cfg.flops_per_sample(thw, ctx_len) / 3 == pytest.approx(sum(counted.values()), rel=1e-6), counted
    # the attention share on its own: n layers x (4 d S^2 self + 4 d S S_ctx cross)
    s, n, d = cfg.num_tokens(thw), cfg.num_layers, cfg.hidden_size
    attention = sum(v for op, v in counted.items() if "attention" in op or "bmm" in op)
    assert attention == n * 4 * d * s * (s + ctx_len), counted


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


@pytest.mark.parametrize(
    "backend,cuda,have_te,expected",
    [
        ("auto", False, False, "local"),
        ("auto", True, False, "local"),
        ("auto", True, True, "te"),
        ("auto", False, True, "local"),
        ("cudnn", True, True, "local"),
        ("te", True, True, "te"),
    ],
)
def test_layer_implementation_selection(backend, cuda, have_te, expected):
    from nemo_ext.models.dit.layer import select_layer_impl

    assert select_layer_impl(backend, cuda, have_te) == expected


def test_transformer_engine_requested_but_unavailable_is_a_clear_error():
    from nemo_ext.models.dit.layer import select_layer_impl, te_available

    assert te_available() is False  # never installed on CPU machines (it breaks megatron there)
    with pytest.raises(ValueError, match="transformer-engine is not importable"):
        select_layer_impl("te", True, False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        select_layer_impl("te", False, True)
