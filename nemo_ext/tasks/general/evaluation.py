"""The general task's evaluation (``make recipe=general eval CKPT=...``), on the shared core's pieces.

General post-training learns a target video distribution, so its evaluation asks whether the held-out
videos of that distribution became more likely and whether the captions steer the model:

* **Held-out loss**: diffusion, the EDM denoising loss on the held-out clips at fixed noise levels
  (``--sigmas``, the same noise per clip: comparable across steps and runs), per level and averaged;
  AR, the per-token negative log-likelihood (and perplexity) of the held-out clips' tokens.
* **Caption sensitivity**: the same teacher-forced loss with each clip's own caption and with another
  clip's (a derangement): the loss gap, per clip, with a 95% bootstrap interval.
* **The base model** (``--base``, default the run's ``trainer.init_from``): its held-out loss per clip;
  the verdict (the shared rule, on the loss gaps) asks that the post-trained model beat both the
  control (swapped captions) and the base on the held-out clips.
* **Samples**: ``--samples`` clips generated from the held-out clips' captions (and first frames for
  Video2World), side by side with the ground truth (mp4).
* **Fréchet distance** between the generated and the held-out clips in a feature space (``--features``):
  ``tokenizer`` (default: the run's own tokenizer latents, or the AR family's FSQ code digits, mean over
  space per latent / token frame), or
  ``torchscript=<file>``: a local TorchScript feature extractor (e.g. an I3D exported to TorchScript, as
  FVD implementations ship it) called on [B, 3, T, H, W] clips in [-1, 1] (resized to ``--features-size``).
  Never a download. With fewer clips than feature dimensions the covariances are rank-deficient: the
  report says how many clips it used.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from nemo_ext.eval.core import Evaluation, base_checkpoint, output_dir, register_evaluation, tokenizer_note
from nemo_ext.eval.episodes import EvalError, episodes_of_run

DEFAULT_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


def add_arguments(p) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--episodes", type=int, default=8, help="held-out clips to evaluate (0 = all); the verdict needs >= 32")
    g.add_argument("--start", type=int, default=0)
    g.add_argument("--split", default="val", choices=["val", "train"])
    g.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
                   help="diffusion: the noise levels of the held-out loss (comma-separated)")
    g.add_argument("--control-seed", type=int, default=0, help="the caption swap")
    g.add_argument("--base", default=None, metavar="CKPT", help="the base model (default: trainer.init_from)")
    g.add_argument("--no-base", action="store_true")
    g.add_argument("--samples", type=int, default=2, help="clips to generate (mp4 + Fréchet distance)")
    g.add_argument("--sampler-steps", type=int, default=35)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--features", default="tokenizer",
                   help="Fréchet distance features: tokenizer (default) or torchscript=<local .pt file>")
    g.add_argument("--features-size", type=int, default=224, help="frame size fed to a torchscript extractor")


def _clip_batch(ep, frames: int, caption: str, seed: int) -> dict:
    raw = {"video": ep.frames[None, :, :frames], "caption": [caption], "sample_seed": torch.tensor([seed])}
    if ep.fps:
        raw["fps"] = torch.tensor([float(ep.fps)])
    return raw


@torch.no_grad()
def held_out_losses(run, episodes, frames: int, captions, sigmas=None) -> np.ndarray:
    """Per clip (rows) the teacher-forced loss with ``captions``: diffusion at each fixed ``sigmas``
    (columns; the clip's own noise, drawn from its index), AR the token NLL (one column)."""
    module = run.module
    out = np.zeros((len(episodes), len(sigmas) if sigmas else 1))
    for e, ep in enumerate(episodes):
        mb = module.prepare_microbatch(_clip_batch(ep, frames, captions[e], ep.index), 0, validation=True)
        for j, sigma in enumerate(sigmas or [None]):
            if sigma is not None:
                mb["sigma"] = torch.full_like(mb["sigma"], float(sigma))
            result, loss_fn = module.forward_step(iter([mb]), module.world_model)
            out[e, j] = float(loss_fn(result)[0])
    return out


def _features(run, videos: torch.Tensor, spec: str, size: int) -> np.ndarray:
    """[N, 3, T, H, W] in [-1, 1] -> [N, D] features."""
    if spec == "tokenizer":
        tok = run.module.tokenizer
        with torch.no_grad():
            codes = tok.encode(videos.to(run.device))
        if not codes.is_floating_point():  # AR: FSQ token ids [N, T, h, w] -> their code digits in [-1, 1]
            digits, rest = [], codes.long()
            for level in run.cfg.model.tokenizer.levels:  # the mixed-radix index of FSQ (first level fastest)
                digits.append((rest % level).float() / max(level - 1, 1) * 2 - 1)
                rest = rest // level
            codes = torch.stack(digits, dim=1)  # [N, levels, T, h, w]
        return codes.float().mean(dim=(3, 4)).flatten(1).cpu().numpy()  # [N, C * T]: mean over space per frame
    kind, _, path = spec.partition("=")
    if kind != "torchscript" or not path:
        raise EvalError(f"--features {spec!r}: expected tokenizer or torchscript=<local file>")
    if not Path(path).is_file():
        raise EvalError(f"--features {spec}: {path} does not exist (a local TorchScript file; nothing is downloaded)")
    net = torch.jit.load(path, map_location=run.device).eval()
    n, c, t, h, w = videos.shape
    x = torch.nn.functional.interpolate(videos.transpose(1, 2).reshape(n * t, c, h, w), size=(size, size),
                                        mode="bilinear", align_corners=False).reshape(n, t, c, size, size).transpose(1, 2)
    with torch.no_grad():
        return net(x.to(run.device)).float().reshape(n, -1).cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D]. The trace of the
    square root is the sum of the square roots of S_a S_b's eigenvalues (real and >= 0 for two
    covariances; rounding's negative ones clipped), which stays defined for rank-deficient covariances."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    sb = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def run_general_eval(args) -> int:
    from nemo_ext.eval import generation as g
    from nemo_ext.eval.metrics import paired_gap, verdict
    from nemo_ext.eval.report import SCHEMA, side_by_side
    from nemo_ext.eval.rollout import derangement

    start = time.perf_counter()
    with g.generation_world(args.device, seed=args.seed):
        run = g.load_run(args.ckpt, weights=args.weights, device=args.device, overrides=args.overrides,
                         recipe=args.recipe, family=args.family, model=args.model, weights_from=args.weights_from)
        cfg = run.cfg
        if cfg.task.name != "general":
            raise EvalError(f"{run.ckpt} is a {cfg.task.name!r} task run, not a general one")
        episodes, source = episodes_of_run(cfg, (), None, args.split, num=args.episodes or None, start=args.start)
        frames = cfg.data.num_frames
        short = [ep.key for ep in episodes if ep.num_frames < frames]
        if short:
            raise EvalError(f"held-out videos shorter than data.num_frames={frames}: {', '.join(short[:3])}")
        captions = [ep.caption for ep in episodes]
        # the swapped-caption control; a model that reads no captions (video-only AR) has none
        swapped = ([captions[i] for i in derangement(len(episodes), args.control_seed)]
                   if len(episodes) > 1 and run.text_conditioned else None)
        sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()] if run.family == "diffusion" else None
        t0 = time.perf_counter()
        loss = held_out_losses(run, episodes, frames, captions, sigmas)
        loss_control = held_out_losses(run, episodes, frames, swapped, sigmas) if swapped else None
        loss_s = time.perf_counter() - t0
        base_ckpt = base_checkpoint(run, args)
        loss_base = None
        if base_ckpt:
            base_run = g.load_run(args.ckpt, weights=args.weights, device=args.device, overrides=args.overrides,
                                  recipe=args.recipe, family=args.family, model=args.model, weights_from=base_ckpt)
            loss_base = held_out_losses(base_run, episodes, frames, captions, sigmas)
            del base_run
        # samples: from each clip's caption (and first frames for a Video2World / AR model)
        t0 = time.perf_counter()
        generated, videos = [], []
        out_dir = output_dir(run, args)
        fps = cfg.data.fps or episodes[0].fps or g.data_fps(cfg) or 8.0
        for ep in episodes[: args.samples]:
            clip = g.Clip(video=ep.frames[None, :, :frames], real_frames=frames, caption=ep.caption, fps=ep.fps,
                          name=ep.key)
            if run.family == "diffusion":
                gen = g.generate_diffusion(run, clip, ep.caption, steps=args.sampler_steps, guidance=args.guidance,
                                           seed=args.seed + ep.index)
            else:
                gen = g.generate_ar(run, clip, ep.caption, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed + ep.index)
            generated.append(gen.video[0, :, :frames])
            panels = [g.to_frames(ep.frames[:, :frames]), g.to_frames(gen.video[0, :, :frames])]
            videos.append(g.write_mp4(out_dir / f"generated_{ep.key}.mp4", side_by_side(panels), fps).name)
        fd = None
        if generated:
            real = _features(run, torch.stack([ep.frames[:, :frames] for ep in episodes]), args.features,
                             args.features_size)
            fake = _features(run, torch.stack(generated), args.features, args.features_size)
            fd = {"features": args.features, "generated_clips": len(generated), "held_out_clips": len(episodes),
                  "feature_dims": int(real.shape[1]), "value": frechet_distance(fake, real),
                  "note": "few clips: covariances of rank < feature dims; compare values of equal settings only"
                  if len(generated) < real.shape[1] else ""}
        samples_s = time.perf_counter() - t0

    mean_loss = loss.mean(axis=1)
    gaps = {"control": paired_gap(loss_control.mean(axis=1), mean_loss, seed=args.control_seed) if swapped else None,
            "base model": paired_gap(loss_base.mean(axis=1), mean_loss, seed=args.control_seed)
            if loss_base is not None else None}
    what = "per-token NLL" if run.family == "ar" else "EDM loss"
    judged = verdict(gaps, margin=0.0, unit_name=what)
    held = {"what": what + (" at fixed noise levels (sigma), the clip's own noise" if sigmas else " of the clip's tokens"),
            "mean": float(mean_loss.mean()), "per_episode": mean_loss.tolist()}
    if sigmas:
        held["sigmas"] = sigmas
        held["per_sigma"] = loss.mean(axis=0).tolist()
    else:
        held["perplexity"] = float(math.exp(min(held["mean"], 50.0)))
    if loss_base is not None:
        held["base_mean"] = float(loss_base.mean())
        if sigmas:
            held["base_per_sigma"] = loss_base.mean(axis=0).tolist()
    sens = None
    if swapped:
        g_ = gaps["control"]
        sens = {"what": "teacher-forced loss with another clip's caption minus with the clip's own (positive: the "
                        "captions steer the model)", "loss_true": held["mean"],
                "loss_control": float(loss_control.mean()), "loss_gap": g_["mean"], "loss_gap_ci95": g_["ci95"],
                "per_episode_gap": g_["per_episode"]}
    plot = _plot(out_dir / "metrics.png", held, cfg.model.name, judged["verdict"])
    report = {
        "schema": SCHEMA, "task": "general", "family": run.family, "model": cfg.model.name,
        "checkpoint": str(run.ckpt), "weights_from": args.weights_from, "base": base_ckpt,
        "run_dir": str(run.run_dir) if run.run_dir else None, "step": run.step, "weights": run.weights,
        "tokenizer": tokenizer_note(cfg),
        "config": {"split": args.split, "data": source, "episodes": len(episodes), "start": args.start,
                   "num_frames": frames, "control": "episodes", "control_seed": args.control_seed,
                   "samples": args.samples, "features": args.features, "text_conditioned": run.text_conditioned,
                   "overrides": list(args.overrides)},
        "held_out_loss": held, "sensitivity": sens, "vs_base": gaps["base model"], "verdict": judged,
        "frechet_distance": fd, "episodes": [{"key": ep.key, "index": ep.index, "caption": ep.caption,
                                              "loss": float(mean_loss[i])} for i, ep in enumerate(episodes)],
        "timings": {"loss_s": loss_s, "samples_s": samples_s, "total_s": time.perf_counter() - start,
                    "device": str(run.device)},
        "outputs": {"metrics_png": plot.name, "videos": videos, "video_panels": ["ground truth", "generated"]},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"{run.family} {cfg.model.name} ({run.weights} weights of {run.ckpt}); tokenizer: {report['tokenizer']}")
    print(f"held-out {what}: {held['mean']:.4f} over {len(episodes)} {args.split} clip(s)"
          + (f" (base {held['base_mean']:.4f})" if loss_base is not None else ""))
    if sens:
        ci = sens["loss_gap_ci95"]
        print(f"caption sensitivity: loss with swapped captions {sens['loss_control']:.4f}, gap {sens['loss_gap']:+.4f}"
              + (f" (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else ""))
    if fd:
        print(f"Fréchet distance ({fd['features']} features, {fd['generated_clips']} generated vs {fd['held_out_clips']} "
              f"held-out clips): {fd['value']:.4f}")
    print(f"verdict: {judged['verdict']} ({judged['explanation']})")
    print(f"wrote {out_dir.resolve()}/report.json, metrics.png" + (", " + ", ".join(videos) if videos else ""))
    return 0


def _plot(path, held: dict, model: str, state: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    if "per_sigma" in held:
        ax.plot(held["sigmas"], held["per_sigma"], marker="o", label="post-trained")
        if "base_per_sigma" in held:
            ax.plot(held["sigmas"], held["base_per_sigma"], marker="o", linestyle="--", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel("held-out EDM loss")
    else:
        ax.bar(range(len(held["per_episode"])), held["per_episode"], label="post-trained")
        ax.set_xlabel("held-out clip")
        ax.set_ylabel("per-token NLL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: held-out loss (verdict: {state})", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


GENERAL_EVALUATION = register_evaluation(Evaluation(
    task="general",
    description="held-out loss per noise level (diffusion) / per-token NLL (AR), caption sensitivity (true vs swapped "
                "captions), the base model's loss, sample videos and a Fréchet distance between generated and held-out "
                "clips (tokenizer latents, or a local TorchScript extractor)",
    signal="caption",
    add_arguments=add_arguments,
    run=run_general_eval,
    quick_args=("--episodes", "2", "--samples", "1", "--sampler-steps", "2"),
))
