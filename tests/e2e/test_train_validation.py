"""Validation loss through the training CLI on CPU: rows in metrics.jsonl at the interval and the
last step, on the held-out sample world generated next to the training one, logged to the console
and TensorBoard; and a run without validation takes exactly the same training steps."""

from __future__ import annotations

import json

TINY = ["trainer.log_every_n_steps=1", "data.num_workers=0", "data.sample_num_videos=16", "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=100"]


def test_validation_rows_and_training_unchanged(train_cli, sample_world):
    run = train_cli([*TINY, f"data.sample_dir={sample_world}", "trainer.val_every_n_steps=3", "trainer.val_batches=1"],
                    run_name="with_val")
    val = run.val_metrics()
    assert sorted(val) == [3, 4]  # every 3 steps, and at the last step
    assert all(row["val_samples"] == 4 and row["val_loss"] > 0 for row in val.values())  # 1 global batch of 4
    assert f"validation at step 3: loss {val[3]['val_loss']:.4f} (4 samples)" in run.output
    held_out = sample_world.parent / f"{sample_world.name}_val"
    manifest = json.loads((held_out / "manifest.json").read_text())
    assert sum(s["num_samples"] for s in manifest["shards"]) == 8  # data.sample_val_num_videos
    assert manifest["extra"]["params"]["seed"] != 0  # other videos than the training world

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.run_dir.glob("events.out.tfevents*"))))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("val/loss")] == [round(val[s]["val_loss"], 5) for s in (3, 4)]

    # The same data given as data.path, without data.val_path: no held-out set, so no validation;
    # the training steps equal those of the run that validated after step 3.
    plain = train_cli([*TINY, f"data.path={sample_world}", "trainer.val_every_n_steps=3"], run_name="without_val")
    assert "validation is off" in plain.output and "data.val_path" in plain.output
    assert plain.val_metrics() == {}
    rows, ref = plain.metrics(), run.metrics()
    for step in (1, 2, 3, 4):
        assert rows[step]["loss"] == ref[step]["loss"], step
        assert rows[step]["grad_norm"] == ref[step]["grad_norm"], step
