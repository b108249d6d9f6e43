"""Measure a recipe's training throughput through the real CLI and write a results file.

    python benchmarks/recipe_throughput.py --recipe general --steps 100 [--nproc N] [--out DIR] -- <hydra overrides>

Runs ``python -m nemo_ext.cli.train`` (``torchrun`` when --nproc > 1) for ``--steps`` steps with
per-step logging, then summarizes ``metrics.jsonl`` (the first ``--warmup`` steps excluded): median
and mean step time, samples/s, TFLOP/s per GPU, MFU, peak memory, first/last loss. The JSON result
records hardware, software versions, the git commit and the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hardware() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def _finite(x):
    return x if x == x and abs(x) != float("inf") else None  # JSON has no NaN/inf


def _commit() -> str:
    """HEAD (+ "-dirty" with uncommitted changes); "unknown" outside a git checkout (e.g. a copy
    of the tree on a GPU machine: pass --commit there)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--family", default="diffusion")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="leading steps excluded from the timing")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--name", default=None, help="result file stem (default: recipe_model_hw_date)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    runs_dir = Path(tempfile.mkdtemp(prefix="bench_runs_"))
    train_args = ["--recipe", args.recipe, "--family", args.family, f"runs_dir={runs_dir}", "run_name=bench",
                  f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
                  f"trainer.checkpoint_every_n_steps={args.steps}", "trainer.progress_bar=false",
                  f"trainer.device={args.device}", *args.overrides]
    launcher = [sys.executable, "-m"]
    if args.nproc > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m"]
    cmd = [*launcher, "nemo_ext.cli.train", *train_args]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode:
        print(f"training failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode

    metrics = sorted(runs_dir.glob(f"{args.recipe}/*/bench/metrics.jsonl"))
    if not metrics:
        print(f"no metrics.jsonl under {runs_dir}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    config = (metrics[0].parent / "config.yaml").read_text()
    timed = [r for r in rows if r["step"] > args.warmup] or rows
    step_times = [r["step_time_s"] for r in timed]
    model = metrics[0].parent.parent.name.split("_", 1)[1]
    hw = _hardware()
    hw_tag = (hw.get("gpu") or "cpu").replace(" ", "-").replace("/", "-")
    date = datetime.date.today().isoformat()
    result = {
        "what": f"{args.recipe} recipe training step ({args.family}, {model})",
        "date": date,
        "commit": args.commit or _commit(),
        "hardware": hw,
        "command": " ".join(cmd),
        "nproc": args.nproc,
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s_median": statistics.median(step_times),
        "step_time_s_mean": statistics.fmean(step_times),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in timed),
        "tflops_per_gpu_median": statistics.median(r["tflops_per_gpu"] for r in timed),
        "mfu_median": _finite(statistics.median(r["mfu"] for r in timed)),
        "peak_memory_gib_max": max(r["memory_gib"] for r in timed),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "config_yaml": config,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.recipe}_{model}_{hw_tag}_{date}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config_yaml"}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
