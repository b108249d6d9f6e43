"""LoRA adapters (``strategy=lora``) in one process: zero-init B keeps the base function, merging
gives the adapted function, the frozen base never changes while adapters and task modules train
(and only they are in the optimizer), and the config checks name the keys. The TP/PP equivalence
is tests/dist/test_lora_parallel.py; the CLI paths (every recipe, resume, merge, export) are
tests/e2e/test_lora_recipes.py."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

LAYOUT = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None, recompute_method="uniform",
                               recompute_num_layers=1)
FAMILIES = ["diffusion", "ar"]


def _dit(std=0.05, seed=0, layout=LAYOUT):
    from nemo_ext.models.dit.config import DiTConfig
    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
    from nemo_ext.models.world_model import WorldModel

    cfg = DiTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, adaln_lora_dim=16, context_dim=32,
                    max_size=[8, 16, 16], attention_backend="math")
    config = build_transformer_config(cfg, layout, torch.float32)
    torch.manual_seed(seed)
    model = WorldModel(config, CosmosDiT(config, cfg), _Conditioner(cfg.context_dim, cfg.hidden_size))
    _randomize(model, std, seed)
    return model


def _ar(std=0.05, seed=0, layout=LAYOUT):
    from nemo_ext.models.ar.config import ARConfig
    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    cfg = ARConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                   max_size=[4, 8, 8], context_dim=32, cross_attention=True, bov_token=True, abs_pos_emb="sincos",
                   attention_backend="math", name="tiny", tokenizer=DiscreteTokenizerConfig(levels=[8, 5, 5, 5]))
    torch.manual_seed(seed)
    model = CosmosAR(build_transformer_config(cfg, layout, torch.float32), cfg)
    _randomize(model, std, seed)
    return model


class _Conditioner(nn.Module):
    """A task conditioner with parameters (like action_control's): context -> AdaLN shift."""

    def __init__(self, ctx_dim, hidden):
        super().__init__()
        self.proj = nn.Linear(ctx_dim, hidden)

    def forward(self, batch):
        from nemo_ext.conditioning import Conditioning

        return Conditioning(context=batch["context"], adaln=self.proj(batch["context"].mean(1)))


def _randomize(model, std, seed):
    """Every matrix non-zero (the DiT's AdaLN-Zero gates too: a pretrained-like base), norms near 1."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base, s = (1.0, 0.1) if "norm" in name else (0.0, std)
            p.copy_(base + s * torch.randn(p.shape, generator=g))


def _model(family, layout=LAYOUT):
    return _dit(layout=layout) if family == "diffusion" else _ar(layout=layout)


def _forward(family, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "diffusion":
        x = torch.randn(2, 16, 2, 8, 8, generator=g)
        return model(x, torch.rand(2, generator=g), {"context": torch.randn(2, 8, 32, generator=g)})
    cfg = model.arch
    grid = (2, 4, 4)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.num_positions(grid)), generator=g)
    tokens[:, 0] = cfg.bov_id
    return model(tokens, grid, torch.randn(2, 8, cfg.context_dim, generator=g))


def _lora(model, family, rank=4, alpha=8.0, trainable=("conditioner",)):
    from nemo_ext.models.lora import apply_lora, freeze_base

    targets = ["*attention.linear_*", "mlp.linear_*"] + (["output_layer"] if family == "ar" else [])
    adapters = apply_lora(model, rank, alpha, 0.0, targets, seed=0)
    unmatched = freeze_base(model, list(trainable) if family == "diffusion" else [])
    assert not unmatched
    return adapters


def _randomize_b(model, std=0.05):
    from nemo_ext.models.lora import adapters_of

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            adapter.lora_b.copy_(std * torch.randn(adapter.lora_b.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialized_b_leaves_the_output_unchanged(megatron_world, family):
    model = _model(family).eval()
    with torch.no_grad():
        trainable = _forward(family, model)
        model.requires_grad_(False)  # megatron's frozen-weight linear (another matmul path) from here
        before = _forward(family, model)
        adapters = _lora(model, family)
        after = _forward(family, model)
    torch.testing.assert_close(before, trainable, rtol=1e-6, atol=1e-6)
    roles = {name.split("layers.")[-1].split(".", 1)[-1] for name in adapters}
    expected = {"self_attention.linear_qkv", "self_attention.linear_proj", "cross_attention.linear_q",
                "cross_attention.linear_kv", "cross_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"}
    assert roles == expected | ({"output_layer"} if family == "ar" else set())
    assert all(a.lora_b.abs().max() == 0 and a.lora_a.abs().max() > 0 for a in adapters.values())
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_computes_the_adapted_function(megatron_world, family):
    from nemo_ext.models.lora import ADAPTER_SUFFIX, merge_global, merge_lora_

    model = _model(family).eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    _lora(model, family)
    _randomize_b(model)
    with torch.no_grad():
        adapted = _forward(family, model)
        lora_sd = {k: v.clone() for k, v in model.state_dict().items() if ADAPTER_SUFFIX + "." in k}
        assert (adapted - _forward_base(family, base_sd)).abs().max() > 1e-3  # the adapters do something
        assert merge_lora_(model) == len(lora_sd) // 2
        merged = _forward(family, model)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(sd) == sorted(base_sd)  # no adapter left: a normal model
    # the checkpoint merge (global tensors) folds the same weights
    scale = 8.0 / 4
    merged_global, n = merge_global(dict(base_sd), lora_sd, scale)
    assert n == len(lora_sd) // 2
    for key, value in sd.items():
        torch.testing.assert_close(merged_global[key], value, rtol=1e-6, atol=1e-6, msg=key)


def _forward_base(family, sd):
    model = _model(family).eval()
    model.load_state_dict(sd, strict=False)
    return _forward(family, model)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_frozen_base_never_changes_and_only_trained_tensors_are_optimized(megatron_world, distributed_optimizer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from nemo_ext.config.schema import OptimConfig, ParallelConfig
    from nemo_ext.models.lora import parameter_counts
    from nemo_ext.training.optim import build_optimizer

    model = _dit()
    _lora(model, "diffusion")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all("_lora." in n or n.startswith("conditioner.") for n in trained)
    assert any(n.startswith("conditioner.") for n in trained)
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for p in trained.values()) and total == trainable + sum(
        p.numel() for p in frozen.values())

    par = ParallelConfig(distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), model)
    opt = build_optimizer(OptimConfig(lr=1e-2), par, [ddp], torch.float32)
    optimized = [p for group in opt.param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimized) == trainable  # no optimizer state for the base
    frozen_params = [p for p in model.parameters() if not p.requires_grad]
    assert not any(getattr(p, "main_grad", None) is not None for p in frozen_params)  # no grad buffer either
    for step in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = _forward("diffusion", ddp, seed=step)
        out.float().pow(2).mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()
        assert opt.last_grad_norm > 0
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, trained[name]), f"trained {name} did not move"


def test_adapters_cover_the_catalogue_and_patterns_select_by_role(megatron_world):
    from nemo_ext.models.lora import adapters_of, apply_lora, role_of, target_catalogue

    assert target_catalogue("diffusion", None) == [
        "self_attention.linear_qkv", "self_attention.linear_proj", "cross_attention.linear_q",
        "cross_attention.linear_kv", "cross_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    ar = _ar()
    assert set(target_catalogue("ar", ar.arch)) == {role_of(n) for n in _parallel_linears(ar)}
    assert "cross_attention.linear_q" not in target_catalogue("ar", types.SimpleNamespace(cross_attention=False))
    model = _dit()
    apply_lora(model, 2, 2.0, 0.0, ["cross_attention.*", "linear_fc2"])
    roles = sorted({role_of(n) for n in adapters_of(model)})
    assert roles == ["cross_attention.linear_kv", "cross_attention.linear_proj", "cross_attention.linear_q",
                     "mlp.linear_fc2"]
    assert role_of("net.decoder.layers.11.mlp.linear_fc1") == "mlp.linear_fc1"


def _parallel_linears(model):
    from nemo_ext.models.lora import parallel_kind

    return [n for n, m in model.named_modules() if parallel_kind(m)]


@pytest.mark.parametrize("overrides,needle", [
    (["strategy.target_modules=[nope]"], "match no linear of model=dit_tiny; its LoRA-capable linears are"),
    (["strategy.rank=0"], "strategy.rank=0"),
    (["strategy.dropout=1.0"], "strategy.dropout=1.0"),
    (["strategy.alpha=0"], "strategy.alpha=0"),
    (["strategy.target_modules=[]"], "strategy.target_modules is empty"),
])
def test_bad_lora_settings_fail_naming_the_key(overrides, needle):
    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.config.plan import make_plan

    cfg = to_typed(compose("general", "diffusion", ["strategy=lora", *overrides]))
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        make_plan(cfg, world_size=1, cuda_available=False)


def test_cross_attention_targets_on_a_model_without_it_list_the_model_linears():
    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.config.plan import make_plan

    cfg = to_typed(compose("general", "ar", ["strategy=lora", "strategy.target_modules=[cross_attention.*]"]))
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, world_size=1, cuda_available=False)
    assert "['cross_attention.*'] match no linear of model=ar_tiny" in str(err.value)
    assert "self_attention.linear_qkv" in str(err.value) and "output_layer" in str(err.value)


def test_trainable_module_patterns_that_match_nothing_are_reported(megatron_world):
    from nemo_ext.models.lora import apply_lora, freeze_base

    model = _dit()
    apply_lora(model, 2, 2.0, 0.0, ["linear_qkv"])
    assert freeze_base(model, ["conditioner", "net.final_layer", "no_such_module"]) == ["no_such_module"]
    assert all(p.requires_grad for p in model.net.final_layer.parameters())
    assert not any(p.requires_grad for p in model.net.patch_embed.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_recompute_gives_the_adapters_the_same_gradients(megatron_world, family):
    """parallel.recompute=full re-runs each layer in backward (megatron's reentrant checkpoint): with
    a frozen embedding its input has no grad, and the adapters inside must still get theirs."""
    grads = {}
    for recompute in (None, "full"):
        model = _model(family, types.SimpleNamespace(**{**vars(LAYOUT), "recompute": recompute})).train()
        _lora(model, family, trainable=())  # nothing outside the layers trains: the hardest case
        _randomize_b(model)
        _forward(family, model).square().mean().backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[None] and all(g is not None and g.abs().max() > 0 for g in grads[None].values())
    assert sorted(grads["full"]) == sorted(grads[None])
    for name, g in grads[None].items():
        assert grads["full"][name] is not None, name
        torch.testing.assert_close(grads["full"][name], g, rtol=1e-5, atol=1e-7, msg=name)
