"""Per-step metrics: one console line every ``trainer.log_every_n_steps`` steps and the same values in
the loggers (TensorBoard by default): loss (mean over the steps since the last line: the diffusion
loss of a single step varies a lot with its random noise levels), grad norm and lr (of the last
step), step time, samples/s, TFLOP/s per GPU, MFU (against the GPU's dense bf16 peak) and memory.
The per-step loss is logged to the loggers as ``train/loss`` as well.

Global rank 0 also appends each logged row to ``<run>/metrics.jsonl`` (one JSON object per line).

Step time is the wall time between consecutive step ends, averaged over the logging window, so it
includes data loading: it is what a user waits for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import TQDMProgressBar, _update_n
from nemo.utils import logging as nemo_logging

# Dense bf16 tensor-core peak per GPU (FLOP/s), by substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return value
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class StepMetrics(pl.Callback):
    def __init__(self, every_n_steps: int, global_batch_size: int, flops_per_sample: float, world_size: int):
        self.every = every_n_steps
        self.gbs = global_batch_size
        self.flops_per_sample = flops_per_sample
        self.world_size = world_size
        self._last_end: Optional[float] = None
        self._window: list[float] = []
        self._window_losses: list[float] = []
        self.history: list[dict] = []
        # Set once the run directory exists; global rank 0 appends one JSON line per logged step.
        self.metrics_path: Optional[Path] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_end = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time spent between steps on other work (validation) out of the step time."""
        if self._last_end is not None:
            self._last_end += seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._window.append(now - self._last_end)
        self._last_end = now
        stats = dict(pl_module.last_stats)
        self._window_losses.append(stats.get("loss", float("nan")))
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        step_time = sum(self._window) / max(1, len(self._window))
        loss = sum(self._window_losses) / len(self._window_losses)
        self._window.clear()
        self._window_losses.clear()
        device = trainer.strategy.root_device
        samples_per_s = self.gbs / step_time if step_time > 0 else float("nan")
        tflops = self.flops_per_sample * samples_per_s / self.world_size / 1e12
        peak = peak_flops(device)
        row = {
            "step": step,
            "loss": loss,
            "grad_norm": stats.get("grad_norm", float("nan")),
            "lr": stats.get("lr", float("nan")),
            "step_time_s": step_time,
            "samples_per_s": samples_per_s,
            "tflops_per_gpu": tflops,
            "mfu": tflops * 1e12 / peak if peak else float("nan"),
            "memory_gib": memory_gib(device),
        }
        if hasattr(pl_module, "data_counts"):
            row.update(pl_module.data_counts())
        self.history.append(row)
        if self.metrics_path is not None and trainer.is_global_zero:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        pl_module.log_dict(
            {
                (f"data/{k}" if k.startswith(("samples_from_", "failed_")) else f"perf/{k}"): float(v)
                for k, v in row.items()
                if k not in ("step", "loss", "grad_norm", "lr")
            },
            on_step=True,
            batch_size=self.gbs,
        )
        mfu = f"{row['mfu'] * 100:.1f}%" if peak else "n/a"
        mem = "GPU peak" if device.type == "cuda" else "RSS"
        sources = {k[len("samples_from_"):]: v for k, v in row.items() if k.startswith("samples_from_")}
        data = " | samples " + ", ".join(f"{k} {v}" for k, v in sources.items()) if len(sources) > 1 else ""
        if row.get("failed_samples"):
            data += f" | {row['failed_samples']} corrupt skipped"
        nemo_logging.info(
            f"step {step}/{trainer.max_steps} | loss {row['loss']:.4f} | grad_norm {row['grad_norm']:.3f} | "
            f"lr {row['lr']:.2e} | {step_time:.3f} s/step | {samples_per_s:.2f} samples/s | "
            f"{tflops:.3f} TFLOP/s/GPU | MFU {mfu} | {mem} {row['memory_gib']:.2f} GiB{data}"
        )


class StepProgressBar(TQDMProgressBar):
    """Progress in optimizer steps out of ``trainer.max_steps`` (Lightning counts loader batches,
    i.e. microbatches, and has no total for an endless loader)."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(trainer.max_steps)
        self.train_progress_bar.initial = 0
        _update_n(self.train_progress_bar, trainer.global_step)
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
