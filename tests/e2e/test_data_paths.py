"""Training data paths end to end: a two-stage mixture of sources, and precomputed latent shards
(which must train exactly like the video shards they were made from)."""

from __future__ import annotations

import torch

from nemo_ext.config.compose import compose, to_typed
from nemo_ext.data.latents import precompute_latents

TINY = ["trainer.log_every_n_steps=1", "data.num_workers=0", "trainer.checkpoint_every_n_steps=100"]


def test_two_stage_mixture_follows_its_schedule(train_cli, sample_world, tmp_path):
    from nemo_ext.worlds import generate

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
    # data_prep encodes latents from PyAV-decoded frames, so the video run decodes with PyAV too
    # (DALI's resize differs from it in the last bits of colour: tests/unit/test_data_dali.py)
    same = ["data.backend=pyav", "data.clip_sampling=start", "data.sample_num_videos=16", f"data.sample_dir={sample_world}"]
    cfg = to_typed(compose("general", "diffusion", [*same, "trainer.device=cpu"]))
    precompute_latents(cfg, sample_world, tmp_path / "latents", batch_size=3, device="cpu", dtype=torch.float32,
                       progress=False)
    video = train_cli([*TINY, *same, "trainer.max_steps=3"], run_name="video").metrics()
    latent = train_cli([*TINY, *same, "trainer.max_steps=3", "data.kind=latent", f"data.path={tmp_path / 'latents'}"],
                       run_name="latent").metrics()
    for step in (1, 2, 3):
        assert latent[step]["loss"] == __import__("pytest").approx(video[step]["loss"], rel=1e-4), step


def test_token_shards_train_like_the_videos_they_came_from(train_cli, sample_world, tmp_path):
    """The AR family: tokens precomputed by `prep tokens` give the losses of tokenizing on the fly."""
    from nemo_ext.data.tokens import precompute_tokens

    same = ["data.backend=pyav", "data.clip_sampling=start", "data.sample_num_videos=16", f"data.sample_dir={sample_world}"]
    cfg = to_typed(compose("general", "ar", [*same, "trainer.device=cpu"]))
    precompute_tokens(cfg, sample_world, tmp_path / "tokens", batch_size=3, device="cpu")
    video = train_cli([*TINY, *same, "trainer.max_steps=3"], run_name="video", family="ar").metrics()
    tokens = train_cli([*TINY, *same, "trainer.max_steps=3", "data.kind=tokens", f"data.path={tmp_path / 'tokens'}"],
                       run_name="tokens", family="ar").metrics()
    for step in (1, 2, 3):
        assert tokens[step]["loss"] == __import__("pytest").approx(video[step]["loss"], rel=1e-5), step


def test_dali_loader_trains_and_resumes_from_its_reader_positions(train_cli, sample_world, tmp_path):
    """data.backend=dali (DALI's CPU VP9 decoder here, NVDEC on GPU) over a two-source mixture:
    a run resumed from step 3 restores both readers' positions from the checkpoint and takes
    the steps 4-6 of the straight run (without them each reader would start over)."""
    import os
    import shutil

    import pytest

    pytest.importorskip("nvidia.dali")
    from nemo_ext.worlds import generate

    other = generate(tmp_path / "other", num_videos=6, num_frames=33, height=64, width=64, seed=3, progress=False)
    common = [
        *TINY, "data.backend=dali", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
        f"data.sources=[{{name:main,path:'{sample_world}'}},{{name:other,path:'{other}'}}]",
        "data.stages=[{weights:{main:0.5,other:0.5}}]",
    ]
    straight = train_cli(common, run_name="straight")
    rows = straight.metrics()
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[6]["samples_from_main"] + rows[6]["samples_from_other"] == 24
    assert rows[6]["samples_from_main"] > 0 and rows[6]["samples_from_other"] > 0

    # A run whose last checkpoint is the straight run's step 3 (as if it had been killed after it).
    resumed_dir = straight.run_dir.parent / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(straight.run_dir / "checkpoints" / "step_3", resumed_dir / "step_3")
    os.symlink("step_3", resumed_dir / "last")
    resumed = train_cli(common, run_name="resumed")
    assert "resuming from" in resumed.output
    again = resumed.metrics()
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-6, abs=1e-7), step
