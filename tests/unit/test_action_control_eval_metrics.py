"""action_control evaluation pieces without a trained model: PSNR / SSIM against known values, the
space-to-depth tokenizer's exact round trip, and the action-sensitivity computation on simulated
"models": the procedural world's own simulator (it uses the actions: shuffled actions must score
worse) and a predictor that ignores them (no gap at all)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemo_ext.eval import action_control as ac
from nemo_ext.models.dit.config import TokenizerConfig
from nemo_ext.tokenizers.continuous import ContinuousVideoTokenizer


def test_psnr_and_ssim_known_values():
    torch.manual_seed(0)
    a = torch.rand(3, 3, 32, 48, dtype=torch.float64)
    assert torch.isinf(ac.psnr(a, a)).all() and torch.allclose(ac.ssim(a, a), torch.ones(3, dtype=torch.float64))
    # +-0.1 around 0.5 in a checkerboard: MSE 0.01 -> exactly 20 dB; 0.05 -> 26.02 dB
    base = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1
    for amp in (0.1, 0.05):
        expected = 10 * math.log10(1 / amp ** 2)
        assert torch.allclose(ac.psnr(base + amp * sign, base), torch.full((2,), expected, dtype=torch.float64))
    # more noise, lower SSIM; in (0, 1) for noisy images
    noisy = [ac.ssim((a + s * torch.randn_like(a)).clamp(0, 1), a).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > 0
    # videos in [-1, 1]: per frame
    v = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    p, s = ac.frame_metrics(v, v)
    assert p.shape == s.shape == (2, 5) and np.isinf(p).all() and np.allclose(s, 1)


def test_ssim_equals_torchmetrics_on_the_valid_region():
    tm = pytest.importorskip("torchmetrics.functional.image")
    torch.manual_seed(1)
    a = torch.rand(4, 3, 32, 40, dtype=torch.float64)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    _, full = tm.structural_similarity_index_measure(b, a, data_range=1.0, reduction="none", return_full_image=True)
    # torchmetrics averages its reflect-padded map; the valid region (Wang et al., skimage) is its interior
    assert torch.allclose(ac.ssim(b, a), full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)), atol=1e-10)


@pytest.mark.parametrize("temporal, spatial", [(1, 8), (8, 8), (8, 4), (2, 2)])
def test_space_to_depth_tokenizer_round_trip_is_exact(temporal, spatial):
    channels = 3 * spatial * spatial * temporal
    cfg = TokenizerConfig(kind="space_to_depth", latent_channels=channels, temporal_compression=temporal,
                          spatial_compression=spatial)
    tok = ContinuousVideoTokenizer(cfg, sigma_data=0.5)
    video = torch.rand(2, 3, 17, 32, 48) * 2 - 1
    z = tok.encode(video)
    assert z.shape == (2, channels, 1 + 16 // temporal, 32 // spatial, 48 // spatial)
    assert torch.equal(tok.decode(z), video)
    # causal: the first latent frame is the first frame alone (a one-frame video encodes to it)
    assert torch.equal(tok.encode(video[:, :, :1])[:, :, 0], z[:, :, 0])


def test_space_to_depth_channel_check_and_preset():
    with pytest.raises(ValueError, match="192 latent channels"):
        ContinuousVideoTokenizer(TokenizerConfig(kind="space_to_depth", latent_channels=16, temporal_compression=1),
                                 sigma_data=0.5)
    with pytest.raises(ValueError, match="kind='bogus'"):
        ContinuousVideoTokenizer(TokenizerConfig(kind="bogus"), sigma_data=0.5)
    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.config.plan import make_plan

    cfg = to_typed(compose("action_control", "diffusion", ["model=dit_tiny_v2w_s2d", "trainer.device=cpu"]))
    assert cfg.model.tokenizer.kind == "space_to_depth" and cfg.model.latent_channels == 192
    assert tuple(make_plan(cfg, world_size=1).latent_shape) == (192, 9, 8, 8)  # image mode: a latent frame per frame


# ------------------------------------------------------------------------------------------------
# Sensitivity on simulated models
# ------------------------------------------------------------------------------------------------

SIZE, FRAMES = 32, 17


def _episodes(n=4):
    from data_prep.sample_world import WorldSpec, render_action_episode

    spec = WorldSpec(num_frames=FRAMES, height=SIZE, width=SIZE, fps=8.0)
    out = []
    for i in range(n):
        frames, actions, _ = render_action_episode(spec, 3, i)
        meta = {"variant": "action", "seed": 3, "index": i, "height": SIZE, "width": SIZE, "fps": 8.0}
        out.append(ac.Episode(key=f"ep{i}", index=i, frames=ac._to_video(frames), actions=torch.from_numpy(actions),
                              meta=meta))
    return out


def blind(current, actions, step, prefix, ids):
    """A "model" that ignores the actions: the current frame, held."""
    return current[:, :, None].expand(-1, -1, actions.shape[1], -1, -1).clone()


def test_the_simulator_is_action_sensitive_and_a_blind_model_is_not():
    eps = _episodes()
    sim = ac.SimulatorPredictor(eps, SIZE, SIZE)
    assert all(ac.SimulatorPredictor.supports(ep) for ep in eps)

    r = ac.evaluate_rollouts(sim, eps, chunk=8, shuffle="time", shuffle_seed=0, batch_size=3, videos=1)
    assert r.chunks == 2 and r.metrics["psnr_pred"].shape == (4, 16)
    assert np.isinf(r.metrics["psnr_pred"]).all()  # the simulator replays its own frames exactly
    summary = ac.summarize(r, eps, threshold_db=0.25)
    sens = summary["action_sensitivity"]
    assert sens["verdict"] == "learned" and sens["psnr_gap_db"] > 5 and sens["psnr_gap_ci95"][0] > 0
    assert sens["ssim_gap"] > 0 and len(sens["psnr_gap_db_per_episode"]) == 4
    assert len(summary["per_step"]["psnr"]) == 16 and summary["means"]["psnr"] == ac.PSNR_CAP
    assert set(r.videos) == {0} and r.videos[0]["gt"].shape == (FRAMES, SIZE, SIZE, 3)

    b = ac.evaluate_rollouts(blind, eps, chunk=8, chunks=1, shuffle="episodes", simulator=sim)
    bs = ac.summarize(b, eps)
    assert bs["action_sensitivity"]["verdict"] == "not_learned" and bs["action_sensitivity"]["psnr_gap_db"] == 0
    assert np.array_equal(b.metrics["psnr_pred"], b.metrics["psnr_shuffled"])
    control = bs["ground_truth_control"]  # the simulator itself: what a perfect model would show
    assert control["psnr_true_actions"] == ac.PSNR_CAP and control["psnr_gap_db"] > 5
    assert len(bs["per_step"]["psnr_ground_truth_shuffled"]) == 8


def test_tokenizer_ceiling_is_the_ground_truth_through_the_round_trip():
    """The ceiling rolls each chunk (with the frame before it) through the tokenizer's round trip:
    an exact one gives the cap and the simulator's own shuffled score, a lossy one (2x2 average
    pooling) a finite PSNR that still separates true from shuffled actions."""
    eps = _episodes()
    sim = ac.SimulatorPredictor(eps, SIZE, SIZE)
    seen = []

    def exact(clips):
        seen.append(tuple(clips.shape))
        return clips[:, :, 1:].clone()

    def pooled(clips):
        b, c, f, h, w = clips.shape
        x = torch.nn.functional.avg_pool2d(clips.movedim(2, 1).reshape(b * f, c, h, w), 2)
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return x.reshape(b, f, c, h, w).movedim(1, 2)[:, :, 1:]

    r = ac.evaluate_rollouts(blind, eps, chunk=8, shuffle="episodes", simulator=sim, roundtrip=exact)
    assert seen and all(shape[2] == 1 + 8 for shape in seen)  # each chunk with the frame before it
    ceiling = ac.summarize(r, eps)["tokenizer_ceiling"]
    control = ac.summarize(r, eps)["ground_truth_control"]
    assert ceiling["psnr_true_actions"] == ac.PSNR_CAP
    assert ceiling["psnr_shuffled_actions"] == pytest.approx(control["psnr_shuffled_actions"])

    lossy = ac.summarize(ac.evaluate_rollouts(blind, eps, chunk=8, simulator=sim, roundtrip=pooled), eps)
    ceiling = lossy["tokenizer_ceiling"]
    assert 10 < ceiling["psnr_true_actions"] < ac.PSNR_CAP
    assert ceiling["psnr_shuffled_actions"] < ceiling["psnr_true_actions"] and ceiling["psnr_gap_db"] > 1
    no_sim = ac.summarize(ac.evaluate_rollouts(blind, eps, chunk=8, roundtrip=pooled), eps)["tokenizer_ceiling"]
    assert no_sim["psnr_true_actions"] == pytest.approx(ceiling["psnr_true_actions"]) and "psnr_gap_db" not in no_sim


def test_verdicts_from_gaps():
    rng = np.random.default_rng(0)
    base = rng.uniform(15, 20, size=(6, 8))
    ssim = np.full((6, 8), 0.5)
    assert ac.action_sensitivity(base + 2, base, ssim, ssim)["verdict"] == "learned"
    assert ac.action_sensitivity(base, base, ssim, ssim)["verdict"] == "not_learned"
    mixed = base + np.array([3, -3, 3, -3, 3, -1])[:, None]  # a mean gap of 0.33 dB, all over the place
    out = ac.action_sensitivity(mixed, base, ssim, ssim, threshold_db=0.25)
    assert out["verdict"] == "inconclusive" and out["psnr_gap_ci95"][0] < 0 < out["psnr_gap_ci95"][1]
    assert ac.bootstrap_ci([1.0, 2.0]) is None
    one = ac.action_sensitivity(base[:1] + 1, base[:1], ssim[:1], ssim[:1])
    assert one["verdict"] == "learned" and one["psnr_gap_ci95"] is None  # stated: no interval below 3 episodes


def test_shuffles():
    acts = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    t = ac.shuffle_actions(acts, "time", seed=1, ids=[5, 9])
    for e in range(2):
        assert not torch.equal(t[e], acts[e])
        assert sorted(t[e][:, 0].tolist()) == acts[e][:, 0].tolist()  # the same rows, reordered
    assert torch.equal(t, ac.shuffle_actions(acts, "time", seed=1, ids=[5, 9]))  # fixed by the seed
    s = ac.shuffle_actions(acts, "episodes", seed=0)
    assert torch.equal(s[0], acts[1]) and torch.equal(s[1], acts[0])
    with pytest.raises(ac.EvalError, match="at least 2"):
        ac.shuffle_actions(acts[:1], "episodes")


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    per_step = {"frame": list(range(1, 17)), "psnr": list(np.linspace(30, 20, 16)),
                "psnr_shuffled": list(np.linspace(30, 15, 16)), "ssim": list(np.linspace(0.9, 0.6, 16)),
                "ssim_shuffled": list(np.linspace(0.9, 0.5, 16))}
    path = ac.plot_metrics(tmp_path / "m.png", per_step, chunk=8, title="test")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 600
