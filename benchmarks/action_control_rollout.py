"""Does action_control post-training teach a model the actions? Post-train a tiny model of one
family on the procedural action world for a fixed budget and compare rollouts (GPU; runs on CPU
with small budgets too).

    python benchmarks/action_control_rollout.py --family diffusion --videos 1024 --base-steps 1000 --post-steps 2500 \
        --batch 64 -- model.hidden_size=384 model.num_layers=8 model.num_attention_heads=6   # learned: +4.3 dB (H200)
    python benchmarks/action_control_rollout.py --family ar --tokenizer-steps 3000 --base-steps 3000 --post-steps 3000

The protocol (every stage is the user-facing CLI, in one work directory):

1. ``world``: the action world (``nemo_ext/tasks/action_control/world.py``; ``--videos``
   training episodes, a held-out world of ``--val-videos`` at ``<world>_val``).
2. AR only, ``tokenizer``: the built-in FSQ tokenizer trained on that world
   (``nemo_ext.cli.prep train-tokenizer``): pixel metrics need a decodable tokenizer. The diffusion
   family uses ``dit_tiny_v2w_s2d`` (exactly invertible space-to-depth tokenizer, no training).
3. ``base``: the base model = the same network trained on the world's videos *without* actions
   (``recipe=general``: text-conditioned Video2World on the clips' captions) for ``--base-steps``.
4. ``post``: action_control post-training from the base (``trainer.init_from``; the action
   conditioner is new and zero-initialized; ``task.instruction=true`` keeps the caption text the
   base was trained with) for ``--post-steps``.
5. ``eval``: ``nemo_ext.cli.eval`` rollouts over ``--episodes`` held-out episodes from the first
   frame, whole action sequences: the post-trained model with the true actions, with the actions
   permuted in time (one evaluation) and swapped between episodes (another), and the base model
   (``--base``: the post-trained run's network with the base weights; for the DiT its
   zero-initialized action path makes it exactly the base model, for AR the action tokens only
   dilute cross-attention, the same under every action sequence).

The result file ``benchmarks/results/action_control_<family>_<hw>_<date>.json`` holds each stage's
command and seconds, both runs' final losses, and per evaluation the mean PSNR / SSIM / latent L2
or token accuracy with true and permuted actions and the base model's, the paired gaps with their
bootstrap intervals, the shared verdict (learned when the gaps over the control and over the base,
on >= 32 episodes, have 95% intervals above 0.25 dB), the teacher-forced training loss on
ground-truth clips with true vs permuted actions (does the model use the actions at all, sampling
aside), and the simulator's ground-truth control (the gap a perfect model shows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_throughput import _commit, _hardware  # noqa: E402  (one definition of the results header)

MODELS = {"diffusion": "dit_tiny_v2w_s2d", "ar": "ar_tiny_v2w"}


def _run(cmd: list[str], log: Path) -> float:
    """Run a stage, its output into ``log`` (the tail is printed on failure); returns seconds."""
    print("running:", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = log.read_text()[-6000:]
        raise SystemExit(f"stage failed ({proc.returncode}) after {seconds:.0f} s: {' '.join(cmd)}\n{tail}")
    print(f"  done in {seconds:.1f} s", flush=True)
    return seconds


def _last_metrics(run_dir: Path) -> dict:
    """The last logged training row (NeMo may split a run into run_<n>/ segments)."""
    from nemo_ext.launch.sweep import run_metrics

    rows = run_metrics(run_dir)
    return rows[-1] if rows else {}


def _eval_summary(report: dict) -> dict:
    """The numbers of one eval report (the evaluation core's schema, nemo_ext/eval/report.py)."""
    means, sens = report["means"], report["sensitivity"]
    code = "latent_l2" if "latent_l2" in means else "token_accuracy"
    out = {
        "psnr_db": means["psnr"], "psnr_control_db": means["psnr_control"],
        "ssim": means["ssim"], "ssim_control": means["ssim_control"],
        code: means[code], f"{code}_control": means[code + "_control"],
        "psnr_gap_db": sens["psnr_gap_db"], "psnr_gap_ci95": sens["psnr_gap_ci95"], "ssim_gap": sens["ssim_gap"],
        "psnr_base_db": means.get("psnr_base"), "vs_base": {k: v for k, v in (report["vs_base"] or {}).items()
                                                           if not k.endswith("per_episode")} or None,
        "verdict": report["verdict"]["verdict"], "verdict_explanation": report["verdict"]["explanation"],
        "control": report["config"]["control"], "episodes": report["config"]["episodes"],
        "rollout_frames": report["config"]["rollout_frames"], "checkpoint": report["checkpoint"],
        "base": report.get("base"), "eval_seconds": report["timings"]["total_s"],
        "teacher_forced": {k: v for k, v in sens["teacher_forced"].items() if k != "per_episode_gap"},
    }
    for key in ("ground_truth_control", "tokenizer_ceiling"):
        if report.get(key):
            out[key] = {k: report[key][k] for k in ("psnr_true", "psnr_control", "psnr_gap_db") if k in report[key]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="diffusion", choices=sorted(MODELS))
    p.add_argument("--model", default=None, help="model preset (default: dit_tiny_v2w_s2d / ar_tiny_v2w)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_action_control"),
                   help="work directory (worlds, runs, evals). Every stage resumes: run the script again with the "
                   "same arguments after an interruption and finished stages are kept")
    p.add_argument("--videos", type=int, default=512, help="training episodes of the action world")
    p.add_argument("--val-videos", type=int, default=32, help="held-out episodes")
    p.add_argument("--episodes", type=int, default=32, help="held-out episodes rolled out (the verdict needs >= 32)")
    p.add_argument("--tokenizer-steps", type=int, default=3000, help="AR: FSQ tokenizer training steps")
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--post-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32, help="global batch (one micro-batch)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--sampler-steps", type=int, default=20, help="diffusion: EDM sampler steps per chunk")
    p.add_argument("--eval-batch", type=int, default=4, help="episodes rolled out together (eval --batch-size)")
    p.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument of every evaluation (repeatable), e.g. --eval-arg=--temperature=0.7")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--name", default=None, help="result file stem (default: action_control_<family>_<hw>_<date>)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    p.add_argument("--post-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the post-training only (repeatable), e.g. model.edm.p_mean=0.0: "
                   "noise levels where the actions decide the frame (high sigma) trained more often")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both trainings (e.g. model.num_layers=8)")
    args = p.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    family, model = args.family, args.model or MODELS[args.family]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    py = sys.executable
    stages: dict = {}
    data = [f"data.sample_dir={world}", f"data.sample_num_videos={args.videos}",
            f"data.sample_val_num_videos={args.val_videos}", "data.sample_num_frames=33", "data.num_frames=9",
            f"data.global_batch_size={args.batch}", f"data.micro_batch_size={args.batch}",
            f"data.num_workers={args.workers}", "data.backend=pyav", "data.sample_variant=action"]
    common = ["--family", family, f"model={model}", f"trainer.device={device}", f"runs_dir={work / 'runs'}",
              "trainer.progress_bar=false", "trainer.log_every_n_steps=50", "trainer.val_every_n_steps=500",
              *data, *args.overrides]

    # 1. the worlds (the trainer would make them too; the tokenizer needs them first)
    from nemo_ext.worlds import generate
    from nemo_ext.training.data import HELD_OUT_SAMPLE_SEED

    start = time.perf_counter()
    workers = max(1, min(16, (os.cpu_count() or 1) - 1))
    generate(world, "action", args.videos, 33, 64, 64, seed=0, workers=workers, progress=False)
    generate(Path(str(world) + "_val"), "action", args.val_videos, 33, 64, 64, seed=HELD_OUT_SAMPLE_SEED,
             workers=workers, progress=False)
    stages["world"] = {"seconds": time.perf_counter() - start, "videos": args.videos, "val_videos": args.val_videos}

    # 2. AR: a decodable tokenizer
    if family == "ar":
        weights = work / "fsq_action.safetensors"
        cmd = [py, "-m", "nemo_ext.cli.prep", "train-tokenizer", "--recipe", "action_control", "--family", "ar",
               "--out", str(weights), "--data", str(world), "--val-data", str(world) + "_val",
               "--steps", str(args.tokenizer_steps), "--batch-size", str(args.batch), "--no-progress",
               f"model={model}", "data.num_frames=9",
               # the tokenizer's own overrides must shape the trained weights too
               *[o for o in args.overrides if o.startswith("model.tokenizer.")]]
        done = weights.is_file()  # an earlier call of this script trained it (the stages resume)
        stages["tokenizer"] = {"command": " ".join(cmd), "seconds": 0.0 if done else _run(cmd, work / "tokenizer.log")}
        stages["tokenizer"]["log_tail"] = (work / "tokenizer.log").read_text().strip().splitlines()[-3:]
        common.append(f"model.tokenizer.builtin_weights={weights}")

    # 3. the base model: the world's videos without actions
    base_run = work / "runs" / "general" / f"{family}_{model}" / "base"
    cmd = [py, "-m", "nemo_ext.cli.train", "--recipe", "general", *common, "run_name=base",
           f"trainer.max_steps={args.base_steps}", "trainer.checkpoint_every_n_steps=500"]
    stages["base"] = {"command": " ".join(cmd), "seconds": _run(cmd, work / "base.log"),
                      "last": _last_metrics(base_run)}

    # 4. action_control post-training from it
    post_run = work / "runs" / "action_control" / f"{family}_{model}" / "post"
    cmd = [py, "-m", "nemo_ext.cli.train", "--recipe", "action_control", *common, "run_name=post",
           "task.instruction=true", f"trainer.init_from={base_run}", f"trainer.max_steps={args.post_steps}",
           "trainer.checkpoint_every_n_steps=500", *args.post_set]
    stages["post"] = {"command": " ".join(cmd), "seconds": _run(cmd, work / "post.log"),
                      "last": _last_metrics(post_run)}

    # 5. rollouts
    evals = {}
    extra = ["--sampler-steps", str(args.sampler_steps)] if family == "diffusion" else []
    # both controls, each with the base model as the verdict's second reference (the shared rule)
    plans = {"post_time_shuffle": ["--control", "time"], "post_episode_swap": ["--control", "episodes"]}
    for name, flags in plans.items():
        out_dir = work / "eval" / name
        cmd = [py, "-m", "nemo_ext.cli.eval", "--ckpt", str(post_run), "--episodes", str(args.episodes),
               "--base", str(base_run), "--out", str(out_dir), "--no-progress", "--videos", "2",
               "--batch-size", str(args.eval_batch), *extra, *args.eval_arg, *flags]
        seconds = _run(cmd, work / f"eval_{name}.log")
        report = json.loads((out_dir / "report.json").read_text())
        evals[name] = {"command": " ".join(cmd), "seconds": seconds, **_eval_summary(report)}

    post, swap = evals["post_time_shuffle"], evals["post_episode_swap"]
    headline = {
        "psnr_post_true_db": post["psnr_db"], "psnr_post_time_shuffled_db": post["psnr_control_db"],
        "psnr_post_episode_swapped_db": swap["psnr_control_db"], "psnr_base_db": post["psnr_base_db"],
        "gap_vs_time_shuffled_db": post["psnr_gap_db"], "gap_vs_episode_swapped_db": swap["psnr_gap_db"],
        "gain_over_base_db": post["psnr_db"] - post["psnr_base_db"],
        "verdict_time_shuffle": post["verdict"], "verdict_episode_swap": swap["verdict"],
        # the training loss on ground-truth clips, true vs episode-swapped actions (no sampling involved)
        "teacher_forced_loss_true": swap["teacher_forced"]["loss_true"],
        "teacher_forced_loss_swapped": swap["teacher_forced"]["loss_control"],
    }
    if "tokenizer_ceiling" in swap:  # a perfect model with this tokenizer
        headline["psnr_tokenizer_ceiling_db"] = swap["tokenizer_ceiling"]["psnr_true"]
        headline["psnr_tokenizer_ceiling_episode_swapped_db"] = swap["tokenizer_ceiling"].get("psnr_control")
    hw = _hardware()
    hw_tag = (hw.get("gpu") or "cpu").replace(" ", "-").replace("/", "-")
    date = datetime.date.today().isoformat()
    result = {
        "what": f"action_control post-training, {family} ({model}): rollout PSNR with true vs shuffled actions vs the base",
        "date": date, "commit": args.commit or _commit(), "hardware": hw, "command": " ".join([py, *sys.argv]),
        "budget": {"tokenizer_steps": args.tokenizer_steps if family == "ar" else None, "base_steps": args.base_steps,
                   "post_steps": args.post_steps, "global_batch": args.batch},
        "headline": headline, "evaluations": evals, "stages": stages,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or f'action_control_{family}_{hw_tag}_{date}'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(headline, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
