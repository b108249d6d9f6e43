"""A task's extra input channels (camera_control's Plücker rays, ...) on a base checkpoint without
them: the loader widens the DiT's patch embedding with zero columns, task-agnostically, so the base
loads and step 0 is the base model whatever the extra channels hold."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nemo_ext.config.compose import compose, to_typed
from nemo_ext.config.plan import make_plan
from nemo_ext.conditioning import Conditioning

EXTRA = 6


def _module(cfg, extra: int):
    from nemo_ext.training.diffusion import DiffusionModule

    plan = dataclasses.replace(make_plan(cfg, world_size=1, cuda_available=False), extra_channels=extra)
    module = DiffusionModule(cfg, plan)
    module.configure_model()
    return module


def test_a_base_without_the_extra_channels_loads_widened_and_step_zero_is_the_base(megatron_world, tmp_path):
    from nemo_ext.training.checkpoint import load_weights, save_model_weights

    # patch 1x2x2: the widened columns are the last ones only because patchify orders features (C, pt, ph, pw)
    cfg = to_typed(compose("general", "diffusion", ["trainer.device=cpu", "model=dit_tiny_v2w",
                                                    "model.patch_size=[1,2,2]"]))
    base = _module(cfg, 0)
    with torch.no_grad():  # a base whose every weight matters (the DiT's own init zeroes the output)
        for p in base.world_model.parameters():
            p.normal_(0, 0.05)
    save_model_weights(base, tmp_path / "base", source="test")
    wide = _module(cfg, EXTRA)
    load_weights(wide, str(tmp_path / "base"))

    old, new = base.world_model.net.patch_embed.weight, wide.world_model.net.patch_embed.weight
    vol = 4
    assert new.shape[1] == old.shape[1] + EXTRA * vol
    torch.testing.assert_close(new[:, :old.shape[1]], old, rtol=0, atol=0)
    assert torch.count_nonzero(new[:, old.shape[1]:]) == 0

    m = cfg.model
    x = torch.randn(2, m.latent_channels, 2, 8, 8)
    t = torch.rand(2)
    ctx = torch.randn(2, 5, m.context_dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    cmask = torch.zeros(2, 1, 2, 8, 8)
    cmask[:, :, 0] = 1
    with torch.no_grad():
        ref = base.world_model.net.eval()(x, t, Conditioning(context=ctx, context_mask=mask), condition_mask=cmask)
        for channels in (torch.zeros(2, EXTRA, 2, 8, 8), torch.randn(2, EXTRA, 2, 8, 8) * 3):
            out = wide.world_model.net.eval()(x, t, Conditioning(context=ctx, context_mask=mask, channels=channels),
                                              condition_mask=cmask)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # and the new columns train: the loss reaches them
    wide.world_model.net.train()
    out = wide.world_model.net(x, t, Conditioning(context=ctx, context_mask=mask, channels=torch.randn(2, EXTRA, 2, 8, 8)),
                               condition_mask=cmask)
    out.square().mean().backward()
    assert new.grad[:, old.shape[1]:].abs().sum() > 0


def test_other_shape_differences_are_still_errors(megatron_world, tmp_path):
    from nemo_ext.training.checkpoint import load_weights, save_model_weights

    cfg = to_typed(compose("general", "diffusion", ["trainer.device=cpu", "model=dit_tiny_v2w"]))
    wide = _module(cfg, EXTRA)
    save_model_weights(wide, tmp_path / "wide", source="test")
    with pytest.raises(ValueError, match=r"patch_embed.weight' has shape \[\d+, \d+\] in the checkpoint"):
        load_weights(_module(cfg, 0), str(tmp_path / "wide"))  # narrowing is not a widening
