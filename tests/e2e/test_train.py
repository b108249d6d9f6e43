"""End-to-end training through the CLI on CPU: the embedded default learns, checkpoints are
written in the run layout, and a killed run resumes to exactly the steps it would have taken."""

from __future__ import annotations

import os
import signal
import time

import pytest

TINY = ["trainer.log_every_n_steps=1", "data.num_workers=0"]


def test_overfit_fixed_batch_lowers_the_loss(train_cli, tmp_path):
    """Two fixed clips, 120 steps: the model fits them (the EDM loss over random noise levels is
    noisy step to step, so compare 20-step means; measured: 0.76 -> ~0.40)."""
    world = [f"data.sample_dir={tmp_path / 'two_clips'}", "data.sample_num_videos=2", "data.global_batch_size=2",
             "data.micro_batch_size=2", "data.clip_sampling=start", "data.shuffle=false"]
    run = train_cli([*TINY, *world, "trainer.max_steps=120", "trainer.checkpoint_every_n_steps=120"])
    losses = [run.metrics()[s]["loss"] for s in range(1, 121)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.75 * first, f"loss did not drop enough: first 20 steps {first:.4f}, last 20 {last:.4f}"
    assert (run.run_dir / "checkpoints" / "last").resolve().name == "step_120"
    assert (run.run_dir / "config.yaml").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run.run_dir.iterdir())

    # A new run initialized from those weights starts where the first one ended, not from scratch.
    warm = train_cli([*TINY, *world, "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=20",
                      f"trainer.init_from={run.run_dir}"], run_name="warm_start")
    warm_losses = [warm.metrics()[s]["loss"] for s in range(1, 21)]
    assert sum(warm_losses) / 20 < 0.85 * first, (sum(warm_losses) / 20, first, last)


def test_killed_run_resumes_with_identical_steps(train_cli, sample_world, tmp_path):
    common = [*TINY, f"data.sample_dir={sample_world}", "data.sample_num_videos=16", "trainer.max_steps=6",
              "trainer.checkpoint_every_n_steps=3"]
    straight = train_cli(common, run_name="straight").metrics()
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    proc, run_dir = train_cli([*common, "trainer.max_steps=1000"], run_name="killed", background=True)
    last = run_dir / "checkpoints" / "last"
    deadline = time.time() + 600
    try:
        while not (last.is_symlink() and last.resolve().name == "step_3"):
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    resumed = train_cli(common, run_name="killed")
    assert "resuming from" in resumed.output
    rows = resumed.metrics()
    assert min(rows) == 4, f"resumed run should start after step 3, logged steps {sorted(rows)}"
    for step in (4, 5, 6):
        assert rows[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-7), step
        assert rows[step]["grad_norm"] == pytest.approx(straight[step]["grad_norm"], rel=1e-6, abs=1e-7), step
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # keep_last_n_checkpoints=2, no partial leftovers; step 6 (the last) validated: the best so far
    assert ckpts == ["best", "best.json", "best_step_6", "last", "step_3", "step_6"], ckpts
    assert (run_dir / "checkpoints" / "last").resolve().name == "step_6"


def test_ar_family_trains_from_the_general_recipe_and_resumes(train_cli, tmp_path):
    """`make recipe=general train FAMILY=ar`'s path: ar_tiny on two fixed clips learns (next-token
    cross entropy starts near ln(1000) = 6.9), validates, checkpoints, and a resumed run continues."""
    world = [f"data.sample_dir={tmp_path / 'two_clips'}", "data.sample_num_videos=2", "data.global_batch_size=2",
             "data.micro_batch_size=2", "data.clip_sampling=start", "data.shuffle=false", "data.backend=pyav"]
    common = [*TINY, *world, "trainer.checkpoint_every_n_steps=30", "trainer.val_every_n_steps=30",
              "trainer.ema_decay=0.9"]
    run = train_cli([*common, "trainer.max_steps=30"], family="ar")
    rows = run.metrics()
    first, last = rows[1]["loss"], sum(rows[s]["loss"] for s in range(26, 31)) / 5
    assert 6.0 < first < 7.5 and last < 0.8 * first, (first, last)
    assert rows[30]["val_loss"] < first
    assert (run.run_dir / "checkpoints" / "last").resolve().name == "step_30"
    assert run.run_dir.parent.name == "ar_ar_tiny"
    # the EMA covers every weight, the SwiGLU fc1 (saved by megatron as its two halves) included
    from nemo_ext.checkpoint import read_tensors

    ckpt = run.run_dir / "checkpoints" / "step_30"
    weights, ema = read_tensors(ckpt, ["model."]), read_tensors(ckpt, ["ema."])
    assert len(ema) == len(weights) and any("linear_fc1" in k for k in ema)
    resumed = train_cli([*common, "trainer.max_steps=32"], family="ar")
    assert "resuming from" in resumed.output and min(resumed.metrics()) == 31


def test_best_validation_checkpoint_survives_retention_and_resume(train_cli, sample_world):
    """trainer.keep_best_checkpoint: checkpoints/best -> best_step_<N>, the saved step with the lowest
    validation loss, kept (hard links) when retention deletes step_<N>; a resumed run keeps beating
    the same record."""
    import json

    from nemo_ext.training.checkpoint import resolve_checkpoint

    common = [*TINY, f"data.sample_dir={sample_world}", "data.sample_num_videos=16", "trainer.checkpoint_every_n_steps=2",
              "trainer.val_every_n_steps=2", "trainer.keep_last_n_checkpoints=1"]

    val = {}  # step -> validation loss over the run's segments (metrics.jsonl holds the current one)

    def check(run, steps):
        ckpts = run.run_dir / "checkpoints"
        val.update({step: row["val_loss"] for step, row in run.val_metrics().items()})
        assert sorted(val) == steps
        best = json.loads((ckpts / "best.json").read_text())
        assert best["val_loss"] == min(val.values()) and val[best["step"]] == best["val_loss"]
        assert os.readlink(ckpts / "best") == best["checkpoint"] == f"best_step_{best['step']}"
        assert resolve_checkpoint(str(ckpts / "best")) == (ckpts / best["checkpoint"]).resolve()
        names = sorted(p.name for p in ckpts.iterdir())
        assert names == sorted(["best", "best.json", best["checkpoint"], "last", f"step_{steps[-1]}"]), names
        return best

    first = check(train_cli([*common, "trainer.max_steps=6"], run_name="best"), [2, 4, 6])
    resumed = train_cli([*common, "trainer.max_steps=10"], run_name="best")
    assert "resuming from" in resumed.output
    second = check(resumed, [2, 4, 6, 8, 10])
    assert second["val_loss"] <= first["val_loss"]
