"""Multi-GPU scaling of our DiT's training step: data, tensor (+ sequence) and context parallelism
against the one-GPU step, from one command.

    python benchmarks/scaling.py --nproc 2 [--layouts dp_distopt,tp2_sp,cp2] [--modes strong,weak]
                                 [--model dit_7b] [--layers 4] [--shape general] [--steps 5] [--warmup 2]
                                 [--override parallel.overlap_grad_reduce=true ...] [--commit SHA]
    python benchmarks/scaling.py --tiny --nproc 2     # CPU smoke: gloo, dit_tiny width

The command is a driver. It runs the one-GPU baseline in one process (``parallel=single``), then the
layouts in one ``torchrun --nproc-per-node N`` world (NCCL; gloo on CPU), each worker measuring
every layout in turn (megatron's parallel state is torn down and rebuilt between layouts), and
writes one result file with both.

A layout is a ``parallel`` preset of ``recipes/_base/parallel`` (plus ``--override`` s, applied to
every multi-GPU layout), so the measured settings are the presets users train with. The model is
built by the trainer's code (``model=<--model>``, ``model.num_layers=<--layers>``) and one step is
the trainer's step (megatron DDP, megatron Adam with fp32 master weights and grad clipping, the
forward/backward schedule) on random latents and context (MSE loss, as in ``dit_step.py``). The
data-parallel size is N / (tp x pp x cp); every data-parallel rank gets ``--batch`` samples.

Scaling modes of a model-parallel layout (TP/CP > 1):

* strong: the same sample (``--shape``) split over the model-parallel ranks;
* weak: ``tp x cp`` times the latent frames (tokens per GPU held constant).

A pure data-parallel layout is weak scaling (``--batch`` per GPU); its strong-scaling figure
(the same global batch, one GPU accumulating N microbatches) comes from a second baseline
(``single_accum<N>``) when ``strong`` is among ``--modes``.

Efficiency = per-GPU model TFLOP/s of the layout / per-GPU model TFLOP/s of its one-GPU baseline
(for strong scaling that is T_1 / (N x T_N)). FLOPs are ``DiTConfig.flops_per_sample`` (as in the
trainer's MFU). Targets from the issue: >= 90% data-parallel, >= 80% TP2 at the general shape.

Also the memory-fit check (issue item 3): e.g. ``--nproc 4 --layers 28 --layouts tp4_sp
--override parallel.recompute=full --steps 10 --no-baseline`` records step time and the peak
memory of every rank for the real ``dit_7b``; an out-of-memory layout is recorded as such.
Result: ``benchmarks/results/scaling_<model>-<layers>L_<shape>_<hw>x<N>_<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from bench_common import (
    RESULTS,
    MegatronTrainStep,
    build_world_model,
    command_line,
    compile_layers,
    device_of_run,
    git_commit,
    hardware,
    hw_tag,
    init_megatron,
    memory_stats,
    peak_flops,
    print_table,
    run_variant,
    time_steps,
    today,
    versions,
    warm_attention_log,
    write_result,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {
    "general": (16, 88, 160),  # 121 frames 704x1280: 56,320 tokens
    "general57": (8, 88, 160),  # 57 frames: 28,160 tokens
    "tiny": (2, 8, 8),  # CPU smoke: 32 tokens
}
TARGETS = {"dp": 0.90, "tp2": 0.80}
FPS = 24.0


# ---------------------------------------------------------------- cases
def layout_sizes(preset: str, overrides: list[str]) -> dict:
    """tp / pp / cp of a parallel preset with the overrides applied."""
    from nemo_ext.config.compose import compose, to_typed

    par = to_typed(compose("general", "diffusion", [f"parallel={preset}", *overrides])).parallel
    return {"tp": par.tp, "pp": par.pp, "cp": par.cp}


def plan_cases(args) -> tuple[list[dict], list[dict]]:
    """(baseline cases for one process, layout cases for the N-process world)."""
    cases, baselines = [], [{"label": "single", "preset": "single", "overrides": [], "frames_scale": 1, "microbatches": 1}]
    for preset in args.layouts:
        sizes = layout_sizes(preset, args.override)
        mp = sizes["tp"] * sizes["pp"] * sizes["cp"]
        if args.nproc % mp:
            raise SystemExit(f"--layouts {preset}: tp x pp x cp = {mp} does not divide --nproc {args.nproc}")
        dp = args.nproc // mp
        split = sizes["tp"] * sizes["cp"]  # ranks a sample's tokens are split over
        # Without a split of the sample: data parallelism is weak scaling (batch per GPU fixed), a
        # pipeline of one sample's layers strong scaling.
        modes = (["weak"] if sizes["pp"] == 1 else ["strong"]) if split == 1 else args.modes
        for mode in modes:
            label = preset if mode == "strong" or split == 1 else f"{preset}_weak"
            cases.append({"label": label, "preset": preset, "overrides": list(args.override), "mode": mode,
                          "frames_scale": split if mode == "weak" else 1, "microbatches": args.microbatches,
                          "dp": dp, **sizes})
            if mp == 1 and "strong" in args.modes and dp > 1:
                accum = {"label": f"single_accum{dp}", "preset": "single", "overrides": [], "frames_scale": 1,
                         "microbatches": dp * args.microbatches}
                if accum["label"] not in {b["label"] for b in baselines}:
                    baselines.append(accum)
    return baselines, cases


# ---------------------------------------------------------------- worker (one rank)
def measure_case(case: dict, args, device: torch.device) -> dict:
    """One layout on this rank: build, run warm-up + timed steps, return this rank's measurements."""
    from megatron.core import parallel_state

    from nemo_ext.config.compose import compose, to_typed

    overrides = [f"model={args.model}", f"model.num_layers={args.layers}", f"parallel={case['preset']}",
                 *case["overrides"], *args.set]
    cfg = to_typed(compose("general", "diffusion", overrides))
    init_megatron(device, cfg.parallel, seed=cfg.trainer.seed)
    arch = cfg.model
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t, h, w = SHAPES[args.shape]
    latent = (t * case["frames_scale"], h, w)
    tokens = arch.num_tokens(latent)
    context_len = arch.text_encoder.max_length
    dp = parallel_state.get_data_parallel_world_size()

    # Every rank of a data-parallel replica gets the same samples; replicas get different ones.
    g = torch.Generator(device="cpu").manual_seed(1000 + parallel_state.get_data_parallel_rank())
    b, c = args.batch, arch.latent_channels
    inputs = {
        "x": torch.randn(b, c, *latent, generator=g).to(device, dtype),
        "timestep": torch.rand(b, generator=g).to(device, dtype),
        "context": torch.randn(b, context_len, arch.context_dim, generator=g).to(device, dtype),
        "target": torch.randn(b, c, *latent, generator=g).to(device, torch.float32),
    }
    model = build_world_model(cfg, dtype, device)
    if args.compile:
        warm_attention_log(arch.attention_backend, device)
        compile_layers(model.net.decoder.layers, None)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        out = chunk(mb["x"], mb["timestep"], {"context": mb["context"]}, fps=FPS)

        def loss_func(output):
            loss = F.mse_loss(output.float(), mb["target"])
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    step = MegatronTrainStep(model, cfg.parallel, cfg.optim, dtype, forward_step, num_microbatches=case["microbatches"],
                             seq_length=tokens, micro_batch_size=b)
    timing = time_steps(lambda: step(inputs), device, args.warmup, args.steps)
    flops = arch.flops_per_sample(latent, context_len) * b * case["microbatches"] * dp
    return {"latent_thw": list(latent), "tokens_per_sample": tokens, "global_batch": b * case["microbatches"] * dp,
            "dp": dp, "flops_per_step": flops, "parallel": vars(cfg.parallel), **timing.summary(),
            **memory_stats(device), "loss_last": step.last_loss()}


def worker(args) -> int:
    import torch.distributed as dist

    from nemo_ext.training.strategy import init_distributed

    device = device_of_run(args.cpu)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # A hang (one rank failing inside a collective) ends the run after this long, not 30 minutes.
    init_distributed("cuda" if device.type == "cuda" else "cpu", timeout_minutes=args.timeout_minutes)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = json.loads(Path(args.cases).read_text())
    done = []
    for case in cases:
        if rank == 0:
            print(f"--- {case['label']} on {world} process(es)", flush=True)
        record = run_variant(case["label"], lambda: measure_case(case, args, device), device, keep_going=True)
        # Every rank's view: the step time is the slowest rank's, memory the largest.
        views = [None] * world
        dist.all_gather_object(views, record)
        if rank == 0:
            merged = dict(case, **views[0], world_size=world)
            ok = [v for v in views if v.get("status") == "ok"]
            merged["status"] = "ok" if len(ok) == world else next(v["status"] for v in views if v.get("status") != "ok")
            if len(ok) == world:
                merged["step_time_s_median"] = max(v["step_time_s_median"] for v in views)
                merged["wall_step_time_s_mean"] = max(v["wall_step_time_s_mean"] for v in views)
            key = "peak_allocated_gib" if device.type == "cuda" else "rss_gib"
            merged["peak_memory_gib_per_rank"] = [v.get(key) for v in views]
            errors = sorted({v.get("error") for v in views if v.get("error")})
            if errors:
                merged["error"] = " | ".join(errors)[:2000]
            done.append(merged)
            Path(args.part_out).write_text(json.dumps(done, indent=2, default=str))
            if merged["status"] == "ok":
                print(f"    {merged['step_time_s_median']:.4f} s/step, peak {max(merged['peak_memory_gib_per_rank'])} GiB",
                      flush=True)
            else:
                print(f"    {merged['status']}: {merged.get('error', '')[:300]}", flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- driver
def launch(args, cases: list[dict], nproc: int, tmp: Path, tag: str) -> list[dict]:
    cases_file, part = tmp / f"{tag}_cases.json", tmp / f"{tag}_records.json"
    cases_file.write_text(json.dumps(cases))
    worker_args = [str(Path(__file__).resolve()), "--worker", "--cases", str(cases_file), "--part-out", str(part),
                   "--model", args.model, "--layers", str(args.layers), "--shape", args.shape, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--timeout-minutes", str(args.timeout_minutes), *sum((["--set", s] for s in args.set), [])]
    if args.compile:
        worker_args.append("--compile")
    if args.cpu:
        worker_args.append("--cpu")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the GPU machines do not permit it)
    env["PYTHONUNBUFFERED"] = "1"
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker_args]
        if args.cpu:
            env.setdefault("OMP_NUM_THREADS", "1")
    else:
        cmd = [sys.executable, *worker_args]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    records = json.loads(part.read_text()) if part.is_file() else []
    finished = {r["label"] for r in records}
    for case in cases:  # a crashed or killed world: the cases it did not reach
        if case["label"] not in finished:
            records.append(dict(case, status="not run", error=f"worker exited with code {proc.returncode}"))
    return records


def efficiency(case: dict, baselines: dict) -> dict:
    """Per-GPU model TFLOP/s of a layout against its one-GPU baseline(s); the throughput speedup of
    a strong-scaling model-parallel layout."""
    if case.get("status") != "ok":
        return {}
    per_gpu = case["flops_per_step"] / case["step_time_s_median"] / case["world_size"]

    def against(label: str) -> Optional[float]:
        base = baselines.get(label)
        if not base or base.get("status") != "ok":
            return None
        return round(per_gpu / (base["flops_per_step"] / base["step_time_s_median"]), 4)

    out: dict = {}
    if case["tp"] * case["cp"] * case["pp"] == 1:  # data parallel (per-GPU batch fixed)
        out["efficiency"] = out["efficiency_weak"] = against("single")
        if case["dp"] > 1:
            out["efficiency_strong"] = against(f"single_accum{case['dp']}")
    else:
        out["efficiency"] = against("single")
        base = baselines.get("single")
        if case.get("mode") == "strong" and base and base.get("status") == "ok":
            out["speedup"] = round((case["global_batch"] / case["step_time_s_median"])
                                   / (base["global_batch"] / base["step_time_s_median"]), 4)
    return {k: v for k, v in out.items() if v is not None}


def target_of(case: dict) -> Optional[tuple[str, float]]:
    if case["tp"] * case["cp"] * case["pp"] == 1:
        return "efficiency_weak", TARGETS["dp"]
    if case["tp"] == 2 and case["cp"] == 1 and case["pp"] == 1 and case["mode"] == "strong":
        return "efficiency", TARGETS["tp2"]
    return None


def driver(args) -> int:
    baselines, cases = plan_cases(args)
    tmp = Path(tempfile.mkdtemp(prefix="scaling_"))
    base_records = {} if args.no_baseline else {r["label"]: r for r in launch(args, baselines, 1, tmp, "baseline")}
    records = launch(args, cases, args.nproc, tmp, "layouts")

    peak = peak_flops(device_of_run(args.cpu))

    def throughput(rec: dict) -> None:
        if rec.get("status") == "ok":
            world = rec.get("world_size", 1)
            per_gpu = rec["flops_per_step"] / rec["step_time_s_median"] / world
            rec["tflops_per_gpu"] = round(per_gpu / 1e12, 2)
            rec["mfu"] = round(per_gpu / peak, 4) if peak else None
            rec["samples_per_s_per_gpu"] = rec["global_batch"] / rec["step_time_s_median"] / world

    for rec in base_records.values():
        throughput(rec)
    for rec in records:
        throughput(rec)
        rec.update(efficiency(rec, base_records))
        target = target_of(rec)
        if target and rec.get(target[0]) is not None:
            rec["target"] = {"metric": target[0], "value": target[1], "met": rec[target[0]] >= target[1]}
    rows = []
    for rec in list(base_records.values()) + records:
        memory = [m for m in rec.get("peak_memory_gib_per_rank", []) if m is not None]
        rows.append(dict(rec, gpus=rec.get("world_size", 1), peak=max(memory, default=None)))
    print()
    table = print_table(rows, [("label", "layout"), ("gpus", "GPUs"), ("mode", "scaling"), ("tokens_per_sample", "tokens/sample"),
                               ("global_batch", "global batch"), ("step_time_s_median", "s/step"),
                               ("tflops_per_gpu", "TFLOP/s/GPU"), ("mfu", "MFU"), ("efficiency", "eff."),
                               ("efficiency_weak", "eff. weak"), ("efficiency_strong", "eff. strong"), ("speedup", "speedup"),
                               ("peak", "peak GiB"), ("status", "status")])
    hw = hardware()
    result = {
        "benchmark": "scaling",
        "what": f"DiT training-step scaling over {args.nproc} GPUs: {args.model}, {args.layers} layers, "
                f"shape {args.shape} {SHAPES[args.shape]} latents, batch {args.batch} per data-parallel rank",
        "date": today(),
        "commit": git_commit(args.commit),
        "hardware": hw,
        "versions": versions(),
        "command": command_line(),
        "nproc": args.nproc,
        "model": {"preset": args.model, "num_layers": args.layers, "set": args.set},
        "shape": {"name": args.shape, "latent_thw": list(SHAPES[args.shape])},
        "loss": "MSE(model output, fixed random target), fp32",
        "efficiency_definition": "per-GPU model TFLOP/s of the layout / per-GPU model TFLOP/s of the 1-GPU baseline "
                                 "(strong: T_1/(N T_N); weak: the same per-GPU work)",
        "targets": TARGETS,
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "baselines": list(base_records.values()),
        "layouts": records,
        "table": table,
    }
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="scaling_out_")) if args.tiny else RESULTS)
    stem = args.name or f"scaling_{args.model}-{args.layers}L_{args.shape}_{hw_tag(args.nproc)}_{today()}"
    path = write_result(result, out_dir, stem)
    print(f"wrote {path}")
    bad = [r for r in records + list(base_records.values()) if r.get("status") in ("error", "not run")]
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="GPUs (processes) of the multi-GPU world")
    p.add_argument("--layouts", default="dp_distopt,tp2_sp,cp2", help="comma-separated parallel presets (recipes/_base/parallel)")
    p.add_argument("--modes", default="strong,weak", help="scaling modes of model-parallel layouts: strong, weak or both")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override applied to every multi-GPU layout, e.g. parallel.overlap_grad_reduce=true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override applied everywhere, the baseline included (e.g. model.attention_backend=flash)")
    p.add_argument("--model", default="dit_7b", help="DiT model preset")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (dit_7b: 28)")
    p.add_argument("--shape", default="general", choices=list(SHAPES), help="latent shape of one sample (tiny: CPU smoke)")
    p.add_argument("--batch", type=int, default=1, help="samples per microbatch per data-parallel rank")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first ones also create NCCL communicators)")
    p.add_argument("--compile", action="store_true", help="torch.compile every DiT layer (unverified with TP/SP/CP)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU baseline (e.g. a model that needs several GPUs)")
    p.add_argument("--timeout-minutes", type=int, default=8, help="process-group timeout: how long a hung collective may wait")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: gloo, dit_tiny, 2 layers, tiny latents")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even if GPUs are visible")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp folder with --tiny)")
    p.add_argument("--name", default=None, help="result file stem")
    p.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    # worker mode (started by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.cpu = True
        args.shape = "tiny"
        args.model = "dit_tiny" if args.model == "dit_7b" else args.model
        args.layers = 2 if args.layers == 4 else args.layers
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if isinstance(args.layouts, str):
        args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if isinstance(args.modes, str):
        args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
        bad = [m for m in args.modes if m not in ("strong", "weak")]
        if bad:
            p.error(f"--modes: unknown {bad} (strong, weak)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
