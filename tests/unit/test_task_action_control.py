"""The action_control task plugin: zero-initialised action paths (step 0 = the base model), the
action MLP reaching the DiT's AdaLN and the GPT's cross-attention, and the checks that stop a
configuration that cannot work (clip length vs chunk, action dimension, model kind)."""

from __future__ import annotations

import types

import pytest
import torch

from nemo_ext.config.compose import ConfigError, compose, to_typed
from nemo_ext.config.plan import make_plan
from nemo_ext.tasks.action_control import ActionControlTaskConfig, build_conditioner

LAYOUT = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None,
                               recompute_method="uniform", recompute_num_layers=1)


def _dit():
    from nemo_ext.models.dit.config import DiTConfig

    return DiTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, adaln_lora_dim=16, context_dim=32,
                     max_size=[8, 32, 32], attention_backend="math", video2world=True, condition_latent_frames=1)


@pytest.mark.parametrize("per_frame", [True, False])
def test_dit_step_zero_is_the_base_model_and_the_actions_reach_adaln(megatron_world, per_frame):
    from nemo_ext.conditioning import Conditioning
    from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config

    torch.manual_seed(0)
    cfg = _dit()
    config = build_transformer_config(cfg, LAYOUT, torch.float32)
    net = CosmosDiT(config, cfg)
    with torch.no_grad():  # a "pretrained" base: the DiT's own zero-initialised output layers made non-zero
        for p in net.parameters():
            p.normal_(std=0.05)
    task = ActionControlTaskConfig(action_dim=7, chunk=8, hidden=32, per_frame=per_frame)
    cond = build_conditioner(task, cfg)
    x, t = torch.randn(2, 16, 2, 8, 8), torch.rand(2)
    mask = torch.zeros(2, 1, 2, 8, 8)
    mask[:, :, :1] = 1
    batch = {"actions": torch.randn(2, 8, 7)}
    c = cond(batch)
    lead = (2, 2) if per_frame else (2,)  # per latent frame (2 of them: 9 frames / 8x time) or per clip
    assert c.adaln.shape == (*lead, 64) and c.adaln_lora.shape == (*lead, 192) and c.context.abs().sum() == 0
    base = net(x, t, Conditioning(context=torch.zeros(2, cfg.text_encoder.max_length, 32)), condition_mask=mask)
    with_actions = net(x, t, c, condition_mask=mask)
    # zero-initialised heads: the base model (per frame up to rounding: per-token GEMMs instead of one row)
    assert base.abs().max() > 0 and torch.allclose(base, with_actions, rtol=0, atol=0 if not per_frame else 1e-6)
    torch.nn.init.normal_(cond.to_adaln.weight, std=0.1)  # once trained, the actions change the output
    other = net(x, t, cond({"actions": torch.randn(2, 8, 7)}), condition_mask=mask)
    assert not torch.allclose(net(x, t, cond(batch), condition_mask=mask), other)


def test_per_frame_actions_are_causal_prefixes():
    """Latent frame k sees the first k * temporal_compression actions: the given frame none, the
    last frame all; a change to a late action leaves the earlier frames' vectors unchanged."""
    cfg = _dit()
    cfg.tokenizer.temporal_compression = 2  # 8 actions -> 4 predicted latent frames of 2 frames each
    cond = build_conditioner(ActionControlTaskConfig(action_dim=3, chunk=8, hidden=16), cfg)
    a = torch.randn(2, 8, 3)
    prefixes = cond.causal_prefixes(a).unflatten(2, (8, 3))  # [B, T, chunk, A]
    assert prefixes.shape == (2, 5, 8, 3)
    for k in range(5):
        assert torch.equal(prefixes[:, k, : 2 * k], a[:, : 2 * k]) and prefixes[:, k, 2 * k:].abs().sum() == 0
    torch.nn.init.normal_(cond.to_adaln.weight)
    late = a.clone()
    late[:, 6] += 1.0  # the transition 6 -> 7 belongs to latent frame 4 (frames 7-8)
    before, after = cond({"actions": a}).adaln, cond({"actions": late}).adaln
    assert torch.equal(before[:, :4], after[:, :4]) and not torch.allclose(before[:, 4], after[:, 4])


def test_ar_action_tokens_are_a_cross_attention_context():
    from nemo_ext.models.ar.config import ar_preset

    model = ar_preset("ar_tiny_v2w")
    cond = build_conditioner(ActionControlTaskConfig(hidden=16), model)
    out = cond({"actions": torch.randn(3, 8, 7)})
    assert out.context.shape == (3, 8, model.context_dim) and out.context_mask is None
    swapped = cond({"actions": torch.randn(3, 8, 7)})
    assert not torch.allclose(out.context, swapped.context)


def test_normalization_and_wrong_action_dim():
    task = ActionControlTaskConfig(action_dim=2, chunk=3, hidden=8, action_mean=[1.0, -1.0], action_std=[2.0, 0.0])
    cond = build_conditioner(task, _dit())
    a = torch.tensor([[[3.0, 5.0]] * 3])
    assert torch.equal(cond.normalized({"actions": a})[0, 0], torch.tensor([1.0, 6.0]))  # std 0 -> left as is
    with pytest.raises(ValueError, match="task.action_dim=2"):
        cond({"actions": torch.randn(1, 3, 7)})
    with pytest.raises(ValueError, match="action_dim=7"):
        build_conditioner(ActionControlTaskConfig(action_mean=[0.0] * 6), _dit())


@pytest.mark.parametrize("family, overrides, message", [
    ("diffusion", ["data.num_frames=17"], r"data.num_frames=17 but task.chunk=8"),
    ("diffusion", ["model=dit_tiny"], "Video2World"),
    ("ar", ["model=ar_tiny"], "cross_attention"),
])
def test_configurations_that_cannot_work_are_refused(family, overrides, message):
    cfg = to_typed(compose("action_control", family, [*overrides, "trainer.device=cpu"]))
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, world_size=1, cuda_available=False)


def test_stats_of_the_shards_must_match_the_action_dim(tmp_path):
    from nemo_ext.data.shards import write_manifest

    write_manifest(tmp_path, [], extra={"sidecars": {"actions.npy": {
        "kind": "transitions", "shape": [6], "count": 8, "mean": [0.0] * 6, "std": [1.0] * 6, "min": [0.0] * 6,
        "max": [1.0] * 6}}})
    cfg = to_typed(compose("action_control", "diffusion", [f"data.path={tmp_path}", "trainer.device=cpu"]))
    with pytest.raises(ConfigError, match="task.action_dim=7 but the data's actions have 6"):
        make_plan(cfg, world_size=1, cuda_available=False)
