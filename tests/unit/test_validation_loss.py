"""Validation loss pieces in one process: where held-out data comes from, how validation samples
are split over data-parallel ranks, and the forward-only pass itself (deterministic, independent of
the training seed and caption dropout, leaving the RNG and the module modes as they were)."""

from __future__ import annotations

import pytest
import torch

from nemo_ext.config.compose import compose, to_typed
from nemo_ext.config.plan import make_plan
from nemo_ext.training.validation import validation_microbatches, validation_source


def _cfg(*overrides):
    return to_typed(compose("general", "diffusion", ["trainer.device=cpu", *overrides]))


def test_validation_source_follows_the_data_config():
    path, _ = validation_source(_cfg("data.sample_dir=/x/general"))
    assert path == "/x/general_val"  # the held-out sample world
    assert validation_source(_cfg("data.path=/d/train", "data.val_path=/d/val"))[0] == "/d/val"
    path, why = validation_source(_cfg("data.path=/d/train"))
    assert path is None and "data.val_path" in why
    path, why = validation_source(_cfg("trainer.val_every_n_steps=0", "data.val_path=/d/val"))
    assert path is None and "trainer.val_every_n_steps=0" in why


def test_validation_batches_are_fixed_and_split_over_data_parallel_ranks():
    # 10 held-out samples, 2 global batches of 8 (microbatch 2) over 2 data-parallel ranks.
    ranks = [validation_microbatches(10, 2, 8, 2, rank, 2) for rank in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # 2 batches x 2 microbatches per rank
    assert ranks == [validation_microbatches(10, 2, 8, 2, rank, 2) for rank in range(2)]  # same every time
    items = sorted(item for r in ranks for mb in r for item in mb)
    assert sorted(i for i, _ in items) == sorted([*range(10), 0, 1, 2, 3, 4, 5])  # in order, wrapping around
    seeds = [s for _, s in items]
    assert len(set(seeds)) == 16  # every position its own noise, repeats of a clip included
    # ... and a position's seed does not depend on the layout
    one = {item for mb in validation_microbatches(10, 2, 8, 2, 0, 1) for item in mb}
    assert one == set(items)


def _module(cfg):
    from nemo_ext.training.diffusion import DiffusionModule

    module = DiffusionModule(cfg, make_plan(cfg, world_size=1, cuda_available=False))
    module.configure_model()
    module.wrap_ddp()
    return module


def test_validation_loss_is_deterministic_and_leaves_training_state_alone(megatron_world, sample_world):
    from nemo_ext.training.validation import build_val_dataloader

    common = [f"data.val_path={sample_world}", "data.num_workers=0", "trainer.val_batches=2"]
    cfg = _cfg(*common)
    module = _module(cfg)
    loader = build_val_dataloader(cfg, module.task, module.plan, cfg.data.val_path)
    assert len(loader) == 2 * 2  # 2 global batches of 4 in microbatches of 2
    rng = torch.get_rng_state()
    modes = [m.training for m in module.world_model.modules()]
    first, samples = module.validation_loss(loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert samples == 8 and torch.isfinite(torch.tensor(first))
    assert [m.training for m in module.world_model.modules()] == modes and any(modes)  # back in train mode
    assert all(p.grad is None for p in module.world_model.parameters())
    assert module.validation_loss(loader) == (first, 8)  # same weights: the identical value

    # Another training seed and caption dropout do not change what validation measures.
    other = _module(_cfg(*common, "trainer.seed=7", "task.caption_dropout=0.5"))
    other.world_model.load_state_dict(module.world_model.state_dict())
    assert other.validation_loss(loader) == (first, 8)

    # Other weights give another value (it measures the model).
    with torch.no_grad():
        for p in other.world_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert other.validation_loss(loader)[0] != pytest.approx(first, rel=1e-6)
