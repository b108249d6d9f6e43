"""One training run: distributed init, sample data, Trainer + NeMo exp_manager, fit.

Used by ``python -m nemo_ext.cli.train`` and, in-process, by the tests (same code path at every
scale). The config has already been composed and validated (``make_plan``) when this starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_ext.config.plan import RunPlan
from nemo_ext.training.data import ensure_sample_data

logger = logging.getLogger(__name__)


def exp_manager_config(cfg, plan: RunPlan) -> dict:
    run_dir = plan.run_dir
    return {
        "exp_dir": str(run_dir.parent.parent),
        "name": run_dir.parent.name,
        "version": run_dir.name,
        "use_datetime_version": False,
        "resume_if_exists": cfg.trainer.resume,
        "resume_ignore_no_checkpoint": True,
        "create_tensorboard_logger": cfg.trainer.tensorboard,
        "create_wandb_logger": cfg.trainer.wandb,
        "wandb_logger_kwargs": {"project": cfg.trainer.wandb_project or "cosmos-recipes", "name": str(run_dir)},
        "create_checkpoint_callback": False,  # ours (RunCheckpoint) is added to the trainer directly
        "checkpoint_callback_params": {"dirpath": str(plan.checkpoint_dir)},
        "log_step_timing": False,  # StepMetrics logs step time with throughput and MFU
        "log_tflops_per_sec_per_gpu": False,
        "create_preemption_callback": False,
        "seconds_to_sleep": 0,
    }


def build_trainer(cfg, plan: RunPlan):
    import lightning.pytorch as pl

    from nemo_ext.training.callbacks import StepMetrics, StepProgressBar
    from nemo_ext.training.checkpoint import RunCheckpoint
    from nemo_ext.training.preemption import RunLifecycle
    from nemo_ext.training.strategy import MegatronStrategy
    from nemo_ext.training.validation import ValidationLoss

    strategy = MegatronStrategy(cfg.parallel, device=plan.device, seed=cfg.trainer.seed)
    checkpoints = cfg.trainer.checkpoint_every_n_steps > 0  # 0: none at all (benchmarks)
    callbacks = [
        StepMetrics(cfg.trainer.log_every_n_steps, cfg.data.global_batch_size, plan.flops_per_sample, plan.world_size),
        RunLifecycle(plan.run_dir, requeue=cfg.launcher.requeue),
    ]
    if checkpoints:
        callbacks.insert(0, RunCheckpoint(plan.checkpoint_dir, cfg.trainer.checkpoint_every_n_steps,
                                          cfg.trainer.keep_last_n_checkpoints, keep_best=cfg.trainer.keep_best_checkpoint))
    # After the preemption handler: a run stopping on a signal saves without validating first.
    callbacks.append(ValidationLoss(cfg.trainer.val_every_n_steps))
    if cfg.trainer.progress_bar:
        callbacks.append(StepProgressBar())
    return pl.Trainer(
        accelerator="gpu" if plan.device == "cuda" else "cpu",
        devices=1,
        num_nodes=1,
        strategy=strategy,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=checkpoints,  # with our RunCheckpoint in callbacks
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=True,
        use_distributed_sampler=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def family_module(family: str):
    """The Lightning module class of a model family (all share WorldModelModule's loop)."""
    if family == "diffusion":
        from nemo_ext.training.diffusion import DiffusionModule

        return DiffusionModule
    if family == "ar":
        from nemo_ext.training.ar import ARModule

        return ARModule
    raise ValueError(f"family={family!r}: no training module for this family yet")


class _quiet:
    def __init__(self, log):
        self.log, self.level = log, None

    def __enter__(self):
        self.level = self.log.getEffectiveLevel()
        self.log.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
        return False


def _show_our_logs() -> None:
    """INFO lines of the nemo_ext loggers on the console (global rank 0), in NeMo's style."""
    import os

    log = logging.getLogger("nemo_ext")
    if log.handlers or os.environ.get("RANK", "0") != "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[cosmos %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_training(cfg, plan: RunPlan, composed=None):
    """Train; returns the Trainer. ``composed`` (the DictConfig) is written to the run directory."""
    from nemo.utils import logging as nemo_logging
    from nemo.utils.exp_manager import exp_manager

    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    _show_our_logs()
    init_distributed(plan.device)
    init_model_parallel(cfg.parallel, cfg.trainer.seed)
    ensure_sample_data(cfg)

    trainer = build_trainer(cfg, plan)
    with _quiet(nemo_logging):  # exp_manager logs its whole schema at INFO
        log_dir = Path(exp_manager(trainer, exp_manager_config(cfg, plan)))
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter bucket listings etc.
    if trainer.is_global_zero:
        resumed = f"resuming from {Path(trainer.ckpt_path).resolve()}" if trainer.ckpt_path else "starting from scratch"
        nemo_logging.info(f"run directory {log_dir} ({resumed})")
    from nemo_ext.training.callbacks import StepMetrics
    from nemo_ext.training.validation import ValidationLoss

    for cb in trainer.callbacks:
        if isinstance(cb, (StepMetrics, ValidationLoss)):
            cb.metrics_path = log_dir / "metrics.jsonl"
    if trainer.is_global_zero:
        resolved = composed if composed is not None else OmegaConf.structured(cfg)
        (log_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    module = family_module(cfg.family)(cfg, plan)
    trainer.fit(module, ckpt_path=trainer.ckpt_path)
    return trainer
