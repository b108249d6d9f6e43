"""Does post-training teach a model its task's conditioning? Post-train a tiny model of one family on
the task's procedural world for a fixed budget and compare rollouts (GPU; runs on CPU with small
budgets too). One protocol for every task with a sample world and an evaluation; what differs per
task (how its base model is trained, which controls it has) is the :data:`PROTOCOLS` table below.

    python benchmarks/task_rollout.py --task action_control --family diffusion --videos 1024 --base-steps 1000 \
        --post-steps 2500 --batch 64 -- model.hidden_size=384 model.num_layers=8 model.num_attention_heads=6
    python benchmarks/task_rollout.py --task action_control --family ar --tokenizer-steps 3000 --base-steps 3000
    python benchmarks/task_rollout.py --task instruction --family diffusion --videos 2048 --batch 64
    python benchmarks/task_rollout.py --task instruction --family ar --videos 2048 --batch 64

The protocol (every stage is the user-facing CLI, in one work directory):

1. ``world``: the task's world (its ``TaskSpec.world``; ``--videos`` training episodes, a held-out
   world of ``--val-videos`` at ``<world>_val``, drawn as the trainer draws it: for instruction that
   is the split whose every second episode commands an unseen colour-direction pair).
2. AR only, ``tokenizer``: the built-in FSQ tokenizer trained on that world
   (``nemo_ext.cli.prep train-tokenizer``): pixel metrics need a decodable tokenizer. The diffusion
   family uses ``dit_tiny_v2w_s2d`` (exactly invertible space-to-depth tokenizer, no training).
3. ``base``: the base model = the same network trained on the world's videos *without* the task's
   conditioning (``recipe=general``): action_control's base is text-conditioned Video2World on the
   clips' captions; instruction's captions *are* the instructions, so its base is trained on the
   empty prompt only (``task.caption_dropout=1.0``): it learns the world's motion, not which object
   the instruction names.
4. ``post``: the task's post-training from the base (``trainer.init_from``) for ``--post-steps``.
5. ``eval``: ``nemo_ext.cli.eval`` rollouts over ``--episodes`` held-out episodes from the first
   frame: the post-trained model with the true conditioning, with each control of the task's
   evaluation (action_control: actions permuted in time, and swapped between episodes; instruction:
   another episode's instruction), and the base model (``--base``: the post-trained run's network with
   the base weights).

The result file ``benchmarks/results/<task>_<family>_<hw>_<date>.json`` holds each stage's command
and seconds, both runs' final losses, and per evaluation the means of PSNR / SSIM / latent L2 or
token accuracy with the true and the control conditioning and the base model's, the paired gaps with
their bootstrap intervals, the shared verdict (learned when the gaps over the control and over the
base, on >= 32 episodes, have 95% intervals above the task's margin), the teacher-forced loss with
true vs control conditioning (sampling aside), the ground-truth control (a perfect model's gap) and
the task's own metrics (instruction: success rates with their own verdict, the confusion table).
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

# What differs per task. frames: (world episode length, training clip length); base / post: Hydra
# overrides of the base training (recipe=general) and of the task's post-training; models: the
# default preset per family (the recipe's own where it learned); evals: name -> eval flags.
PROTOCOLS = {
    "action_control": {
        "frames": (33, 9),
        "models": {"diffusion": "dit_tiny_v2w_s2d", "ar": "ar_tiny_v2w"},
        "base": [], "post": ["task.instruction=true"],  # keeps the caption text the base was trained with
        "evals": {"post_time_shuffle": ["--control", "time"], "post_episode_swap": ["--control", "episodes"]},
    },
    "instruction": {
        "frames": (9, 9),
        "models": {"diffusion": "dit_tiny_v2w_s2d", "ar": "ar_tiny_v2w_dv1x8x8"},
        "base": ["task.caption_dropout=1.0"], "post": [],
        "evals": {"post_episode_swap": ["--control", "episodes"]},
    },
    "camera_control": {
        "frames": (17, 9),
        "models": {"diffusion": "dit_tiny_v2w_s2d", "ar": "ar_tiny_v2w_dv1x8x8"},
        # the base: the room videos with their (path-free) captions; the post-training adds the poses
        "base": [], "post": [],
        "evals": {"post_episode_swap": ["--control", "episodes"], "post_reverse": ["--control", "reverse"]},
    },
}


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


def _tail(log: Path, lines: int = 6) -> list[str]:
    """The last lines of a stage's log that say something (the result file outlives the machine)."""
    kept = [x for x in log.read_text(errors="replace").splitlines() if x.strip() and "warn" not in x.lower()]
    return kept[-lines:]


def _last_metrics(run_dir: Path) -> dict:
    """The last logged training row and the last validation row (NeMo may split a run into run_<n>/
    segments): a held-out loss that rises while the training loss falls is overfitting, one that rises
    with it is divergence (the instruction AR run of 12-02 could not tell them apart: only the last row
    was kept)."""
    from nemo_ext.launch.sweep import run_metrics

    rows = run_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    first_val = val[0] if val else None
    return {"train": train[-1] if train else None, "val": val[-1] if val else None, "first_val": first_val}


def _without_per_episode(value):
    if isinstance(value, dict):
        return {k: _without_per_episode(v) for k, v in value.items() if "per_episode" not in k}
    return value


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
    tm = report.get("task_metrics")
    if tm:  # the task's own numbers (instruction: success rates; camera_control: pose errors), per-episode lists left out
        out["task_metrics"] = _without_per_episode(tm)
    for key in ("ground_truth_control", "tokenizer_ceiling"):
        if report.get(key):
            out[key] = {k: report[key][k] for k in ("psnr_true", "psnr_control", "psnr_gap_db") if k in report[key]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="action_control", choices=sorted(PROTOCOLS))
    p.add_argument("--family", default="diffusion", choices=["diffusion", "ar"])
    p.add_argument("--model", default=None, help="model preset (default: the task's, PROTOCOLS)")
    p.add_argument("--work", default=None,
                   help="work directory (worlds, runs, evals; default runs/bench_<task>_<family>). Every stage "
                   "resumes: run the script again with the same arguments after an interruption and finished "
                   "stages are kept (a training resumes from its last checkpoint)")
    p.add_argument("--videos", type=int, default=512, help="training episodes of the world")
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
    p.add_argument("--name", default=None, help="result file stem (default: <task>_<family>_<hw>_<date>)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    p.add_argument("--post-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the post-training only (repeatable), e.g. model.edm.p_mean=0.0: "
                   "noise levels where the conditioning decides the frame (high sigma) trained more often")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both trainings (e.g. model.num_layers=8)")
    args = p.parse_args(argv)

    import torch

    from nemo_ext.tasks.base import get_task

    proto, spec = PROTOCOLS[args.task], get_task(args.task)
    if args.family not in spec.families:
        raise SystemExit(f"{args.task} has no {args.family} family (it has {', '.join(spec.families)})")
    device = args.device if args.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    family, model = args.family, args.model or proto["models"][args.family]
    work = Path(args.work or REPO / "runs" / f"bench_{args.task}_{family}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    episode_frames, clip_frames = proto["frames"]
    py = sys.executable
    stages: dict = {}
    data = [f"data.sample_dir={world}", f"data.sample_num_videos={args.videos}",
            f"data.sample_val_num_videos={args.val_videos}", f"data.sample_num_frames={episode_frames}",
            f"data.num_frames={clip_frames}", f"data.global_batch_size={args.batch}",
            f"data.micro_batch_size={args.batch}", f"data.num_workers={args.workers}", "data.backend=pyav",
            f"data.sample_variant={spec.world}"]
    common = ["--family", family, f"model={model}", f"trainer.device={device}", f"runs_dir={work / 'runs'}",
              "trainer.progress_bar=false", "trainer.log_every_n_steps=50", "trainer.val_every_n_steps=500",
              *data, *args.overrides]

    # 1. the worlds, as the trainer draws them (it would make them too; the tokenizer needs them first)
    from nemo_ext.training.data import HELD_OUT_SAMPLE_SEED
    from nemo_ext.worlds import generate

    start = time.perf_counter()
    workers = max(1, min(16, (os.cpu_count() or 1) - 1))
    generate(world, spec.world, args.videos, episode_frames, 64, 64, seed=0, workers=workers, progress=False)
    generate(Path(str(world) + "_val"), spec.world, args.val_videos, episode_frames, 64, 64,
             seed=HELD_OUT_SAMPLE_SEED, workers=workers, progress=False, held_out=True)
    stages["world"] = {"seconds": time.perf_counter() - start, "videos": args.videos, "val_videos": args.val_videos}

    # 2. AR: a decodable tokenizer
    if family == "ar":
        weights = work / f"fsq_{args.task}.safetensors"
        cmd = [py, "-m", "nemo_ext.cli.prep", "train-tokenizer", "--recipe", args.task, "--family", "ar",
               "--out", str(weights), "--data", str(world), "--val-data", str(world) + "_val",
               "--steps", str(args.tokenizer_steps), "--batch-size", str(args.batch), "--no-progress",
               f"model={model}", f"data.num_frames={clip_frames}",
               # the tokenizer's own overrides must shape the trained weights too
               *[o for o in args.overrides if o.startswith("model.tokenizer.")]]
        done = weights.is_file()  # an earlier call of this script trained it (the stages resume)
        stages["tokenizer"] = {"command": " ".join(cmd), "seconds": 0.0 if done else _run(cmd, work / "tokenizer.log")}
        stages["tokenizer"]["log_tail"] = (work / "tokenizer.log").read_text().strip().splitlines()[-3:]
        common.append(f"model.tokenizer.builtin_weights={weights}")

    # 3. the base model: the world's videos without the task's conditioning
    base_run = work / "runs" / "general" / f"{family}_{model}" / "base"
    cmd = [py, "-m", "nemo_ext.cli.train", "--recipe", "general", *common, "run_name=base", *proto["base"],
           f"trainer.max_steps={args.base_steps}", "trainer.checkpoint_every_n_steps=500"]
    stages["base"] = {"command": " ".join(cmd), "seconds": _run(cmd, work / "base.log"),
                      "last": _last_metrics(base_run), "log_tail": _tail(work / "base.log")}

    # 4. the task's post-training from it
    post_run = work / "runs" / args.task / f"{family}_{model}" / "post"
    cmd = [py, "-m", "nemo_ext.cli.train", "--recipe", args.task, *common, "run_name=post", *proto["post"],
           f"trainer.init_from={base_run}", f"trainer.max_steps={args.post_steps}",
           "trainer.checkpoint_every_n_steps=500", *args.post_set]
    stages["post"] = {"command": " ".join(cmd), "seconds": _run(cmd, work / "post.log"),
                      "last": _last_metrics(post_run), "log_tail": _tail(work / "post.log")}

    # 5. rollouts: each control of the task's evaluation, with the base model as the verdict's second reference
    evals = {}
    extra = ["--sampler-steps", str(args.sampler_steps)] if family == "diffusion" else []
    for name, flags in proto["evals"].items():
        out_dir = work / "eval" / name
        cmd = [py, "-m", "nemo_ext.cli.eval", "--ckpt", str(post_run), "--episodes", str(args.episodes),
               "--base", str(base_run), "--out", str(out_dir), "--no-progress", "--videos", "2",
               "--batch-size", str(args.eval_batch), *extra, *args.eval_arg, *flags]
        seconds = _run(cmd, work / f"eval_{name}.log")
        report = json.loads((out_dir / "report.json").read_text())
        evals[name] = {"command": " ".join(cmd), "seconds": seconds, **_eval_summary(report)}

    headline = _headline(args.task, evals)
    hw = _hardware()
    hw_tag = (hw.get("gpu") or "cpu").replace(" ", "-").replace("/", "-")
    date = datetime.date.today().isoformat()
    result = {
        "benchmark": "task_rollout", "task": args.task, "family": family, "model": model,
        "what": f"{args.task} post-training, {family} ({model}): rollouts with the true vs control conditioning "
                "vs the base",
        "date": date, "commit": args.commit or _commit(), "hardware": hw, "command": " ".join([py, *sys.argv]),
        "budget": {"tokenizer_steps": args.tokenizer_steps if family == "ar" else None, "base_steps": args.base_steps,
                   "post_steps": args.post_steps, "global_batch": args.batch, "videos": args.videos},
        "headline": headline, "evaluations": evals, "stages": stages,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or f'{args.task}_{family}_{hw_tag}_{date}'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(headline, indent=2))
    print(f"wrote {path}")
    return 0


def _headline(task: str, evals: dict) -> dict:
    """The few numbers a reader wants first; every evaluation's verdict."""
    swap = evals["post_episode_swap"]
    head = {
        "psnr_post_true_db": swap["psnr_db"], "psnr_post_episode_swapped_db": swap["psnr_control_db"],
        "psnr_base_db": swap["psnr_base_db"], "gap_vs_episode_swapped_db": swap["psnr_gap_db"],
        "gain_over_base_db": (swap["psnr_db"] - swap["psnr_base_db"]) if swap["psnr_base_db"] is not None else None,
        "verdict_episode_swap": swap["verdict"],
        # the training loss on ground-truth clips, true vs episode-swapped conditioning (no sampling involved)
        "teacher_forced_loss_true": swap["teacher_forced"]["loss_true"],
        "teacher_forced_loss_swapped": swap["teacher_forced"]["loss_control"],
    }
    if "post_time_shuffle" in evals:
        t = evals["post_time_shuffle"]
        head.update(psnr_post_time_shuffled_db=t["psnr_control_db"], gap_vs_time_shuffled_db=t["psnr_gap_db"],
                    verdict_time_shuffle=t["verdict"])
    if "tokenizer_ceiling" in swap:  # a perfect model with this tokenizer
        head["psnr_tokenizer_ceiling_db"] = swap["tokenizer_ceiling"]["psnr_true"]
        head["psnr_tokenizer_ceiling_episode_swapped_db"] = swap["tokenizer_ceiling"].get("psnr_control")
    if "post_reverse" in evals:
        r = evals["post_reverse"]
        head.update(psnr_post_reversed_db=r["psnr_control_db"], gap_vs_reversed_db=r["psnr_gap_db"],
                    verdict_reverse=r["verdict"])
    tm = swap.get("task_metrics") or {}
    if "pose_errors" in tm:
        errs = tm["pose_errors"]
        head.update(rot_err_deg_true=errs["pred"]["rot_err_deg_mean"], rot_err_deg_swapped=errs["control"]["rot_err_deg_mean"],
                    rot_err_deg_base=(errs.get("base") or {}).get("rot_err_deg_mean"),
                    rot_err_deg_floor=errs["ground_truth"]["rot_err_deg_mean"],
                    trans_err_rel_true=errs["pred"]["trans_err_rel"], trans_err_rel_swapped=errs["control"]["trans_err_rel"],
                    registered_true=errs["pred"]["registered"], pose_verdict=tm["pose_verdict"]["verdict"])
    if "success_rate" in tm:
        rates = tm["success_rate"]
        head.update(success_true=rates["pred"]["success"], success_swapped=rates["control"]["success"],
                    success_base=(rates.get("base") or {}).get("success"),
                    success_ground_truth=rates["ground_truth"]["success"],
                    success_held_out_pairs=rates["pred"]["held_out_pairs"],
                    success_verdict=tm["success_verdict"]["verdict"])
    return head


if __name__ == "__main__":
    sys.exit(main())
