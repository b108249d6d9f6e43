"""Run lifecycle: ``<run>/status.json`` and preemption handling.

Slurm warns a job before its time limit (``--signal=USR1@120``) and sends SIGTERM before killing it
(preemption, ``scancel``). Either signal makes the trainer finish the current step, save a checkpoint
of that step through the run's checkpoint callback (atomic: ``checkpoints/last`` moves only after
every rank has finished writing), and stop cleanly. With ``launcher.requeue`` and SIGUSR1 inside a
Slurm job, global rank 0 then puts the job back in the queue (``scontrol requeue``); the restarted
job runs the same command, which resumes from ``checkpoints/last``.

The signal handlers only set a flag (no I/O in a handler). After every step the ranks agree on it
(a max-reduce over a gloo group: no GPU sync), so all of them save at the same step even when the
signal reached only some of them.

``status.json`` (global rank 0) says what a run is doing: ``running``, ``completed``, ``preempted``
(a checkpoint of ``step`` was saved; ``requeued`` says whether the job went back to the queue) or
``failed`` (with the error). Sweep reports read it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job_ref() -> Optional[str]:
    """This Slurm job as ``scontrol`` names it: ``<array job>_<task>`` for an array task."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def write_status(run_dir: Path, state: str, **fields) -> None:
    """Atomically replace ``<run_dir>/status.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "state": state,
        **fields,
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        "slurm_job": slurm_job_ref(),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
    }
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / "status.json")


def read_status(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunLifecycle(pl.Callback):
    """status.json + save-and-stop on SIGUSR1/SIGTERM (+ Slurm requeue)."""

    def __init__(self, run_dir: Path, requeue: bool):
        self.run_dir = Path(run_dir)
        self.requeue = requeue
        self.received: Optional[int] = None  # the signal number, set by the handler
        self.stopped_at: Optional[int] = None  # the step whose checkpoint was saved on a signal
        self._group = None
        self._previous: dict = {}

    # ---- signals ----
    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installed its own SIGTERM handler (it raises and kills the run without a
        # checkpoint) before this hook: ours replaces it for the training loop; the previous
        # handlers come back in teardown.
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # a CPU flag exchange: no device sync
        if trainer.is_global_zero:
            write_status(self.run_dir, "running", step=trainer.global_step, max_steps=trainer.max_steps)

    def _agreed_signal(self) -> int:
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal()
        if not signum or self.stopped_at is not None:
            return
        self.received = signum
        step = trainer.global_step
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            logger.warning("received %s: saving a checkpoint of step %d and stopping", name, step)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and step > 0:
            candidates = ckpt._monitor_candidates(trainer)
            if ckpt._last_global_step_saved != step:
                ckpt._save_topk_checkpoint(trainer, candidates)
                ckpt._save_last_checkpoint(trainer, candidates)
        self.stopped_at = step
        trainer.should_stop = True

    # ---- end of the run ----
    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self.stopped_at is None:
            write_status(self.run_dir, "completed", step=trainer.global_step, max_steps=trainer.max_steps)
            return
        requeued = False
        job = slurm_job_ref()
        if self.requeue and self.received == signal.SIGUSR1 and job:
            # The job is killed by the requeue and starts again with the same command (resuming
            # from checkpoints/last); the checkpoint is complete by now.
            write_status(self.run_dir, "preempted", step=self.stopped_at, max_steps=trainer.max_steps,
                         signal="SIGUSR1", requeued=True)
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = result.returncode == 0
            if requeued:
                logger.warning("requeued Slurm job %s: it resumes from step %d", job, self.stopped_at)
            else:
                logger.error("scontrol requeue %s failed: %s", job, (result.stderr or result.stdout).strip())
        if not requeued:
            write_status(self.run_dir, "preempted", step=self.stopped_at, max_steps=trainer.max_steps,
                         signal=signal.Signals(self.received).name, requeued=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.is_global_zero:
            write_status(self.run_dir, "failed", step=trainer.global_step, max_steps=trainer.max_steps,
                         error=f"{type(exception).__name__}: {exception}"[:2000])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
