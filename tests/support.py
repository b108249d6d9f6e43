"""Helpers shared by the tests (importable as ``support``; conftest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CliRun:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc = proc
        self.run_dir = run_dir

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def rows(self) -> list[dict]:
        """Every row of <run>/metrics.jsonl, in order (train and validation rows)."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def metrics(self) -> dict[int, dict]:
        """Train rows of <run>/metrics.jsonl by step (the current segment of the run), with the
        step's validation values (``val_loss``, ``val_samples``) merged in where there are some."""
        rows = self.rows()
        out = {row["step"]: dict(row) for row in rows if "val_loss" not in row}
        for row in rows:
            if "val_loss" in row and row["step"] in out:
                out[row["step"]].update(row)
        return out

    def val_metrics(self) -> dict[int, dict]:
        """Validation rows of <run>/metrics.jsonl by step."""
        return {row["step"]: row for row in self.rows() if "val_loss" in row}


def run_cli(overrides, runs_dir: Path, nproc: int = 1, run_name: str = "test", timeout: int = 900,
            check: bool = True, recipe: str = "general", background: bool = False, device: str = "cpu",
            family: str = "diffusion"):
    """Run ``python -m nemo_ext.cli.train`` (``torchrun`` when nproc > 1) on ``device`` (cpu: gloo,
    gpu: NCCL), the path a user's run takes. Returns a CliRun, or with ``background=True`` a
    (Popen, run_dir) pair, its console output in ``<run dir>.console.log``."""
    args = ["--recipe", recipe, "--family", family, f"trainer.device={device}", "trainer.progress_bar=false", f"runs_dir={runs_dir}",
            f"run_name={run_name}", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nemo_ext.cli.train", *args]
    else:
        cmd = [sys.executable, "-m", "nemo_ext.cli.train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"  # 2-core CI machines: no thread oversubscription
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    default_model = "ar_tiny" if family == "ar" else "dit_tiny"
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), default_model)
    run_dir = Path(runs_dir) / recipe / f"{family}_{model}" / run_name
    if background:  # its console output: <run dir>.console.log (beside the run)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run_name}.console.log", "w") as log:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), run_dir
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return CliRun(proc, run_dir)


def train_concurrently(specs: dict[str, dict]) -> dict[str, Path]:
    """Train several tiny runs at once (``name -> run_cli keyword arguments``, each with its own
    data directory: no two writers of one directory); a run that fails is run again in the
    foreground, which fails with its training log. Returns each run's directory."""
    started = {name: run_cli(background=True, run_name=name, **kw) for name, kw in specs.items()}
    out = {}
    for name, (proc, run_dir) in started.items():
        if proc.wait(timeout=600) != 0:
            run_cli(check=True, run_name=name, **specs[name])
        assert (run_dir / "checkpoints" / "last" / "metadata.json").is_file(), name
        out[name] = run_dir
    return out


def cli_env() -> dict:
    """The environment of a one-process CLI run from a test (no torchrun variables inherited)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def count_matmul_flops(fn) -> dict[str, int]:
    """FLOPs of ``fn()`` by op, from ``torch.utils.flop_counter.FlopCounterMode``, whichever SDPA kernel
    torch picks for the attention.

    The counter has formulas for the CUDA SDPA kernels (flash, efficient, cuDNN) and for the matmuls of
    the unfused math path, but none for ``_scaled_dot_product_flash_attention_for_cpu``, the kernel CPU
    attention runs as (measured with torch 2.14.1 here and 2.11.0+cu130 on the GPU machine: the counter
    saw the DiT's linears only, 26,298,368 of 30,722,048 FLOPs, the missing 4,423,680 being exactly its
    self- and cross-attention terms; the earlier green runs' torch counted them). The CPU kernel gets
    the formulas the counter uses for the CUDA ones (2 FLOPs per multiply-add of QK^T and AV; backward
    twice that), with the query's heads (grouped-query K/V are broadcast: torch 2.11's own formula
    asserts equal heads). Every attention op that ran must have a formula, so a kernel a later torch
    routes to fails here instead of giving a silently smaller count.
    """
    import torch
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import TorchDispatchMode

    def attention(q, k, v, backward=False):
        b, h, s_q, d_q = q
        s_k, d_v = k[-2], v[-1]
        return (2 if backward else 1) * 2 * b * h * s_q * s_k * (d_q + d_v)

    aten = torch.ops.aten
    custom = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu",  # (query, key, value, ...)
         lambda q, k, v, *_, out_shape=None, **__: attention(q, k, v)),
        ("_scaled_dot_product_flash_attention_for_cpu_backward",  # (grad_out, query, key, value, ...)
         lambda g, q, k, v, *_, out_shape=None, **__: attention(q, k, v, backward=True)),
    ):
        if hasattr(aten, name):
            custom[getattr(aten, name)] = formula

    class AttentionOps(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.name() or "scaled_dot_product" in func.name():
                self.seen.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=custom)
    with counter, AttentionOps() as log:
        fn()
    uncounted = {str(op) for op in log.seen if op not in counter.flop_registry}
    assert not uncounted, f"attention ran as {sorted(uncounted)}, which FlopCounterMode has no formula for"
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
