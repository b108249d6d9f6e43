"""Shared pieces of the step benchmarks (``dit_step.py``, ``ar_step.py``, ``scaling.py``).

* the trainer's optimizer step without Lightning (:class:`MegatronTrainStep`): megatron DDP with an
  fp32 grad buffer, megatron's mixed-precision Adam (fp32 master weights, grad clipping) and
  megatron's forward/backward schedule, set up exactly as ``WorldModelModule.wrap_ddp`` /
  ``connect_megatron_hooks`` / ``training_step`` do;
* step timing with CUDA events and no host synchronization between timed steps
  (:func:`time_steps`), per-variant memory accounting and OOM capture (:func:`run_variant`);
* the results-file conventions of ``benchmarks/results``: hardware, software versions, git commit,
  exact command, ``<what>_<hw>_<date>.json``.

Run the scripts from the repository root (``python benchmarks/<script>.py``); this module puts the
repository on ``sys.path`` so ``nemo_ext`` imports without an install.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

import torch  # noqa: E402  (after the path setup, like every script here)

# Dense bf16 tensor-core peak per GPU; the trainer's table (MFU in the logs uses the same numbers).
H100_BF16_PEAK = 989.4e12


# ---------------------------------------------------------------- environment and results files
def device_of_run(cpu: bool) -> torch.device:
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def peak_flops(device: torch.device) -> Optional[float]:
    """The GPU's dense bf16 peak (FLOP/s) from the trainer's table; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    from nemo_ext.training.callbacks import PEAK_BF16_FLOPS

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def hardware() -> dict:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for name in ("megatron.core", "diffusers", "transformers", "triton"):
        try:
            module = __import__(name, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as such
            out[name] = None
    return out


def git_commit(explicit: Optional[str] = None) -> str:
    """HEAD (+ "-dirty" with uncommitted changes); "unknown" outside a git checkout (a copy of the
    tree on a GPU machine: pass --commit there)."""
    if explicit:
        return explicit
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def hw_tag(count: int = 1) -> str:
    """Short hardware name for result files: H100, H200, ... (xN for N GPUs), or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    tag = next((k for k in ("GH200", "H200", "H100", "H800", "B200", "A100", "L40S") if k in name), None)
    tag = tag or name.replace("NVIDIA", "").strip().replace(" ", "-").replace("/", "-")
    return f"{tag}x{count}" if count > 1 else tag


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def today() -> str:
    return datetime.date.today().isoformat()


def write_result(result: dict, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def finite(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN/inf."""
    return x if x is not None and x == x and abs(x) != float("inf") else None


# ---------------------------------------------------------------- megatron world
def init_megatron(device: torch.device, parallel, seed: int = 1234) -> None:
    """The trainer's process-group and megatron ``parallel_state`` init (``MegatronStrategy``);
    a layout already initialized is torn down first, so one process can measure several layouts."""
    from megatron.core import parallel_state

    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)
    init_distributed("cuda" if device.type == "cuda" else "cpu")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_model_parallel(parallel, seed)


def limit_recompiles(layers: int) -> None:
    """Each transformer layer may compile its own graph (same code, other parameters): keep them
    all compiled instead of falling back to eager after dynamo's default 8 recompilations."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 2 * layers + 8))


def _silence_tp_group_warning() -> None:
    """megatron-core 0.19's RowParallelLinear.forward passes ``tp_group=None`` to its linear
    function, whose ``get_tensor_model_parallel_group_if_none`` then calls ``warnings.warn`` on
    rank 0 at every call: a graph break in the middle of every compiled layer (dynamo cannot trace
    or defer ``warnings.warn`` with keyword arguments). Same function without the warning."""
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core import parallel_state

    def tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if not torch.distributed.is_initialized():
            return None
        if not parallel_state.is_initialized() or tp_group is not None:
            return tp_group
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = tp_group_if_none


def compile_layers(layers: Iterable[torch.nn.Module], mode: Optional[str]) -> int:
    """``torch.compile`` each transformer layer in place (the block's Python loop, the schedule, the
    optimizer and megatron's DDP hooks stay eager). Returns the number of layers compiled."""
    layers = list(layers)
    limit_recompiles(len(layers))
    _silence_tp_group_warning()
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def build_world_model(cfg, dtype: torch.dtype, device: torch.device, initialize: bool = True):
    """The trainer's model of ``cfg`` (a composed, typed recipe config): ``build_world_model`` of
    ``DiffusionModule`` / ``ARModule`` (the family net of this pipeline stage + the task's
    conditioner in a WorldModel), on ``device`` in ``dtype``. Without the frozen tokenizer and text
    encoder: the benchmarks feed latents / token ids and context embeddings directly.

    On a GPU the weights are initialized there (seconds instead of minutes at 7B); the trainer
    initializes on the CPU so that every layout gets the same weights, which timing does not need.
    ``initialize=False`` skips megatron's init of the sharded weights (they are loaded after)."""
    from megatron.core import parallel_state

    from nemo_ext.models.world_model import WorldModel
    from nemo_ext.tasks import get_task

    if cfg.family == "diffusion":
        from nemo_ext.models.dit.model import CosmosDiT as Net
        from nemo_ext.models.dit.model import build_transformer_config
    else:
        from nemo_ext.models.ar.model import CosmosAR as Net
        from nemo_ext.models.ar.model import build_transformer_config
    config = build_transformer_config(cfg.model, cfg.parallel, dtype)
    if device.type == "cuda":
        config.use_cpu_initialization = False
    config.perform_initialization = initialize
    net = Net(config, cfg.model, pre_process=parallel_state.is_pipeline_first_stage(),
              post_process=parallel_state.is_pipeline_last_stage())
    task = get_task(cfg.task.name)
    return WorldModel(config, net, task.build_conditioner(cfg.task, cfg.model, cfg.data)).to(device)


class MegatronTrainStep:
    """One optimizer step of the trainer (``WorldModelModule.training_step``) without Lightning.

    ``forward_step(data_iterator, model) -> (output, loss_func)`` is megatron's forward-step
    contract (the one ``DiffusionModule`` / ``ARModule`` implement); ``batch`` is handed to it as
    every microbatch. Host synchronizations inside megatron's step (grad-norm ``.item()`` for
    clipping, the NaN check of the grad buffer) are the trainer's and are kept.
    """

    def __init__(self, world_model, parallel, optim, dtype: torch.dtype, forward_step: Callable,
                 num_microbatches: int, seq_length: int, micro_batch_size: int):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        from nemo_ext.training.optim import build_optimizer

        ddp_config = DistributedDataParallelConfig(  # as WorldModelModule.wrap_ddp
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            use_distributed_optimizer=parallel.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        self.chunks = [DistributedDataParallel(world_model.config, ddp_config, world_model)]
        for chunk in self.chunks:
            chunk.broadcast_params()
        self.optimizer = build_optimizer(optim, parallel, self.chunks, dtype)
        config = world_model.config  # as WorldModelModule.connect_megatron_hooks
        config.grad_scale_func = self.optimizer.mcore.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.chunks[0].no_sync
        if parallel.overlap_grad_reduce:
            config.grad_sync_func = self.chunks[0].start_grad_sync
        if parallel.overlap_param_gather and parallel.distributed_optimizer:
            config.param_sync_func = self.chunks[0].start_param_sync
        self.forward_step = forward_step
        self.num_microbatches = num_microbatches
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.last_losses: list = []

    def __call__(self, batch: dict) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.last_losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iter([batch] * self.num_microbatches),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=False,
        )
        self.optimizer.step()

    def last_loss(self) -> Optional[float]:
        """Mean microbatch loss of the last step on this rank (None off the last pipeline stage)."""
        if not self.last_losses:
            return None
        return float(torch.stack([d["loss"].float() for d in self.last_losses]).mean())


# ---------------------------------------------------------------- timing
@dataclass
class Timing:
    first_step_s: float  # includes torch.compile's tracing and code generation when compiled
    step_times_s: list[float]
    wall_s: float  # wall time of all timed steps, synchronized at both ends

    def summary(self) -> dict:
        times = self.step_times_s
        median = statistics.median(times)
        return {
            "first_step_s": round(self.first_step_s, 4),
            "step_time_s_median": median,
            "step_time_s_mean": statistics.fmean(times),
            "step_time_s_min": min(times),
            "step_time_s_max": max(times),
            "wall_step_time_s_mean": self.wall_s / len(times),
            # The first step minus a steady step: compilation (and autotuning, cuDNN plan building).
            "warmup_overhead_s": round(max(0.0, self.first_step_s - median), 3),
            "step_times_s": [round(t, 5) for t in times],
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> Timing:
    """Run ``warmup`` then ``steps`` training steps. The first warm-up step is timed on its own
    (compilation); the timed steps are bracketed by CUDA events, recorded back to back with no host
    synchronization in between, so each step's time is GPU time including any idle gap the host
    leaves (launch overhead, synchronizations inside the step)."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        t0 = time.perf_counter()
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    else:
        times = []
        t0 = time.perf_counter()
        for _ in range(steps):
            s = time.perf_counter()
            step()
            times.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
    return Timing(first, times, wall)


KERNEL_CLASSES = (
    # (class, substrings of the kernel name, lower case); first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "splitk")),
    ("communication", ("nccl",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other (elementwise, norms, copies)")


def profile_step(step: Callable[[], Any], device: torch.device, top: int = 25) -> dict:
    """GPU kernel time of one step by kernel and by class (attention / matmul / communication /
    optimizer / other): where the step's time goes, to explain a missed target with a measurement."""
    if device.type != "cuda":
        return {"note": "kernel profile needs a GPU"}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    per_kernel: dict[str, list] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        entry = per_kernel.setdefault(evt.name, [0.0, 0])
        entry[0] += evt.time_range.elapsed_us() / 1e3
        entry[1] += 1
    total = sum(v[0] for v in per_kernel.values()) or float("nan")
    by_class: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + ms
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_kernel_time_ms": round(total, 2),
        "by_class_ms": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"kernel": name[:160], "ms": round(ms, 3), "calls": calls, "share": round(ms / total, 4), "class": kernel_class(name)}
            for name, (ms, calls) in kernels
        ],
    }


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_stats(device: torch.device) -> dict:
    """Peak allocated / reserved GiB since the last :func:`reset_memory` (CPU: process RSS)."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        }
    import psutil

    return {"rss_gib": round(psutil.Process().memory_info().rss / 2**30, 2)}


def run_variant(name: str, body: Callable[[], dict], device: torch.device, keep_going: bool = True) -> dict:
    """Run one benchmark variant in isolation: memory freed and peak statistics reset before, an
    out-of-memory (or, with ``keep_going``, any) error recorded instead of raised, compiled graphs
    and memory released after. ``body`` builds everything it needs and returns its measurements."""
    reset_memory(device)
    record: dict = {"variant": name}
    try:
        record.update(body())
        record["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", error=str(exc).strip().splitlines()[0][:500], **memory_stats(device))
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' results
        if not keep_going:
            raise
        record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    finally:
        import torch._dynamo as dynamo  # (a bare `import torch._dynamo` would make `torch` local here)

        dynamo.reset()  # compiled graphs hold references to the variant's modules
        reset_memory(device)
    return record


def tflops_and_mfu(flops_per_step: float, step_time_s: float, world_size: int, device: torch.device) -> dict:
    tflops = flops_per_step / step_time_s / world_size / 1e12
    peak = peak_flops(device)
    return {"tflops_per_gpu": round(tflops, 2), "mfu": round(tflops * 1e12 / peak, 4) if peak else None}


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``; missing values print as '-'."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def run_variants(names: list[str], describe: Callable[[str], str], body: Callable[[str], dict],
                 device: torch.device, keep_going: bool = True) -> list[dict]:
    """:func:`run_variant` over ``names`` with one progress line per variant."""
    records = []
    for name in names:
        print(f"--- {name}: {describe(name)}", flush=True)
        record = run_variant(name, lambda: body(name), device, keep_going=keep_going)
        records.append(record)
        if record["status"] == "ok":
            print(f"    {record['step_time_s_median']:.4f} s/step, {record['tflops_per_gpu']} TFLOP/s/GPU, "
                  f"MFU {record['mfu']}, first step {record['first_step_s']:.1f} s", flush=True)
        else:
            print(f"    {record['status']}: {record.get('error', '')[:300]}", flush=True)
    return records


def speedups(records: list[dict], ours_prefix: str = "ours", ref_prefix: str = "") -> list[dict]:
    """Step time of each reference variant / step time of each of ours (> 1: ours is faster)."""
    ok = [r for r in records if r.get("status") == "ok"]
    ours = [r for r in ok if r["variant"].startswith(ours_prefix)]
    refs = [r for r in ok if not r["variant"].startswith(ours_prefix) and r["variant"].startswith(ref_prefix)]
    return [
        {"ours": o["variant"], "reference": r["variant"],
         "speedup": round(r["step_time_s_median"] / o["step_time_s_median"], 4)}
        for o in ours for r in refs
    ]


def headline(records: list[dict], peer: str, ours_prefix: str = "ours") -> Optional[dict]:
    """The fastest of our variants against ``peer``."""
    ok = [r for r in records if r.get("status") == "ok"]
    mine = [r for r in ok if r["variant"].startswith(ours_prefix)]
    ref = next((r for r in ok if r["variant"] == peer), None)
    if not mine or ref is None:
        return None
    best = min(mine, key=lambda r: r["step_time_s_median"])
    return {"ours": best["variant"], "peer": peer,
            "speedup": round(ref["step_time_s_median"] / best["step_time_s_median"], 4),
            "ours_step_time_s": best["step_time_s_median"], "peer_step_time_s": ref["step_time_s_median"],
            "ours_mfu": best.get("mfu"), "peer_mfu": ref.get("mfu")}


def warm_attention_log(backend: str, device: torch.device) -> None:
    """Our SDPA core attention logs its kernel choice once per backend; do it before compiling so
    the log call is not traced (a graph break in the first compiled layer)."""
    from nemo_ext.models.dit.attention import sdpa_context

    sdpa_context(backend, device.type)
