"""Generation (``python -m nemo_ext.cli.sample``) from tiny runs of both families, trained here
through the training CLI for two steps (a freshly built DiT's text pathway only moves at the second:
its final layer starts at zero): the mp4 decodes with the expected frames and size, AR decoding is
deterministic per seed and keeps the conditioning frames' tokens, Video2World diffusion keeps the
given latent frames, EMA weights are used by default."""

from __future__ import annotations

import io
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from support import REPO, cli_env, train_concurrently

TRAIN = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
         "trainer.val_every_n_steps=0", "data.num_workers=0", "data.sample_num_videos=16", "data.global_batch_size=1",
         "data.micro_batch_size=1"]
FRAMES, SIZE = 17, 64  # the recipes' data.num_frames and clip size


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_world):
    """Three tiny runs trained concurrently: Video2World DiT with EMA, text-to-world DiT, AR
    Video2World (T5 cross-attention, <bov>)."""
    runs_dir = tmp_path_factory.mktemp("sample_runs")
    specs = {
        "dit_v2w": (["model=dit_tiny_v2w", "trainer.ema_decay=0.5"], "diffusion"),
        "dit": (["model=dit_tiny"], "diffusion"),
        "ar": (["model=ar_tiny_v2w"], "ar"),
    }

    return train_concurrently({name: dict(overrides=[*TRAIN, f"data.sample_dir={sample_world}", *extra],
                                          runs_dir=runs_dir, family=family) for name, (extra, family) in specs.items()})


def sample_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "nemo_ext.cli.sample", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"sample failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def decode_mp4(path):
    with av.open(io.BytesIO(path.read_bytes())) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), codec


def test_diffusion_video2world_cli(runs, tmp_path):
    out = tmp_path / "dit.mp4"
    stdout = sample_cli("--ckpt", runs["dit_v2w"], "--from-data", "train", "--sample", "1", "--steps", "3",
                        "--side-by-side", "--save-codes", "--out", out)
    assert f"wrote {out.resolve()}" in stdout and "timing: load" in stdout
    assert "ema weights" in stdout
    frames, codec = decode_mp4(out)
    assert codec == "h264" and frames.shape == (FRAMES, SIZE, 2 * SIZE, 3)  # ground truth | generated
    saved = torch.load(out.with_suffix(".pt"))
    codes, given = saved["codes"], saved["condition"]
    assert codes.shape[2] == 1 + (FRAMES - 1) // 8 and given.shape[2] == 1  # dit_tiny_v2w: 1 given latent frame
    assert torch.equal(codes[:, :, :1], given)
    assert saved["stats"]["model_calls"] == 2 * 3 - 1  # Heun, no guidance


def test_ar_cli_default_output_and_raw_weights(runs):
    stdout = sample_cli("--ckpt", runs["ar"] / "checkpoints" / "last", "--from-data", "train", "--prompt", "a red ball",
                        "--top-k", "50", "--weights", "raw", "--codec", "vp9")
    path = runs["ar"] / "samples" / "step2_train0_seed0.mp4"
    assert f"wrote {path.resolve()}" in stdout and "raw weights" in stdout and "tokens_per_s" in stdout
    frames, codec = decode_mp4(path)
    assert codec == "vp9" and frames.shape == (FRAMES, SIZE, SIZE, 3)


def test_ar_generation_is_seeded_and_keeps_the_given_tokens(runs, megatron_world, tmp_path):
    from nemo_ext.data.video import encode_video
    from nemo_ext.eval import generation as g

    run = g.load_run(str(runs["ar"]))
    assert run.family == "ar" and run.weights == "raw" and run.step == 2
    clip = g.clip_from_data(run, 2, "train")
    a = g.generate_ar(run, clip, "a red ball", seed=7)
    b = g.generate_ar(run, clip, "a red ball", seed=7)
    c = g.generate_ar(run, clip, "a red ball", seed=8)
    t, h, w = run.plan.latent_shape
    assert a.codes.shape == (1, t, h, w) and a.video.shape == (1, 3, FRAMES, SIZE, SIZE)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.video, b.video)
    assert not torch.equal(a.codes, c.codes)
    k = run.cfg.model.condition_frames
    given = run.module.tokenizer.encode(clip.video)[:, :k]
    assert torch.equal(a.codes[:, :k], given) and torch.equal(a.condition, given)
    greedy = [g.generate_ar(run, clip, "a red ball", temperature=0, seed=s).codes for s in (0, 1)]
    assert torch.equal(*greedy)

    # a video shorter than the clip: only its first frame conditions the model
    video = tmp_path / "one.mp4"
    video.write_bytes(encode_video(g.to_frames(clip.video)[:1], fps=8))
    short = g.clip_from_video(run, video)
    assert short.real_frames == 1 and short.video.shape == clip.video.shape and not short.complete
    assert g.generate_ar(run, short, "", seed=0).video.shape == (1, 3, FRAMES, SIZE, SIZE)


def test_text_to_world_diffusion_with_guidance(runs, megatron_world):
    from nemo_ext.eval import generation as g

    run = g.load_run(str(runs["dit"]), num_frames=9)
    assert run.weights == "raw" and not run.cfg.model.video2world
    nothing = g.Clip(video=None, real_frames=0)
    a = g.generate_diffusion(run, nothing, "a red ball", steps=3, guidance=3.0, seed=1)
    assert a.video.shape == (1, 3, 9, SIZE, SIZE) and a.condition is None
    assert a.stats["model_calls"] == 2 * (2 * 3 - 1)  # conditional + empty prompt per evaluation
    again = g.generate_diffusion(run, nothing, "a red ball", steps=3, guidance=3.0, seed=1)
    unguided = g.generate_diffusion(run, nothing, "a red ball", steps=3, guidance=1.0, seed=1)
    assert torch.equal(a.codes, again.codes) and not torch.equal(a.codes, unguided.codes)
    assert g.output_fps(run, nothing) == 8.0  # the sample world's frame rate, read from the run's data

    v2w = g.load_run(str(runs["dit_v2w"]))
    with pytest.raises(ValueError, match="--video <mp4> or --from-data"):
        g.generate_diffusion(v2w, nothing, "", steps=2)
    assert v2w.weights == "ema" and g.load_run(str(runs["dit_v2w"]), weights="raw").weights == "raw"
    with pytest.raises(ValueError, match="no EMA weights"):
        g.load_run(str(runs["dit"]), weights="ema")


def test_the_dit_denoiser_is_the_training_forward_pass(runs, megatron_world):
    """Same weights, latents, noise and noise level: the sampler's x0 gives the training loss
    (Video2World: given frames augmented and masked out of the loss; below the augmentation
    sigma the whole clip is generated)."""
    from nemo_ext.eval import generation as g

    run = g.load_run(str(runs["dit_v2w"]), weights="raw")
    module, m = run.module, run.cfg.model
    clip = g.clip_from_data(run, 0, "train")
    x0 = module.tokenizer.encode(clip.video)
    gen = torch.Generator().manual_seed(0)
    noise, cond_noise = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    batch = g.conditioning_batch(run, clip, clip.caption)
    frames = torch.zeros(1, 1, x0.shape[2], 1, 1)
    frames[:, :, : m.condition_latent_frames] = 1
    for s in (m.condition_augment_sigma / 2, 0.3, 5.0):
        sigma = torch.tensor([s])
        with torch.no_grad():
            out, loss_fn = module.forward_step(iter([dict(batch, latents=x0, sigma=sigma, noise=noise,
                                                          cond_noise=cond_noise, fps=8.0)]), module.world_model)
            want = loss_fn(out)[0]
            x0_pred = g.dit_denoiser(run, batch, 8.0, x0, cond_noise)(x0 + s * noise, sigma)
        given = frames * float(s > m.condition_augment_sigma)
        got = module.edm.loss(x0, x0_pred, sigma, mask=1 - given).mean()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (s, got, want)
