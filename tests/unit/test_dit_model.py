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
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
    from nemo_ext.models.world_model import WorldModel
    from nemo_ext.tasks.general import TextConditioner

    cfg = _tiny(video2world=video2world)
    layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None,
                                   recompute_method="uniform", recompute_num_layers=1)
    config = build_transformer_config(cfg, layout, torch.float32)
    model = WorldModel(config, CosmosDiT(config, cfg), TextConditioner())
    thw, ctx_len = (3, 8, 12), 8
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, *thw), torch.rand(1), {"context": torch.randn(1, ctx_len, cfg.context_dim)})
    assert cfg.flops_per_sample(thw, ctx_len) / 3 == pytest.approx(counter.get_total_flops(), rel=1e-6)


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
