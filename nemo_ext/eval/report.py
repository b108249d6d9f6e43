"""The evaluation core's outputs: ``report.json`` (one schema for every task), ``metrics.png``
(matplotlib) and side-by-side mp4 panels.

``report.json`` (schema :data:`SCHEMA`; :data:`COMMON_KEYS` in every report, :data:`ROLLOUT_KEYS` in
a rollout evaluation's):

* ``schema``, ``task``, ``family``, ``model``, ``checkpoint``, ``run_dir``, ``step``, ``weights``,
  ``weights_from`` (another checkpoint's weights in the run's model), ``base`` (the base model's
  checkpoint, or null), ``tokenizer`` (what the pixel metrics can mean with it);
* ``config``: split, data, episodes, chunk and chunks, the evaluated ``signal`` and its ``control``
  mode and seed, sampling options, size, fps, overrides, ``psnr_cap_db``;
* ``per_step`` {``frame``: 1..K*chunk, ``psnr``, ``ssim``, ``psnr_control``, ``ssim_control``, and
  where evaluated ``psnr_base``, ``psnr_simulator_control``, ...}: means over episodes per rolled-out frame;
* ``per_chunk`` {``chunk``, ``last_frame``, code metric (``latent_l2`` / ``token_accuracy``) and its
  ``_control``}; ``means``: the overall means of both;
* ``episodes``: per episode ``key``, ``index``, ``num_frames``, ``psnr``, ``ssim``, ``psnr_control``,
  ``ssim_control`` (+ ``psnr_base``, code metrics);
* ``sensitivity``: the paired per-episode gaps over the control (``psnr_gap_db``, ``psnr_gap_ci95``,
  ``ssim_gap``, ``ssim_gap_ci95``, per episode) and the teacher-forced loss gap;
* ``vs_base``: the same gaps over the base model (null without ``--base``);
* ``verdict``: the shared rule (:func:`nemo_ext.eval.metrics.verdict`) on the PSNR gaps:
  ``{verdict, margin, unit, min_episodes, episodes, compared_with, explanation}``;
* ``ground_truth_control`` (the task's simulator replaying the true and the permuted conditioning),
  ``tokenizer_ceiling`` (the ground truth through the run's tokenizer), ``task_metrics`` (the task's
  own, e.g. instruction following): null where not evaluated;
* ``timings`` (seconds), ``outputs`` (file names of the plot and the videos, the panel order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SCHEMA = "cosmos-recipes/eval-report/1"
# every evaluation's report; a rollout evaluation's adds ROLLOUT_KEYS (the general task's: held_out_loss,
# frechet_distance, nemo_ext/tasks/general/evaluation.py)
COMMON_KEYS = ("schema", "task", "family", "model", "checkpoint", "step", "weights", "base", "tokenizer", "config",
               "episodes", "sensitivity", "vs_base", "verdict", "timings", "outputs")
ROLLOUT_KEYS = ("per_step", "per_chunk", "means", "ground_truth_control", "tokenizer_ceiling", "task_metrics")

# per_step curve -> (label, colour, line style); a name not here is drawn with matplotlib's defaults
CURVES = {
    "": ("prediction", "tab:blue", "-"),
    "_control": ("prediction, control", "tab:red", "-"),
    "_base": ("base model", "tab:green", "--"),
    "_simulator_control": ("ground truth under the control", "tab:gray", ":"),
}


def check_report(report: dict, rollout: bool = True) -> list[str]:
    """The schema's keys that ``report`` lacks (empty: it matches)."""
    missing = [k for k in COMMON_KEYS + (ROLLOUT_KEYS if rollout else ()) if k not in report]
    verdict = report.get("verdict") or {}
    if verdict.get("verdict") not in ("learned", "not_learned", "inconclusive"):
        missing.append(f"verdict {verdict.get('verdict')!r}")
    if report.get("schema") not in (None, SCHEMA):
        missing.append(f"schema {report.get('schema')!r} != {SCHEMA!r}")
    return missing


def plot_metrics(path, per_step: dict, chunk: int, title: str = "", control_label: str = "control") -> Path:
    """metrics.png: PSNR and SSIM vs rolled-out frame, one line per rollout, chunk boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = per_step["frame"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric, unit in ((axes[0], "psnr", "dB"), (axes[1], "ssim", "")):
        for key, values in per_step.items():
            if not key.startswith(metric):
                continue
            label, color, style = CURVES.get(key[len(metric):], (key, None, "-"))
            ax.plot(frames, values, style, color=color, marker=".", label=label.replace("control", control_label))
        for boundary in range(chunk, frames[-1], chunk):
            ax.axvline(boundary + 0.5, color="0.8", linestyle=":", linewidth=1)
        ax.set_xlabel("rolled-out frame")
        ax.set_ylabel(f"{metric.upper()}" + (f" ({unit})" if unit else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 videos [T, H, W, 3] of one length -> one [T, H, W * n, 3]."""
    return np.concatenate(list(panels), axis=2)


def write_videos(out_dir: Path, videos: dict, episodes, fps: float, order: Sequence[str] = ("gt", "pred", "control"),
                 codec: str = "h264") -> list[str]:
    """``rollout_<key>.mp4`` per episode: the panels of ``order`` side by side."""
    from nemo_ext.eval.generation import write_mp4

    keys = {ep.index: ep.key for ep in episodes}
    written = []
    for i, v in videos.items():
        path = write_mp4(out_dir / f"rollout_{keys.get(i, i)}.mp4", side_by_side([v[name] for name in order]), fps,
                         codec=codec)
        written.append(path.name)
    return written
