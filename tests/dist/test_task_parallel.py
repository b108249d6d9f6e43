"""Task conditioning under the token-splitting layouts: every task plugin (from the registry) whose
DiT conditioning differs from the general recipe's (per-frame AdaLN vectors, extra channels) trains
the same steps under context parallelism and under TP2 + sequence parallelism as in one process.
Their per-token tensors are cut to each rank's tokens (parallel_utils.local_tokens); the general
recipe's layouts are tests/dist/test_parallel_equivalence.py."""

from __future__ import annotations

import pytest
from support import run_cli

from nemo_ext.tasks import all_tasks

LAYOUTS = {"cp2": ["parallel=cp2"], "tp2_sp": ["parallel=tp2_sp"]}


def _own_conditioning(task) -> bool:
    """Per-token signals (per-frame AdaLN vectors) or extra input channels at the recipe's defaults; a task
    conditioned like the general recipe (text, given frames: instruction) is covered by its layouts."""
    from nemo_ext.config.compose import compose, to_typed

    cfg = to_typed(compose(task.name, "diffusion"))
    return bool(task.signals) or task.extra_channels(cfg.task, cfg.model) > 0


TASKS = [t.name for t in all_tasks() if "diffusion" in t.families and t.name != "general" and _own_conditioning(t)]


@pytest.mark.parametrize("task", TASKS)
def test_task_trains_the_same_steps_under_cp_and_sp(tmp_path, task):
    from nemo_ext.config.compose import compose

    model = compose(task, "diffusion").model.name
    common = [f"model={model}", "data.backend=pyav", "data.num_workers=0", "data.sample_num_videos=8",
              f"data.sample_dir={tmp_path / 'world'}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
              "trainer.checkpoint_every_n_steps=0", "trainer.val_every_n_steps=0"]
    ref = run_cli(common, tmp_path / "runs", run_name="ref", recipe=task).metrics()
    assert sorted(ref) == [1, 2, 3]
    for name, overrides in LAYOUTS.items():
        got = run_cli([*common, *overrides], tmp_path / "runs", nproc=2, run_name=name, recipe=task).metrics()
        for step in (1, 2, 3):  # step 1: zero-initialised task heads; 2, 3: trained ones in use
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(ref[step][key], rel=2e-4, abs=1e-6), (name, step, key)
