"""Every recipe of both families trains a few steps on one GPU through the CLI (bf16, NCCL): the
path a user's `make recipe=X train NGPU=1` takes. On CPU everything shares one device, so this
is where batch entries left on the host (a task's sidecars, ...) show up. Skipped without a GPU."""

from __future__ import annotations

import pytest

from nemo_ext.config.compose import available_recipes, compose
from support import run_cli

CASES = [(recipe, family) for family in ("diffusion", "ar") for recipe in available_recipes(family)]
STEPS = ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
         "trainer.val_every_n_steps=3", "data.num_workers=1", "data.backend=pyav", "data.sample_num_videos=8",
         "data.sample_val_num_videos=2"]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe,family", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_recipe_trains_on_one_gpu(recipe, family, tmp_path):
    model = compose(recipe, family).model.name  # the recipe's own preset (names the run directory)
    run = run_cli([*STEPS, f"model={model}", f"data.sample_dir={tmp_path / 'world'}"], runs_dir=tmp_path / "runs",
                  recipe=recipe, family=family, device="gpu")
    rows = run.metrics()
    assert sorted(rows) == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in rows.values())  # finite (NaN != NaN)
    assert (run.run_dir / "checkpoints" / "last" / "metadata.json").is_file()
