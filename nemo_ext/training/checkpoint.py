"""Checkpoint layout of a run (DESIGN.md section 0) on top of NeMo's checkpoint callback.

``<run>/checkpoints/step_<N>/`` are megatron dist_checkpointing directories (the strategy writes
``step_<N>.partial`` and renames it once every rank is done); ``checkpoints/last`` is a symlink
that is swapped atomically (``os.replace``) only after a save has finished, so it never points at
a partial checkpoint. NeMo's ``NeMoModelCheckpoint`` provides retention (the newest
``trainer.keep_last_n_checkpoints``) and its unfinished-checkpoint markers; NeMo's exp_manager
finds ``checkpoints/last`` to resume (it matches ``*last`` directories).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint

from nemo_ext.models.dit.config import architecture_diff

logger = logging.getLogger(__name__)


class RunCheckpoint(NeMoModelCheckpoint):
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ""

    def __init__(self, dirpath, every_n_steps: int, keep_last_n: int):
        super().__init__(
            dirpath=str(dirpath),
            filename="step_{step}",
            monitor="step",
            mode="max",
            save_top_k=keep_last_n,
            save_last="link",
            every_n_train_steps=every_n_steps,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
            save_nemo_on_train_end=False,
            always_save_nemo=False,
            verbose=False,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and os.path.isdir(self.dirpath):
            for partial in Path(self.dirpath).glob("*.partial"):
                logger.warning("removing incomplete checkpoint %s (interrupted save)", partial)
                shutil.rmtree(partial, ignore_errors=True)
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero:
            tmp = f"{linkpath}.tmp"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            os.replace(tmp, linkpath)
            logger.info("checkpoint %s (last -> %s)", filepath, os.path.basename(filepath))
        trainer.strategy.barrier()

    def on_train_end(self, trainer, pl_module) -> None:
        """Always leave a checkpoint of the final step (max_steps need not be a multiple of
        the checkpoint interval)."""
        if trainer.global_step == 0 or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        final = self.format_checkpoint_name(candidates)
        if self._last_global_step_saved != trainer.global_step and not os.path.isdir(final):
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def resolve_checkpoint(path: str) -> Path:
    """A run dir, a checkpoints dir, a checkpoint dir or ``.../last`` -> the checkpoint directory."""
    p = Path(path)
    for candidate in (p, p / "checkpoints" / "last", p / "last"):
        if (candidate / "metadata.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a checkpoint directory (with metadata.json), a run directory "
        "or a checkpoints/ directory holding 'last'"
    )


def load_weights(module, path: str) -> None:
    """Model weights only (no optimizer/loop state) from a checkpoint, at this run's layout.

    The checkpoint may come from another run or from ``convert import``: modules it does not have
    that a task adds (``conditioner.*``, new and zero-initialized by design) keep their init;
    anything else missing, or an architecture that differs, is an error naming it."""
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ckpt = resolve_checkpoint(path)
    saved = (dist_checkpointing.load_content_metadata(str(ckpt)) or {}).get("model")
    if saved:
        diffs = architecture_diff(saved, module.cfg.model.architecture())
        if diffs:
            raise ValueError(
                f"trainer.init_from={path}: the checkpoint's model (first) differs from this run's model: " + "; ".join(diffs)
            )
    available = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    template = {}
    fresh = []
    for key, value in module.sharded_state_dict().items():
        if isinstance(value, ShardedObject):  # _extra_state: nothing to load for weights
            continue
        if value.key in available:
            template[key] = value
        elif key.startswith("model.conditioner."):
            fresh.append(key)
        else:
            raise ValueError(f"trainer.init_from={path}: the checkpoint has no tensor {value.key!r}")
    logger.info("initializing weights from %s%s", ckpt, f" ({len(fresh)} new task tensors keep their init)" if fresh else "")
    loaded = dist_checkpointing.load({"state_dict": template}, str(ckpt))
    module.load_megatron_state_dict(loaded["state_dict"], strict=False)
