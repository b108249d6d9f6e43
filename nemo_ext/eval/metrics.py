"""The evaluation core's metrics and statistics, one copy for every task.

* Frame metrics: PSNR and SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  statistics over the valid region, mean over channels) from torchmetrics, images in [0, 1];
  :data:`PSNR_CAP` stands for identical frames (inf) in averages.
* Intervals: the percentile bootstrap of the mean (scipy.stats.bootstrap, seeded).
* The verdict: one rule for every task (:func:`verdict`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

PSNR_CAP = 100.0  # dB: identical frames (inf) count as this in averages
MIN_EPISODES = 32  # the verdict needs at least this many held-out episodes to say "learned"
VERDICTS = ("learned", "not_learned", "inconclusive")


def unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float64."""
    return (x.double().clamp(-1, 1) + 1) / 2


def _check(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"{what}: expected two [N, C, H, W] batches of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of ``[N, C, H, W]`` batches (inf where the images are equal)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check(pred, target, "psnr")
    return peak_signal_noise_ratio(pred.double(), target.double(), data_range=data_range, reduction="none",
                                   dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image of ``[N, C, H, W]`` batches (Gaussian ``window`` x ``sigma``, shrunk to the
    image for small ones; 1 for equal images)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check(pred, target, "ssim")
    size = min(window, *pred.shape[2:])
    size -= 1 - size % 2  # odd
    # torchmetrics' own mean includes the border of its reflect-padded map; Wang et al. (and skimage)
    # average the valid region, the map's interior
    _, full = structural_similarity_index_measure(pred.double(), target.double(), gaussian_kernel=True, sigma=sigma,
                                                  kernel_size=size, data_range=data_range, reduction="none",
                                                  return_full_image=True)
    pad = (size - 1) // 2
    h, w = full.shape[-2:]
    return full[..., pad:h - pad, pad:w - pad].mean(dim=(1, 2, 3))


def frame_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Videos ``[B, 3, S, H, W]`` in [-1, 1] -> (PSNR [B, S], SSIM [B, S]) per frame."""
    b, c, s, h, w = pred.shape
    p = unit(pred).transpose(1, 2).reshape(b * s, c, h, w)
    t = unit(target).transpose(1, 2).reshape(b * s, c, h, w)
    return psnr(p, t).reshape(b, s).numpy(), ssim(p, t).reshape(b, s).numpy()


def capped(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # a GPU run's metrics (the tokenizer's reconstruction PSNR on CUDA)
        x = x.detach().cpu()
    return np.minimum(np.asarray(x, dtype=np.float64), PSNR_CAP)


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of the mean over ``values`` (None below 3 values; a constant
    sample's interval is that constant)."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 3:
        return None
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, n_resamples=n, confidence_level=level, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_gap(better: np.ndarray, worse: np.ndarray, seed: int = 0) -> dict:
    """Per-episode ``better - worse`` (arrays [episodes] or [episodes, steps]: mean over steps first),
    its mean and 95% bootstrap interval."""
    a, b = np.asarray(better, dtype=np.float64), np.asarray(worse, dtype=np.float64)
    gap = (a - b).mean(axis=1) if a.ndim == 2 else a - b
    ci = bootstrap_ci(gap, seed=seed)
    return {"mean": float(gap.mean()), "ci95": None if ci is None else list(ci), "per_episode": gap.tolist(),
            "episodes": int(len(gap))}


def verdict(gaps: dict, margin: float, unit_name: str = "dB", min_episodes: int = MIN_EPISODES) -> dict:
    """The shared verdict rule. ``gaps``: ``{reference: paired_gap(...) or None}``, the gaps of the
    model's score over the control (its conditioning permuted) and over the base model (None: not
    evaluated). ``learned`` when every gap, over >= ``min_episodes`` held-out episodes, has a 95%
    bootstrap interval wholly above ``margin``; ``inconclusive`` with fewer episodes or a reference
    missing (never ``learned``); ``not_learned`` otherwise."""
    present = {name: g for name, g in gaps.items() if g is not None}
    missing = sorted(set(gaps) - set(present))
    n = min((g["episodes"] for g in present.values()), default=0)
    described = "; ".join(
        f"vs {name}: {g['mean']:+.3f} {unit_name}"
        + (f", 95% interval [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g["ci95"] else "")
        for name, g in present.items()) or "no gaps"
    if n < min_episodes:
        state, why = "inconclusive", f"{n} episodes; the verdict needs at least {min_episodes} held-out ones ({described})"
    elif missing:
        state, why = "inconclusive", (f"no {' or '.join(missing)} to compare with (for the base model: --base CKPT, "
                                      f"the checkpoint it was post-trained from); {described}")
    elif all(g["ci95"] is not None and g["ci95"][0] > margin for g in present.values()):
        state, why = "learned", f"every gap's 95% interval lies above the margin {margin:g} {unit_name} ({described})"
    else:
        state, why = "not_learned", f"a gap's 95% interval reaches the margin {margin:g} {unit_name} or below ({described})"
    return {"verdict": state, "margin": margin, "unit": unit_name, "min_episodes": min_episodes, "episodes": n,
            "compared_with": sorted(gaps), "explanation": why}
