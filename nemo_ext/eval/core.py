"""The evaluation core: the registry of the tasks' evaluations and the one runner of rollout
evaluations (``python -m nemo_ext.cli.eval``, ``make recipe=<task> eval``).

A task registers an :class:`Evaluation` from its folder (``nemo_ext/tasks/<task>/evaluation.py``)
that names what the core cannot know: the signal whose influence is tested and its control modes,
the rollout chunk, the simulator that replays the world under any conditioning (ground truth), the
run checks, the verdict margin, extra task metrics. The core does the rest for every task: run
loading, episode reading, rollouts per family (:mod:`nemo_ext.eval.rollout`), metrics, the control
and the base model (``--base``), bootstrap intervals, the shared verdict, ``report.json``
(:mod:`nemo_ext.eval.report`), ``metrics.png`` and mp4 panels. An evaluation that is no rollout (the
general task's) gives its own ``run`` and uses the same pieces.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nemo_ext.eval.episodes import EvalError, episodes_of_run
from nemo_ext.eval.metrics import PSNR_CAP, capped, paired_gap, verdict
from nemo_ext.registry import Registry, import_task_packages


@dataclass(frozen=True)
class Evaluation:
    task: str
    description: str  # one paragraph for `eval --help`
    # the batch key of the conditioning whose influence is tested ("actions", "caption") and the
    # control modes that permute it (the first is the default of --control)
    signal: str = ""
    controls: tuple = ("episodes",)
    margin_db: float = 0.25  # the verdict's margin on the paired PSNR gaps
    chunk: Callable = lambda cfg: cfg.data.num_frames - 1  # frames per rollout chunk
    dims: Callable = lambda cfg: {}  # {batch key: (dims, config key)} the run's signals must have
    check_run: Callable = lambda run: None  # raise EvalError when the run cannot be evaluated
    # (episodes, cfg) -> a Predictor that replays the ground truth under any conditioning, or None
    simulator: Optional[Callable] = None
    # (rollouts, episodes, run, args) -> the report's task_metrics (None: none); the rollouts hold every
    # episode's videos ("gt", "pred", "control", "base" with --base) when it is set
    task_metrics: Optional[Callable] = None
    # (out_dir, rollouts, episodes, fps, args) -> {output name: file} of the task's own files
    write_outputs: Optional[Callable] = None
    add_arguments: Callable = lambda parser: None  # the task's own options
    # the mp4 panels, and what the control is called in the report's texts
    panels: tuple = ("ground truth", "prediction", "prediction under the control")
    control_label: str = "control"
    # a whole evaluation of its own (args -> exit code) instead of the rollout runner
    run: Optional[Callable] = None
    # the fastest arguments that still write every output (the registry's contract test)
    quick_args: tuple = ("--episodes", "2", "--steps", "1", "--sampler-steps", "2", "--videos", "1")


EVALUATIONS: Registry[Evaluation] = Registry("evaluation", import_task_packages)


def register_evaluation(evaluation: Evaluation) -> Evaluation:
    return EVALUATIONS.register(evaluation.task, evaluation)


# ------------------------------------------------------------------------------------------------
# Command line options of the rollout runner
# ------------------------------------------------------------------------------------------------


def add_rollout_arguments(p: argparse.ArgumentParser, controls: Sequence[str]) -> None:
    g = p.add_argument_group("rollouts (every task)")
    g.add_argument("--episodes", type=int, default=8, help="episodes to evaluate (default 8; 0 = all). The verdict "
                   "needs >= 32 (fewer: inconclusive)")
    g.add_argument("--start", type=int, default=0, help="index of the first episode")
    g.add_argument("--split", default="val", choices=["val", "train"],
                   help="val: held-out data (<data.sample_dir>_val or data.val_path); train: the training data")
    g.add_argument("--steps", type=int, default=None,
                   help="rollout length in chunks (default: as many as the episodes allow)")
    g.add_argument("--control", "--shuffle", dest="control", default=controls[0], choices=list(controls),
                   help="how the control permutes the conditioning: across time (time) or between episodes (episodes)")
    g.add_argument("--control-seed", "--shuffle-seed", dest="control_seed", type=int, default=0)
    g.add_argument("--margin-db", "--threshold-db", dest="margin_db", type=float, default=None,
                   help="the verdict's margin on the PSNR gaps (default: the task's)")
    g.add_argument("--base", default=None, metavar="CKPT",
                   help="the base model (the checkpoint the run was post-trained from; default: the run's "
                   "trainer.init_from): its rollouts are the verdict's second reference")
    g.add_argument("--no-base", action="store_true", help="do not evaluate the base model (verdict: inconclusive)")
    g.add_argument("--batch-size", type=int, default=4, help="episodes rolled out together")
    g.add_argument("--videos", type=int, default=2, help="rollout mp4s to write (the first N episodes)")
    g.add_argument("--no-control", action="store_true", help="skip the simulator's ground-truth replay")
    g.add_argument("--no-ceiling", action="store_true",
                   help="skip the tokenizer ceiling (the ground truth through the tokenizer)")
    d = p.add_argument_group("diffusion")
    d.add_argument("--sampler-steps", type=int, default=35, help="EDM sampler steps per chunk")
    d.add_argument("--solver", default="heun", choices=["heun", "euler"])
    d.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    a = p.add_argument_group("autoregressive")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-k", type=int, default=None)
    a.add_argument("--top-p", type=float, default=None)


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def _mean(x, cap: bool = False) -> list:
    x = capped(x) if cap else np.asarray(x, dtype=np.float64)
    return x.mean(axis=0).tolist()


def _gap_block(m: dict, better: str, worse: str, seed: int) -> dict:
    """The paired per-episode PSNR / SSIM gaps ``better - worse`` (rollout names of ``m``)."""
    p = paired_gap(capped(m[f"psnr_{better}"]), capped(m[f"psnr_{worse}"]), seed=seed)
    s = paired_gap(m[f"ssim_{better}"], m[f"ssim_{worse}"], seed=seed)
    return {"psnr_gap_db": p["mean"], "psnr_gap_ci95": p["ci95"], "ssim_gap": s["mean"], "ssim_gap_ci95": s["ci95"],
            "psnr_gap_db_per_episode": p["per_episode"], "ssim_gap_per_episode": s["per_episode"],
            "episodes": p["episodes"], "_psnr": p}


def _reference(m: dict, true: str, control: Optional[str], seed: int) -> dict:
    """Mean PSNR (capped) / SSIM of a reference rollout (the simulator, the ceiling) under the true
    and, when given, the control conditioning, with the gap between them."""
    out = {"psnr_true": float(capped(m[f"psnr_{true}"]).mean()), "ssim_true": float(m[f"ssim_{true}"].mean())}
    if control is not None:
        gap = _gap_block(m, true, control, seed)
        out.update(psnr_control=float(capped(m[f"psnr_{control}"]).mean()), ssim_control=float(m[f"ssim_{control}"].mean()),
                   psnr_gap_db=gap["psnr_gap_db"], psnr_gap_ci95=gap["psnr_gap_ci95"], ssim_gap=gap["ssim_gap"])
    return out


def summarize(r, episodes, margin: float, seed: int = 0) -> dict:
    """The metric part of the report (see :mod:`nemo_ext.eval.report` for the keys)."""
    m = r.metrics
    code = next((n[: -len("_pred")] for n in m if n.endswith("_pred") and not n.startswith(("psnr", "ssim"))), None)
    per_step = {"frame": list(range(1, r.chunks * r.chunk + 1))}
    for name in ("psnr", "ssim"):
        for which, label in (("pred", ""), ("control", "_control"), ("base", "_base"),
                             ("simulator_control", "_simulator_control")):
            if f"{name}_{which}" in m:
                per_step[f"{name}{label}"] = _mean(m[f"{name}_{which}"], cap=name == "psnr")
    per_chunk = {"chunk": list(range(1, r.chunks + 1)), "last_frame": [(j + 1) * r.chunk for j in range(r.chunks)]}
    if code:
        per_chunk[code] = _mean(m[f"{code}_pred"])
        per_chunk[f"{code}_control"] = _mean(m[f"{code}_control"])
    means = {k: float(np.mean(v)) for k, v in per_step.items() if k != "frame"}
    means.update({k: float(np.mean(v)) for k, v in per_chunk.items() if k not in ("chunk", "last_frame")})
    sens = _gap_block(m, "pred", "control", seed)
    if code:
        sign = 1.0 if code == "token_accuracy" else -1.0  # higher accuracy / lower latent error is better
        gap = sign * (np.asarray(m[f"{code}_pred"]) - np.asarray(m[f"{code}_control"])).mean(axis=1)
        sens[f"{code}_gap"] = float(gap.mean())
        sens[f"{code}_gap_note"] = ("true minus control" if sign > 0 else "control minus true") + \
            ": positive = the true conditioning does better"
    vs_base = _gap_block(m, "pred", "base", seed) if "psnr_base" in m else None
    judged = verdict({"control": sens.pop("_psnr"), "base model": vs_base.pop("_psnr") if vs_base else None}, margin)
    control = None
    if "psnr_simulator" in m:
        control = {"what": "the task's simulator replaying each episode under the true and the control "
                           "conditioning vs the episode's decoded frames: the gap a perfect model would show",
                   **_reference(m, "simulator", "simulator_control", seed)}
    ceiling = None
    if "psnr_ceiling" in m:
        ceiling = {"what": "the episodes' frames through the run's tokenizer (encode -> decode, chunk by chunk from the "
                           "frame before it): the best rollout any model with this tokenizer can score; with the "
                           "simulator, its control replay through the tokenizer: the gap such a model would show",
                   **_reference(m, "ceiling", "ceiling_control" if "psnr_ceiling_control" in m else None, seed)}
    per_episode = []
    for row, ep in enumerate(episodes):
        item = {"key": ep.key, "index": ep.index, "num_frames": ep.num_frames,
                "psnr": float(capped(m["psnr_pred"][row]).mean()), "ssim": float(m["ssim_pred"][row].mean()),
                "psnr_control": float(capped(m["psnr_control"][row]).mean()),
                "ssim_control": float(m["ssim_control"][row].mean())}
        if "psnr_base" in m:
            item["psnr_base"] = float(capped(m["psnr_base"][row]).mean())
        if code:
            item[code] = float(m[f"{code}_pred"][row].mean())
            item[f"{code}_control"] = float(m[f"{code}_control"][row].mean())
        if control:
            item["psnr_simulator_control"] = float(capped(m["psnr_simulator_control"][row]).mean())
        per_episode.append(item)
    return {"per_step": per_step, "per_chunk": per_chunk, "means": means, "sensitivity": sens, "vs_base": vs_base,
            "verdict": judged, "ground_truth_control": control, "tokenizer_ceiling": ceiling, "episodes": per_episode}


def tokenizer_note(cfg) -> str:
    """What the pixel metrics can mean with the run's tokenizer."""
    tok = cfg.model.tokenizer
    if cfg.family == "diffusion":
        if getattr(tok, "kind", "vae") == "space_to_depth":
            return "space_to_depth (exactly invertible): pixel metrics are meaningful"
        if not tok.path:
            return "tiny random-weight VAE: pixel metrics are plumbing only (use model=dit_tiny_v2w_s2d or a real tokenizer)"
        return f"vae at {tok.path}"
    if tok.path:
        return f"Cosmos discrete tokenizer at {tok.path}"
    if tok.builtin_weights:
        return f"built-in FSQ tokenizer, trained weights {tok.builtin_weights}"
    return ("built-in FSQ tokenizer with seed-0 (untrained) weights: pixel metrics are plumbing only (train one: "
            "python -m nemo_ext.cli.prep train-tokenizer)")


def require_one_given_frame(run) -> None:
    """A rollout conditions each chunk on one frame: the model must take exactly one given frame."""
    m = run.cfg.model
    given = m.condition_frames if run.family == "ar" else (m.condition_latent_frames if m.video2world else 0)
    if given != 1:
        what = "model.condition_frames" if run.family == "ar" else "model.condition_latent_frames (model.video2world)"
        raise EvalError(f"the rollout conditions each chunk on one frame: {what} must be 1, the run has {given}")


def output_dir(run, args) -> Path:
    if args.out:
        out = Path(args.out)
    else:
        base = run.run_dir / "eval" if run.run_dir is not None else Path("eval")
        step = f"step{run.step}" if run.step is not None else run.ckpt.name
        out = base / (args.name or f"{step}_{getattr(args, 'split', 'val')}_{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def base_checkpoint(run, args) -> Optional[str]:
    """``--base``, else the run's ``trainer.init_from`` (None with ``--no-base`` or neither)."""
    if getattr(args, "no_base", False):
        return None
    return args.base or run.trained_from or None


# ------------------------------------------------------------------------------------------------
# The rollout runner
# ------------------------------------------------------------------------------------------------


def run_rollout_eval(spec: Evaluation, args) -> int:
    """A task's rollout evaluation (called inside the eval CLI's error handling)."""
    from nemo_ext.eval import generation as g
    from nemo_ext.eval.report import SCHEMA, plot_metrics, write_videos
    from nemo_ext.eval.rollout import (base_metrics, code_metric, evaluate_rollouts, predictor_of,
                                       teacher_forced_losses, tokenizer_roundtrip)
    from nemo_ext.tasks import get_task

    start = time.perf_counter()
    with g.generation_world(args.device, seed=args.seed):
        t0 = time.perf_counter()
        run = g.load_run(args.ckpt, weights=args.weights, device=args.device, overrides=args.overrides,
                         recipe=args.recipe, family=args.family, model=args.model, weights_from=args.weights_from)
        load_s = time.perf_counter() - t0
        cfg = run.cfg
        if cfg.task.name != spec.task:
            raise EvalError(f"{run.ckpt} is a {cfg.task.name!r} task run, not a {spec.task} one")
        spec.check_run(run)
        task = get_task(spec.task)
        aligns = {s.batch_key: s.align for s in task.signals}
        t0 = time.perf_counter()
        episodes, source = episodes_of_run(cfg, task.signals, spec.dims(cfg), args.split, num=args.episodes or None,
                                           start=args.start)
        read_s = time.perf_counter() - t0
        fps = cfg.data.fps or episodes[0].fps or g.data_fps(cfg)
        predictor, sampling = predictor_of(run, args, fps)
        simulator = None
        if not args.no_control and spec.simulator is not None:
            simulator = spec.simulator(episodes, cfg)
        chunk = spec.chunk(cfg)
        result = evaluate_rollouts(predictor, episodes, chunk, aligns, spec.signal, chunks=args.steps,
                                   control=args.control, control_seed=args.control_seed, batch_size=args.batch_size,
                                   code_fn=code_metric(run), simulator=simulator,
                                   roundtrip=None if args.no_ceiling else tokenizer_roundtrip(run), videos=args.videos,
                                   keep=len(episodes) if spec.task_metrics else 0, progress=not args.no_progress)
        t0 = time.perf_counter()
        teacher = teacher_forced_losses(run, episodes, chunk, aligns, spec.signal, result.conditioning["control"],
                                        chunks=result.chunks, seed=args.seed)
        teacher_s = time.perf_counter() - t0
        base_ckpt = base_checkpoint(run, args)
        base_s = 0.0
        if base_ckpt:  # the base model's weights in the run's model, rolled out with the true conditioning
            t0 = time.perf_counter()
            base_run = g.load_run(args.ckpt, weights=args.weights, device=args.device, overrides=args.overrides,
                                  recipe=args.recipe, family=args.family, model=args.model, weights_from=base_ckpt)
            result.metrics.update(base_metrics(predictor_of(base_run, args, fps)[0], episodes, aligns, chunk,
                                               result.chunks, args.batch_size, result.videos))
            base_s = time.perf_counter() - t0
        extra = spec.task_metrics(result, episodes, run, args) if spec.task_metrics else None
    margin = spec.margin_db if args.margin_db is None else args.margin_db
    summary = summarize(result, episodes, margin, seed=args.control_seed)
    summary["sensitivity"]["teacher_forced"] = teacher

    out_dir = output_dir(run, args)
    t0 = time.perf_counter()
    title = (f"{cfg.model.name} step {run.step} ({run.weights}), {len(episodes)} {args.split} episode(s), "
             f"{result.chunks} x {result.chunk} frames; verdict: {summary['verdict']['verdict']}")
    plot = plot_metrics(out_dir / "metrics.png", summary["per_step"], result.chunk, title, spec.control_label)
    videos = write_videos(out_dir, {i: v for i, v in list(result.videos.items())[: args.videos]}, episodes, fps or 8.0)
    if spec.write_outputs is not None:  # the task's own files (e.g. instruction's review page)
        extra_outputs = spec.write_outputs(out_dir, result, episodes, fps or 8.0, args)
    else:
        extra_outputs = {}
    write_s = time.perf_counter() - t0
    stats = {"model_calls": predictor.model_calls} if hasattr(predictor, "model_calls") else \
        {"generated_tokens": predictor.new_tokens}
    report = {
        "schema": SCHEMA,
        "task": spec.task,
        "family": run.family,
        "model": cfg.model.name,
        "checkpoint": str(run.ckpt),
        "weights_from": args.weights_from,
        "base": base_ckpt,
        "run_dir": str(run.run_dir) if run.run_dir else None,
        "step": run.step,
        "weights": run.weights,
        "tokenizer": tokenizer_note(cfg),
        "config": {
            "split": args.split, "data": source, "episodes": len(episodes), "start": args.start,
            "chunk": result.chunk, "chunks": result.chunks, "rollout_frames": result.chunks * result.chunk,
            "signal": spec.signal, "control": args.control, "control_seed": args.control_seed, "seed": args.seed,
            "margin_db": margin, "psnr_cap_db": PSNR_CAP, "batch_size": args.batch_size,
            "height": cfg.data.height, "width": cfg.data.width, "fps": fps, "overrides": list(args.overrides),
            **sampling,
        },
        **summary,
        "task_metrics": extra,
        "timings": {"load_s": load_s, "read_episodes_s": read_s, "teacher_forced_s": teacher_s, "base_s": base_s,
                    **{f"{k}_s": v for k, v in result.seconds.items()}, "write_s": write_s,
                    "total_s": time.perf_counter() - start, "device": str(run.device), **stats},
        "outputs": {"metrics_png": plot.name, "videos": videos, "video_panels": list(spec.panels), **extra_outputs},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print_summary(report, out_dir, spec)
    return 0


def print_summary(report: dict, out_dir: Path, spec: Evaluation) -> None:
    means, sens, c = report["means"], report["sensitivity"], report["config"]
    print(f"{report['family']} {report['model']} ({report['weights']} weights of {report['checkpoint']}); "
          f"tokenizer: {report['tokenizer']}")
    print(f"rollout: {c['episodes']} {c['split']} episode(s), {c['chunks']} chunk(s) of {c['chunk']} frames "
          f"({c['rollout_frames']} frames); control: {c['signal']} permuted ({c['control']}, seed {c['control_seed']})")
    code = "latent_l2" if "latent_l2" in means else "token_accuracy"
    print(f"true {c['signal']}:     PSNR {means['psnr']:.3f} dB, SSIM {means['ssim']:.4f}, {code} {means[code]:.4f}")
    print(f"control {c['signal']}:  PSNR {means['psnr_control']:.3f} dB, SSIM {means['ssim_control']:.4f}, "
          f"{code} {means[code + '_control']:.4f}")
    ci = sens["psnr_gap_ci95"]
    print(f"sensitivity to the {c['signal']}: PSNR gap {sens['psnr_gap_db']:.3f} dB"
          + (f" (95% CI [{ci[0]:.3f}, {ci[1]:.3f}])" if ci else "") + f", SSIM gap {sens['ssim_gap']:.4f}")
    tf = sens["teacher_forced"]
    ci = tf["loss_gap_ci95"]
    print(f"teacher-forced (training loss on ground-truth clips): {tf['loss_true']:.4f} true, {tf['loss_control']:.4f} "
          f"control: gap {tf['loss_gap']:+.4f}" + (f" (95% CI [{ci[0]:.4f}, {ci[1]:.4f}])" if ci else ""))
    if report["vs_base"]:
        b = report["vs_base"]
        print(f"vs the base model ({report['base']}): PSNR gap {b['psnr_gap_db']:.3f} dB")
    ctrl = report.get("ground_truth_control")
    if ctrl:
        print(f"ground truth (simulator): PSNR {ctrl['psnr_true']:.3f} dB under the true {c['signal']}, "
              f"{ctrl['psnr_control']:.3f} dB under the control (a perfect model's gap: {ctrl['psnr_gap_db']:.3f} dB)")
    ceil = report.get("tokenizer_ceiling")
    if ceil:
        print(f"tokenizer ceiling (ground truth through the tokenizer): PSNR {ceil['psnr_true']:.3f} dB"
              + (f", simulator's control replay {ceil['psnr_control']:.3f} dB (gap {ceil['psnr_gap_db']:.3f} dB)"
                 if "psnr_gap_db" in ceil else ""))
    if report.get("task_metrics") and report["task_metrics"].get("headline"):
        print(report["task_metrics"]["headline"])
    v = report["verdict"]
    print(f"verdict: {v['verdict']} ({v['explanation']})")
    t = report["timings"]
    print(f"timing: load {t['load_s']:.2f} s, rollouts {t['rollout_true_s'] + t['rollout_control_s']:.2f} s, "
          f"total {t['total_s']:.2f} s (device {t['device']})")
    print(f"wrote {out_dir.resolve()}/report.json, metrics.png"
          + (", " + ", ".join(report["outputs"]["videos"]) if report["outputs"]["videos"] else ""))
