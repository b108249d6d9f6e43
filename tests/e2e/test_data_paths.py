"""Training data paths end to end: a two-stage mixture of sources, and precomputed latent shards
(which must train exactly like the video shards they were made from)."""

from __future__ import annotations

import torch

from nemo_ext.config.compose import compose, to_typed
from nemo_ext.data.latents import precompute_latents

TINY = ["trainer.log_every_n_steps=1", "data.num_workers=0", "trainer.checkpoint_every_n_steps=100"]


def test_two_stage_mixture_follows_its_schedule(train_cli, sample_world, tmp_path):
    from data_prep.sample_world import generate

    hq = generate(tmp_path / "hq", num_videos=4, num_frames=33, height=64, width=64, seed=7, progress=False)
    run = train_cli([
        *TINY, "trainer.max_steps=6",
        f"data.sources=[{{name:broad,path:'{sample_world}'}},{{name:hq,path:'{hq}'}}]",
        "data.stages=[{until_step:3,weights:{broad:1.0}},{weights:{hq:1.0}}]",
    ])
    rows = run.metrics()
    assert rows[3]["samples_from_broad"] == 12 and rows[3].get("samples_from_hq", 0) == 0  # 3 steps x 4 samples
    assert rows[6]["samples_from_broad"] == 12 and rows[6]["samples_from_hq"] == 12
    assert "samples broad 12, hq 12" in run.output


def test_latent_shards_train_like_the_videos_they_came_from(train_cli, sample_world, tmp_path):
    same = ["data.clip_sampling=start", "data.sample_num_videos=16", f"data.sample_dir={sample_world}"]
    cfg = to_typed(compose("general", "diffusion", [*same, "trainer.device=cpu"]))
    precompute_latents(cfg, sample_world, tmp_path / "latents", batch_size=3, device="cpu", dtype=torch.float32,
                       progress=False)
    video = train_cli([*TINY, *same, "trainer.max_steps=3"], run_name="video").metrics()
    latent = train_cli([*TINY, *same, "trainer.max_steps=3", "data.kind=latent", f"data.path={tmp_path / 'latents'}"],
                       run_name="latent").metrics()
    for step in (1, 2, 3):
        assert latent[step]["loss"] == __import__("pytest").approx(video[step]["loss"], rel=1e-4), step
