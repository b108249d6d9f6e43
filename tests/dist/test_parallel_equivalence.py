"""Tensor and pipeline parallelism give the single-process result on the same weights.

A single-process reference run writes checkpoints after steps 1 and 2. Each parallel layout
resumes from the reference's step-1 checkpoint (resharding model *and* optimizer state from TP1 to
its layout) and must reproduce the reference's step-2 loss and grad norm. The TP2xPP2 run's own
step-2 checkpoint is then resumed at TP1 and must reproduce step 3 (resharding back).
Runs are real multi-process gloo worlds started with torchrun through the training CLI.
"""

from __future__ import annotations

import shutil

import pytest
from support import run_cli

COMMON = ["trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_n_checkpoints=5",
          "data.num_workers=0"]
LAYOUTS = {"tp2": 2, "pp2": 2, "tp2_pp2": 4}
# The rest of the matrix (make test-full): sequence parallelism, and data parallelism with the
# distributed optimizer (DP2: each rank takes half of the global batch).
SLOW_LAYOUTS = {"tp2_sp": 2, "dp_distopt": 2}
PROCS = {**LAYOUTS, **SLOW_LAYOUTS}


def _reference(tmp_path_factory, sample_world, *overrides):
    runs = tmp_path_factory.mktemp("ref_runs")
    return run_cli([*COMMON, f"data.sample_dir={sample_world}", "data.sample_num_videos=16", "trainer.max_steps=3",
                    *overrides], runs_dir=runs, run_name="ref")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_world):
    return _reference(tmp_path_factory, sample_world)


@pytest.fixture(scope="module")
def reference_distopt(tmp_path_factory, sample_world):
    """The optimizer-state format depends on the optimizer kind: a distributed-optimizer layout
    resumes from a single-process run that used the distributed optimizer too."""
    return _reference(tmp_path_factory, sample_world, "parallel.distributed_optimizer=true")


def _fork_at_step(reference, runs_dir, step: int, name: str):
    """A copy of the reference run holding only its checkpoint of `step` (as last)."""
    dst = runs_dir / reference.run_dir.relative_to(reference.run_dir.parents[2]).parent / name
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference.run_dir / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    (dst / "checkpoints" / "last").symlink_to(f"step_{step}")
    return dst


@pytest.mark.parametrize(
    "layout", [*LAYOUTS, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_LAYOUTS)]
)
def test_parallel_layout_reproduces_single_process_step(request, layout, sample_world, tmp_path):
    reference = request.getfixturevalue("reference_distopt" if "distopt" in layout else "reference")
    ref = reference.metrics()
    runs = tmp_path / "runs"
    _fork_at_step(reference, runs, 1, layout)
    run = run_cli([*COMMON, f"data.sample_dir={sample_world}", "data.sample_num_videos=16", "trainer.max_steps=2",
                   f"parallel={layout}"], nproc=PROCS[layout], runs_dir=runs, run_name=layout)
    rows = run.metrics()
    assert rows[2]["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5), (layout, rows[2], ref[2])
    assert rows[2]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=1e-4), (layout, rows[2], ref[2])

    assert (run.run_dir / "checkpoints" / "step_2" / "metadata.json").is_file()
    if layout == "tp2_pp2":  # reshard back: its step-2 checkpoint at TP1 reproduces step 3
        back = run_cli([*COMMON, f"data.sample_dir={sample_world}", "data.sample_num_videos=16",
                        "trainer.max_steps=3"], runs_dir=runs, run_name=layout)
        rows = back.metrics()
        assert rows[3]["loss"] == pytest.approx(ref[3]["loss"], rel=1e-5)
        assert rows[3]["grad_norm"] == pytest.approx(ref[3]["grad_norm"], rel=1e-4)
