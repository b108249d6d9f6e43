"""Peak memory and step time of LoRA vs full post-training, through the real training CLI.

    python benchmarks/lora_vs_full.py --family diffusion --model dit_7b --shape general --steps 12 [--recompute full]
    python benchmarks/lora_vs_full.py --family ar --model ar_4b --shape general --steps 12
    python benchmarks/lora_vs_full.py --model dit_tiny --steps 3 --device cpu      # CPU smoke test

Runs ``python -m nemo_ext.cli.train`` once per strategy (``strategy=full``, ``strategy=lora``; each in
its own process, so an out-of-memory failure of one is recorded and does not disturb the other)
with the same model, shape and overrides, per-step logging and no checkpoints, and writes one JSON
result: per strategy its status (``ok`` | ``oom`` | ``failed``), median / mean step time (the first
``--warmup`` steps excluded), the peak memory over every step (GPU: max allocated; CPU: RSS),
TFLOP/s and MFU, first / last loss, and the trainable / total parameter counts the run logged.
The file records the hardware, software versions, the git commit and the exact commands
(``benchmarks/results/lora_vs_full_<model>-<shape>_<hw>_<date>.json``).

Shapes (``--shape``): ``default`` (the recipe's data config) or ``general``: the general recipe's real
clip size: DiT 121 frames at 704x1280 (56,320 tokens), AR 33 frames at 640x1024 (5x40x64 = 12,800
tokens), on a procedural sample world generated at that size on first use. Without
``trainer.init_from`` the base is random (weights do not change time or memory; a random DiT's
AdaLN-Zero gates do make its LoRA gradients zero, so its loss does not move).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_throughput import _commit, _finite, _hardware  # noqa: E402

SHAPES = {
    "default": {"diffusion": [], "ar": []},
    "general": {
        "diffusion": ["data.num_frames=121", "data.height=704", "data.width=1280", "data.sample_num_frames=121",
                      "data.sample_num_videos=4", "data.sample_val_num_videos=1", "data.sample_dir=data/sample/general_720p"],
        "ar": ["data.num_frames=33", "data.height=640", "data.width=1024", "data.sample_num_videos=8",
               "data.sample_val_num_videos=1", "data.sample_dir=data/sample/ar640"],
    },
}
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)
PARAMS = re.compile(r"trainable parameters: ([\d,]+) of ([\d,]+)")


def _run(cmd, log_path: Path) -> tuple[int, str]:
    """Run streaming the output to the console and to ``log_path``; returns (exit code, output)."""
    print("running:", " ".join(cmd), flush=True)
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        code = proc.wait()
    return code, "".join(lines)


def _summary(rows: list, warmup: int) -> dict:
    timed = [r for r in rows if r["step"] > warmup] or rows
    times = [r["step_time_s"] for r in timed]
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s_median": statistics.median(times),
        "step_time_s_mean": statistics.fmean(times),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in timed),
        "tflops_per_gpu_median": statistics.median(r["tflops_per_gpu"] for r in timed),
        "mfu_median": _finite(statistics.median(r["mfu"] for r in timed)),
        # every step, warm-up included: the first step allocates the optimizer state
        "peak_memory_gib": max(r["memory_gib"] for r in rows),
        "loss_first": _finite(rows[0]["loss"]),
        "loss_last": _finite(rows[-1]["loss"]),
    }


def run_strategy(strategy: str, args, runs_dir: Path) -> dict:
    train_args = ["--recipe", args.recipe, "--family", args.family, f"runs_dir={runs_dir}", f"run_name={strategy}",
                  f"model={args.model}", f"strategy={strategy}", f"trainer.max_steps={args.steps}",
                  "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0", "trainer.val_every_n_steps=0",
                  "trainer.progress_bar=false", f"trainer.device={args.device}", *SHAPES[args.shape][args.family]]
    if args.recompute:
        train_args += [f"parallel.recompute={args.recompute}"]
    train_args += args.overrides
    launcher = [sys.executable, "-m"]
    if args.nproc > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m"]
    cmd = [*launcher, "nemo_ext.cli.train", *train_args]
    code, output = _run(cmd, runs_dir / f"{strategy}.log")
    result = {"command": " ".join(cmd)}
    params = PARAMS.search(output)
    if params:
        result["trainable_params"] = int(params.group(1).replace(",", ""))
        result["total_params"] = int(params.group(2).replace(",", ""))
    metrics = sorted(runs_dir.glob(f"{args.recipe}/*/{strategy}/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()] if metrics else []
    rows = [r for r in rows if "val_loss" not in r]
    if code != 0:
        oom = OOM.search(output)
        tail = [ln for ln in output.splitlines() if ln.strip()][-12:]
        result.update(status="oom" if oom else "failed", exit_code=code, error_tail=tail)
        if rows:
            result["before_failure"] = _summary(rows, args.warmup)
        return result
    if not rows:
        return {**result, "status": "failed", "error_tail": ["no metrics.jsonl written"]}
    result.update(status="ok", **_summary(rows, args.warmup))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--family", default="diffusion", choices=["diffusion", "ar"])
    parser.add_argument("--model", default=None, help="model preset (default: dit_tiny / ar_tiny)")
    parser.add_argument("--shape", default="default", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the timing")
    parser.add_argument("--strategies", default="full,lora")
    parser.add_argument("--recompute", default=None, choices=[None, "full", "selective"],
                        help="parallel.recompute for both strategies (same settings: a fair comparison)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--name", default=None, help="result file stem")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs (after --)")
    args = parser.parse_args(argv)
    args.model = args.model or ("ar_tiny" if args.family == "ar" else "dit_tiny")

    runs_dir = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    results = {s: run_strategy(s, args, runs_dir) for s in args.strategies.split(",")}
    hw = _hardware()
    hw_tag = (hw.get("gpu") or "cpu").replace(" ", "-").replace("/", "-")
    date = datetime.date.today().isoformat()
    out = {
        "what": f"LoRA vs full post-training: peak memory and step time ({args.recipe} recipe, {args.family}, "
                f"{args.model}, shape {args.shape})",
        "date": date,
        "commit": args.commit or _commit(),
        "hardware": hw,
        "nproc": args.nproc,
        "shape_overrides": SHAPES[args.shape][args.family],
        "recompute": args.recompute,
        "extra_overrides": args.overrides,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
        "note": "tflops_per_gpu / mfu count the full-training FLOPs (forward + both backward GEMMs) for both "
                "strategies; LoRA skips the frozen weights' gradient GEMMs, so compare step times",
        "logs": str(runs_dir),
    }
    full, lora = results.get("full", {}), results.get("lora", {})
    if full.get("status") == "ok" and lora.get("status") == "ok":
        out["lora_over_full"] = {"peak_memory": lora["peak_memory_gib"] / max(full["peak_memory_gib"], 1e-9),
                                 "step_time": lora["step_time_s_median"] / full["step_time_s_median"]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = args.name or f"lora_vs_full_{args.model}-{args.shape}_{hw_tag}_{date}"
    path = Path(args.out) / f"{stem}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "logs"}, indent=2))
    print(f"wrote {path}")
    return 0 if all(r.get("status") in ("ok", "oom") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
