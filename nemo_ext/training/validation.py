"""Validation loss: the training loss of the current weights on held-out clips, forward only.

Every ``trainer.val_every_n_steps`` optimizer steps and at the last step (``0`` turns it off) the
:class:`ValidationLoss` callback runs ``WorldModelModule.validation_loss`` over ``trainer.val_batches``
global batches and reports their mean loss: a row ``{"step", "val_loss", "val_samples"}`` in
``<run>/metrics.jsonl`` (global rank 0), ``val/loss`` in the loggers (TensorBoard) and a console line.

What is held out: ``data.val_path`` (shard directories / globs, like ``data.path``); when it is unset
and the run trains on the generated sample world, a held-out sample world with other videos
(``<data.sample_dir>_val``, written by ``ensure_sample_data``); otherwise validation is off (said once
in the log).

Deterministic: every validation of a run, and of every run with the same data settings, sees the
same inputs: the first ``val_batches x data.global_batch_size`` samples in shard order (wrapping
around a smaller set), each cut at its first frame (``clip_sampling=start``), with diffusion noise
seeded by the sample's position in the validation set only (not by the training step,
``trainer.seed`` or ``data.seed``: the runs of a sweep are validated on identical inputs) and no
caption dropout. A validation batch is split over the data-parallel ranks like a training batch.
The training loader, its position and the training RNG streams are not touched.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from megatron.core import parallel_state

logger = logging.getLogger(__name__)

# Seeds the validation samples' ``sample_seed`` (``clip_seed_for(VALIDATION_SEED, position)``), from
# which the family draws the sample's noise.
VALIDATION_SEED = 0


def validation_source(cfg) -> tuple[Optional[str], str]:
    """(shards to validate on, or None when validation is off; why, for the log)."""
    from nemo_ext.training.data import held_out_sample_dir

    d = cfg.data
    if cfg.trainer.val_every_n_steps <= 0:
        return None, "trainer.val_every_n_steps=0"
    if d.val_path:
        return d.val_path, f"data.val_path={d.val_path}"
    if d.path or d.sources:
        return None, ("no held-out data: set data.val_path to validation shards (a held-out set is generated "
                      "only for the sample world)")
    return held_out_sample_dir(cfg), f"the held-out sample world {held_out_sample_dir(cfg)}"


def validation_microbatches(num_samples: int, micro_batch_size: int, global_batch_size: int, val_batches: int,
                            dp_rank: int, dp_size: int) -> list[list[tuple[int, int]]]:
    """This data-parallel rank's validation microbatches of ``(sample index, sample seed)``: the
    first ``val_batches`` global batches of the unshuffled stream, split over ranks as in training."""
    from nemo_ext.data.dataset import DataParallelBatchSampler

    sampler = DataParallelBatchSampler(num_samples, micro_batch_size, global_batch_size, dp_rank, dp_size,
                                       seed=VALIDATION_SEED, start_step=0, shuffle=False)
    return list(itertools.islice(iter(sampler), val_batches * sampler.micro_batches_per_step))


def build_val_dataloader(cfg, task, plan, path: str):
    """This rank's validation loader over ``path`` (one pass = one validation).

    Always the PyAV (or latent-shard) dataset, whatever ``data.backend``: validation sets are small
    and read a few batches at a time, where a DALI pipeline costs more to build than it saves, and
    the map-style dataset gives the fixed clip starts and order directly."""
    from nemo_ext.data.dataset import collate_clips
    from nemo_ext.data.shards import ShardError
    from nemo_ext.training.data import _dataset, ignore_preemption_signals

    d = cfg.data
    try:
        dataset = _dataset(cfg, task, plan, path, clip_sampling="start")
    except (ShardError, FileNotFoundError, ValueError) as exc:
        raise ShardError(f"validation data {path}: {exc} (set data.val_path, or trainer.val_every_n_steps=0)") from exc
    batches = validation_microbatches(len(dataset), d.micro_batch_size, d.global_batch_size, cfg.trainer.val_batches,
                                      parallel_state.get_data_parallel_rank(),
                                      parallel_state.get_data_parallel_world_size())
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=min(d.num_workers, len(batches)),  # started per validation, not kept
        collate_fn=collate_clips,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(VALIDATION_SEED),  # the global RNG stays the training's
        worker_init_fn=ignore_preemption_signals,
    )


class ValidationLoss(pl.Callback):
    """Runs the validation loss every ``trainer.val_every_n_steps`` steps and at the last step."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        self.loader = None
        self.history: list[dict] = []
        # Set once the run directory exists (as StepMetrics'); global rank 0 appends the rows.
        self.metrics_path: Optional[Path] = None

    def on_train_start(self, trainer, pl_module) -> None:
        path, why = validation_source(pl_module.cfg)
        if path is None:
            if trainer.is_global_zero:
                logger.info("validation is off: %s", why)
            return
        self.loader = build_val_dataloader(pl_module.cfg, pl_module.task, pl_module.plan, path)
        if trainer.is_global_zero:
            tr = pl_module.cfg.trainer
            logger.info("validation loss every %d steps and at step %d on %s: %d samples of %d", self.every,
                        trainer.max_steps, why, tr.val_batches * pl_module.cfg.data.global_batch_size,
                        len(self.loader.dataset))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.loader is None or (step % self.every and step != trainer.max_steps):
            return
        if trainer.should_stop and step != trainer.max_steps:
            return  # stopping early (a preemption signal): the checkpoint must not wait for this
        if self.history and self.history[-1]["step"] == step:
            return
        from nemo_ext.training.callbacks import StepMetrics

        start = time.perf_counter()
        loss, samples = pl_module.validation_loss(self.loader)
        for cb in trainer.callbacks:
            if isinstance(cb, StepMetrics):  # throughput and MFU count training steps only
                cb.exclude(time.perf_counter() - start)
        row = {"step": step, "val_loss": loss, "val_samples": samples}
        self.history.append(row)
        if trainer.is_global_zero:
            if self.metrics_path is not None:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            # At the step Lightning logs this step's train/* metrics at (its count before the increment).
            at = trainer.fit_loop.epoch_loop._batches_that_stepped
            for lg in trainer.loggers:
                lg.log_metrics({"val/loss": loss}, step=at)
            from nemo.utils import logging as nemo_logging

            nemo_logging.info(f"validation at step {step}: loss {loss:.4f} ({samples} samples)")
