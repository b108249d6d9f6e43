"""From a folder of videos to training: `make data` writes clip shards and a report, training
reads them, `prep latents` precomputes latent shards and training reads those too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from support import REPO

from nemo_ext.data.video import encode_video

TINY = ["trainer.log_every_n_steps=1", "data.num_workers=0", "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"]


def _raw_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["video,caption"]
    for i in range(4):
        frames = rng.integers(0, 255, size=(40, 80, 112, 3), dtype=np.uint8)
        (root / f"clip{i}.mp4").write_bytes(encode_video(frames, fps=12, codec="h264"))
        rows.append(f"clip{i}.mp4,a noisy video number {i}")
    (root / "broken.mp4").write_bytes(b"not a video at all")
    rows.append("broken.mp4,this one is corrupt")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_videos_to_shards_to_training_and_latents(train_cli, tmp_path):
    raw, shards, latents = _raw_folder(tmp_path / "raw"), tmp_path / "shards", tmp_path / "latents"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    out = subprocess.run(["make", "recipe=general", "data", f"RAW={raw}", f"OUT={shards}",
                          f"ARGS=--captions {raw / 'captions.csv'} --workers 1 --no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = [json.loads(line) for line in (shards / "report.jsonl").read_text().splitlines()]
    assert [r["video"] for r in report] == ["broken.mp4"]
    assert json.loads((shards / "manifest.json").read_text())["num_samples"] == 4

    run = train_cli([*TINY, f"data.path={shards}"], run_name="from_videos")
    assert sorted(run.metrics()) == [1, 2]

    out = subprocess.run([sys.executable, "-m", "nemo_ext.cli.prep", "latents", "--from", str(shards), "--out",
                          str(latents), "--recipe", "general"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = train_cli([*TINY, "data.kind=latent", f"data.path={latents}"], run_name="from_latents")
    assert sorted(run.metrics()) == [1, 2]
