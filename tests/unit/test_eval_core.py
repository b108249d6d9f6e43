"""The evaluation core without a trained model: PSNR / SSIM against known values, the shared verdict
rule, the controls, the space-to-depth tokenizer's exact round trip, and rollouts of simulated
"models" through action_control's evaluation spec: the action world's own simulator (it uses the
actions: permuted actions must score worse) and a predictor that ignores them (no gap at all)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemo_ext.eval import core, metrics
from nemo_ext.eval import rollout as ro
from nemo_ext.eval.episodes import Episode, EvalError, to_video
from nemo_ext.models.dit.config import TokenizerConfig
from nemo_ext.tasks.action_control.evaluation import SimulatorPredictor
from nemo_ext.tokenizers.continuous import ContinuousVideoTokenizer


def test_psnr_and_ssim_known_values():
    torch.manual_seed(0)
    a = torch.rand(3, 3, 32, 48, dtype=torch.float64)
    assert torch.isinf(metrics.psnr(a, a)).all() and torch.allclose(metrics.ssim(a, a), torch.ones(3, dtype=torch.float64))
    # +-0.1 around 0.5 in a checkerboard: MSE 0.01 -> exactly 20 dB; 0.05 -> 26.02 dB
    base = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1
    for amp in (0.1, 0.05):
        expected = 10 * math.log10(1 / amp ** 2)
        assert torch.allclose(metrics.psnr(base + amp * sign, base), torch.full((2,), expected, dtype=torch.float64))
    # more noise, lower SSIM; in (0, 1) for noisy images
    noisy = [metrics.ssim((a + s * torch.randn_like(a)).clamp(0, 1), a).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > 0
    # videos in [-1, 1]: per frame
    v = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    p, s = metrics.frame_metrics(v, v)
    assert p.shape == s.shape == (2, 5) and np.isinf(p).all() and np.allclose(s, 1)


def test_ssim_is_the_valid_region_of_the_gaussian_window():
    """Our SSIM is torchmetrics' (reflect-padded, its border cropped: the valid region of Wang et al.);
    equal to an independent computation of the valid-region statistics."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    a = torch.rand(4, 3, 32, 40, dtype=torch.float64)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    filt = lambda t: F.conv2d(t, k, groups=3)  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    va, vb, cov = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))).mean(dim=(1, 2, 3))
    assert torch.allclose(metrics.ssim(b, a), ref, atol=1e-10)


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
    from nemo_ext.tasks.action_control.world import render_action_episode
    from nemo_ext.worlds import WorldSpec

    spec = WorldSpec(num_frames=FRAMES, height=SIZE, width=SIZE, fps=8.0)
    out = []
    for i in range(n):
        frames, actions, _ = render_action_episode(spec, 3, i)
        meta = {"variant": "action", "seed": 3, "index": i, "height": SIZE, "width": SIZE, "fps": 8.0}
        out.append(Episode(key=f"ep{i}", index=i, frames=to_video(frames), signals={"actions": torch.from_numpy(actions)},
                           meta=meta))
    return out


ALIGNS = {"actions": "transitions"}


def blind(current, cond, step, ids):
    """A "model" that ignores the actions: the current frame, held."""
    return current[:, :, None].expand(-1, -1, cond["actions"].shape[1], -1, -1).clone()


def rollouts(predict, eps, **kw):
    return ro.evaluate_rollouts(predict, eps, 8, ALIGNS, "actions", **kw)


def test_the_simulator_is_action_sensitive_and_a_blind_model_is_not():
    eps = _episodes()
    sim = SimulatorPredictor(eps, SIZE, SIZE)
    assert all(SimulatorPredictor.supports(ep) for ep in eps)

    r = rollouts(sim, eps, control="time", control_seed=0, batch_size=3, videos=1)
    assert r.chunks == 2 and r.metrics["psnr_pred"].shape == (4, 16)
    assert np.isinf(r.metrics["psnr_pred"]).all()  # the simulator replays its own frames exactly
    summary = core.summarize(r, eps, margin=0.25)
    sens = summary["sensitivity"]
    assert sens["psnr_gap_db"] > 5 and sens["psnr_gap_ci95"][0] > 0
    assert sens["ssim_gap"] > 0 and len(sens["psnr_gap_db_per_episode"]) == 4
    # 4 episodes and no base model: never "learned", whatever the gap
    assert summary["verdict"]["verdict"] == "inconclusive" and "4 episodes" in summary["verdict"]["explanation"]
    assert len(summary["per_step"]["psnr"]) == 16 and summary["means"]["psnr"] == metrics.PSNR_CAP
    assert set(r.videos) == {0} and r.videos[0]["gt"].shape == (FRAMES, SIZE, SIZE, 3)

    b = rollouts(blind, eps, chunks=1, control="episodes", simulator=sim)
    bs = core.summarize(b, eps, margin=0.25)
    assert bs["sensitivity"]["psnr_gap_db"] == 0
    assert np.array_equal(b.metrics["psnr_pred"], b.metrics["psnr_control"])
    control = bs["ground_truth_control"]  # the simulator itself: what a perfect model would show
    assert control["psnr_true"] == metrics.PSNR_CAP and control["psnr_gap_db"] > 5
    assert len(bs["per_step"]["psnr_simulator_control"]) == 8


def test_tokenizer_ceiling_is_the_ground_truth_through_the_round_trip():
    """The ceiling rolls each chunk (with the frame before it) through the tokenizer's round trip:
    an exact one gives the cap and the simulator's own control score, a lossy one (2x2 average
    pooling) a finite PSNR that still separates true from permuted actions."""
    eps = _episodes()
    sim = SimulatorPredictor(eps, SIZE, SIZE)
    seen = []

    def exact(clips):
        seen.append(tuple(clips.shape))
        return clips[:, :, 1:].clone()

    def pooled(clips):
        b, c, f, h, w = clips.shape
        x = torch.nn.functional.avg_pool2d(clips.movedim(2, 1).reshape(b * f, c, h, w), 2)
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return x.reshape(b, f, c, h, w).movedim(1, 2)[:, :, 1:]

    r = rollouts(blind, eps, control="episodes", simulator=sim, roundtrip=exact)
    assert seen and all(shape[2] == 1 + 8 for shape in seen)  # each chunk with the frame before it
    summary = core.summarize(r, eps, margin=0.25)
    ceiling, control = summary["tokenizer_ceiling"], summary["ground_truth_control"]
    assert ceiling["psnr_true"] == metrics.PSNR_CAP
    assert ceiling["psnr_control"] == pytest.approx(control["psnr_control"])

    lossy = core.summarize(rollouts(blind, eps, simulator=sim, roundtrip=pooled), eps, margin=0.25)
    ceiling = lossy["tokenizer_ceiling"]
    assert 10 < ceiling["psnr_true"] < metrics.PSNR_CAP
    assert ceiling["psnr_control"] < ceiling["psnr_true"] and ceiling["psnr_gap_db"] > 1
    no_sim = core.summarize(rollouts(blind, eps, roundtrip=pooled), eps, margin=0.25)["tokenizer_ceiling"]
    assert no_sim["psnr_true"] == pytest.approx(ceiling["psnr_true"]) and "psnr_gap_db" not in no_sim


def _gap(values):
    return metrics.paired_gap(np.asarray(values), np.zeros(len(values)))


def test_the_shared_verdict_rule():
    """learned: every gap (vs the control and vs the base) over >= 32 episodes with its 95% interval
    wholly above the margin; too few episodes or no base: inconclusive, never learned."""
    rng = np.random.default_rng(0)
    clear = _gap(rng.normal(2.0, 0.5, size=40))
    assert metrics.verdict({"control": clear, "base model": clear}, margin=0.25)["verdict"] == "learned"
    near = _gap(np.linspace(-0.7, 1.3, 40))  # mean 0.3, above the margin; its interval reaches below it
    assert near["mean"] > 0.25 and near["ci95"][0] < 0.25
    assert metrics.verdict({"control": clear, "base model": near}, margin=0.25)["verdict"] == "not_learned"
    few = _gap(rng.normal(2.0, 0.5, size=31))
    out = metrics.verdict({"control": few, "base model": few}, margin=0.25)
    assert out["verdict"] == "inconclusive" and out["episodes"] == 31 and "at least 32" in out["explanation"]
    out = metrics.verdict({"control": clear, "base model": None}, margin=0.25)
    assert out["verdict"] == "inconclusive" and "--base" in out["explanation"]
    assert metrics.verdict({"control": _gap(np.zeros(40)), "base model": clear}, 0.25)["verdict"] == "not_learned"
    assert metrics.bootstrap_ci([1.0, 2.0]) is None and metrics.bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    lo, hi = metrics.bootstrap_ci(rng.normal(1.0, 1.0, size=200))
    assert lo < 1.0 < hi and hi - lo < 0.5


def test_controls():
    acts = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    t = ro.permute(acts, "time", seed=1, ids=[5, 9])
    for e in range(2):
        assert not torch.equal(t[e], acts[e])
        assert sorted(t[e][:, 0].tolist()) == acts[e][:, 0].tolist()  # the same rows, reordered
    assert torch.equal(t, ro.permute(acts, "time", seed=1, ids=[5, 9]))  # fixed by the seed
    s = ro.permute(acts, "episodes", seed=0)
    assert torch.equal(s[0], acts[1]) and torch.equal(s[1], acts[0])
    captions = ["a", "b", "c"]
    swapped = ro.permute(captions, "episodes", seed=0)
    assert sorted(swapped) == captions and all(x != y for x, y in zip(swapped, captions))
    with pytest.raises(EvalError, match="at least 2"):
        ro.permute(acts[:1], "episodes")
    with pytest.raises(EvalError, match="per-transition"):
        ro.permute(captions, "time")


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    from nemo_ext.eval.report import plot_metrics

    per_step = {"frame": list(range(1, 17)), "psnr": list(np.linspace(30, 20, 16)),
                "psnr_control": list(np.linspace(30, 15, 16)), "ssim": list(np.linspace(0.9, 0.6, 16)),
                "ssim_control": list(np.linspace(0.9, 0.5, 16)), "psnr_base": list(np.linspace(28, 14, 16))}
    path = plot_metrics(tmp_path / "m.png", per_step, chunk=8, title="test")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 600
