"""Checkpoint layout of a run (DESIGN.md section 0) on top of NeMo's checkpoint callback.

``<run>/checkpoints/step_<N>/`` are megatron dist_checkpointing directories (the strategy writes
``step_<N>.partial`` and renames it once every rank is done); ``checkpoints/last`` is a symlink
that is swapped atomically (``os.replace``) only after a save has finished, so it never points at
a partial checkpoint. NeMo's ``NeMoModelCheckpoint`` provides retention (the newest
``trainer.keep_last_n_checkpoints``) and its unfinished-checkpoint markers; NeMo's exp_manager
finds ``checkpoints/last`` to resume (it matches ``*last`` directories).

With ``trainer.keep_best_checkpoint``, ``checkpoints/best`` is a symlink (swapped the same way) to
``best_step_<N>/``: a tree of hard links to the files of the checkpoint with the lowest validation
loss so far (a copy where the filesystem has no hard links), so retention may delete ``step_<N>``
and the best weights stay; ``checkpoints/best.json`` holds its step and loss (read on resume).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint

from nemo_ext.models.dit.config import architecture_diff

logger = logging.getLogger(__name__)


class RunCheckpoint(NeMoModelCheckpoint):
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ""

    CHECKPOINT_NAME_BEST = "best"

    def __init__(self, dirpath, every_n_steps: int, keep_last_n: int, keep_best: bool = False):
        self.keep_best = keep_best
        self.best: Optional[dict] = None  # {"step", "val_loss", "checkpoint"} of checkpoints/best
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
        record = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_BEST}.json"
        if self.keep_best and record.is_file():  # a resumed run: the best so far stays the one to beat
            best = json.loads(record.read_text())
            if (Path(self.dirpath) / best["checkpoint"] / "metadata.json").is_file():
                self.best = best
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_best:
            self._update_best(trainer, filepath)

    def _update_best(self, trainer, filepath: str) -> None:
        """After a complete save at a step that also validated: a lower loss than the best so far
        becomes checkpoints/best (rank 0 writes; every rank agrees on the loss, all-reduced)."""
        from nemo_ext.training.validation import ValidationLoss

        val = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationLoss)), None)
        step = trainer.global_step
        if val is None or not val.history or val.history[-1]["step"] != step:
            return
        loss = float(val.history[-1]["val_loss"])
        if self.best is not None and not loss < self.best["val_loss"]:
            return
        best = {"step": step, "val_loss": loss, "checkpoint": f"best_step_{step}"}
        if trainer.is_global_zero:
            _publish_best(Path(self.dirpath), Path(filepath), best, self.best, self.CHECKPOINT_NAME_BEST)
            logger.info("best validation loss so far %.4f at step %d (%s -> %s)", loss, step,
                        self.CHECKPOINT_NAME_BEST, best["checkpoint"])
        self.best = best
        trainer.strategy.barrier()

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero:
            _swap_symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), linkpath)
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


def _swap_symlink(target: str, linkpath: str) -> None:
    """Point ``linkpath`` at ``target`` atomically (a new link renamed over the old one)."""
    tmp = f"{linkpath}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, linkpath)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another device, some network filesystems): copy
        shutil.copy2(src, dst)


def _publish_best(ckpt_dir: Path, source: Path, best: dict, previous: Optional[dict], link_name: str) -> None:
    """``source`` (a complete checkpoint) -> ``best_step_<N>`` (hard links, built as ``.partial``
    and renamed), then ``best.json`` and the ``best`` symlink swapped atomically, then the previous
    best's tree removed: an interruption leaves the previous best or the new one, never half."""
    target = ckpt_dir / best["checkpoint"]
    partial = ckpt_dir / f"{best['checkpoint']}.partial"
    for stale in (partial, target):
        if stale.exists():
            shutil.rmtree(stale)
    shutil.copytree(source, partial, copy_function=_link_or_copy, symlinks=True)
    os.replace(partial, target)
    record = ckpt_dir / f"{link_name}.json"
    tmp = ckpt_dir / f"{link_name}.json.tmp"
    tmp.write_text(json.dumps(best) + "\n")
    os.replace(tmp, record)
    _swap_symlink(best["checkpoint"], str(ckpt_dir / link_name))
    if previous is not None and previous["checkpoint"] != best["checkpoint"]:
        shutil.rmtree(ckpt_dir / previous["checkpoint"], ignore_errors=True)


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


def checkpoint_strategy(meta: dict) -> dict:
    """The ``strategy`` a checkpoint was written with (its content metadata; older ones: full)."""
    return meta.get("strategy") or {"name": "full"}


def lora_base_of(ckpt: Path, meta: dict) -> Path:
    """The full-weights checkpoint an adapter checkpoint was trained on (its metadata's ``base``)."""
    base = meta.get("base")
    if not base:
        raise ValueError(f"{ckpt} holds LoRA adapters but does not record their base checkpoint")
    try:
        return resolve_checkpoint(base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{ckpt} holds LoRA adapters trained on the base checkpoint {base}, which is missing; restore it "
            "(or merge with python -m nemo_ext.cli.convert merge --base <its new place>)"
        ) from None


def load_weights(module, path: str) -> Optional[Path]:
    """Model weights only (no optimizer/loop state) from a checkpoint, at this run's layout.
    Returns the checkpoint the frozen base weights came from (for ``strategy=lora``).

    The checkpoint may come from another run or from ``convert import``: modules it does not have
    that a task adds (``conditioner.*``, new and zero-initialized by design) and LoRA adapters
    (zero-initialized ``B``: the base function) keep their init; anything else missing, or an
    architecture that differs, is an error naming it. An adapter checkpoint of a LoRA run loads as
    its base checkpoint (recorded in its metadata) plus its adapters, into a LoRA model."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint(path)
    meta = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
    saved = meta.get("model")
    if saved:
        diffs = architecture_diff(saved, module.cfg.model.architecture())
        if diffs:
            raise ValueError(
                f"trainer.init_from={path}: the checkpoint's model (first) differs from this run's model: " + "; ".join(diffs)
            )
    if checkpoint_strategy(meta).get("name") == "lora":
        if not module.lora:
            raise ValueError(
                f"trainer.init_from={path} holds LoRA adapters, this run has strategy={module.cfg.strategy.name}: "
                f"fold them into their base first (python -m nemo_ext.cli.convert merge --from {path} --to <dir>) "
                "and start from that"
            )
        base = load_weights(module, str(lora_base_of(ckpt, meta)))
        _load_tensors(module, ckpt, module.sharded_state_dict(), path, fresh=lambda key: False)
        logger.info("with the LoRA adapters of %s", ckpt)
        return base
    adapters = {"model." + n + "." for n in lora_adapter_names(module)}
    _load_tensors(module, ckpt, module.full_sharded_state_dict(), path,
                  fresh=lambda key: key.startswith("model.conditioner.") or key.startswith(tuple(adapters)))
    return ckpt


def lora_adapter_names(module) -> list[str]:
    from nemo_ext.models.lora import ADAPTER_SUFFIX, adapters_of

    return [name + ADAPTER_SUFFIX for name in adapters_of(module.world_model)] if module.world_model is not None else []


def widenable_keys(module) -> set[str]:
    """Sharded-state keys of the weights the model declares as input-widened (``input_widened`` of its
    network, e.g. the DiT's patch embedding): a checkpoint may hold them with fewer input columns."""
    net = getattr(module.world_model, "net", None) if module.world_model is not None else None
    return {f"model.net.{name}" for name in getattr(net, "input_widened", ())}


def _load_tensors(module, ckpt: Path, sharded: dict, path: str, fresh) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    widenable = widenable_keys(module)
    template, widened = {}, {}
    kept = []
    for key, value in sharded.items():
        if isinstance(value, ShardedObject):  # _extra_state: nothing to load for weights
            continue
        if value.key in saved:
            # a factory (e.g. megatron's split embeddings) builds its own tensors: no shape to compare here
            size = tuple(getattr(saved[value.key], "size", ())) if isinstance(value, ShardedTensor) else None
            if size and size != tuple(value.global_shape):
                shape = tuple(value.global_shape)
                if not (key in widenable and len(size) == 2 and size[0] == shape[0] and size[1] < shape[1]
                        and tuple(value.local_shape) == shape):
                    raise ValueError(f"trainer.init_from={path}: tensor {value.key!r} has shape {list(size)} in the "
                                     f"checkpoint, {list(shape)} in this model")
                # fewer input channels (a base without the task's extra channels): load those, widen after
                widened[key] = (size, value)
                value = ShardedTensor.from_rank_offsets(value.key, torch.zeros(size, dtype=value.data.dtype,
                                                                              device=value.data.device),
                                                        replica_id=value.replica_id)
            template[key] = value
        elif fresh(key):
            kept.append(key)
        else:
            raise ValueError(f"trainer.init_from={path}: the checkpoint has no tensor {value.key!r}")
    notes = [f"{len(kept)} new tensors keep their init"] if kept else []
    notes += [f"{value.key} widened from {size[1]} to {value.global_shape[1]} input columns (new ones zero)"
              for size, value in widened.values()]
    logger.info("initializing weights from %s%s", ckpt, f" ({'; '.join(notes)})" if notes else "")
    loaded = dist_checkpointing.load({"state_dict": template}, str(ckpt))["state_dict"]
    for key, (size, value) in widened.items():
        wide = torch.zeros(value.global_shape, dtype=loaded[key].dtype, device=loaded[key].device)
        wide[:, :size[1]] = loaded[key]
        loaded[key] = wide
    module.load_megatron_state_dict(loaded, strict=False)


def save_model_weights(module, out_dir: Path, source: str) -> None:
    """The model without its LoRA adapters as a normal model checkpoint (like ``convert import``
    writes): a collective over every rank; written to ``<out_dir>.partial``, renamed when complete."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    adapters = tuple("model." + n + "." for n in lora_adapter_names(module))
    sd = {k: v for k, v in module.full_sharded_state_dict().items()
          if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and not k.startswith(adapters)}
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save({"state_dict": sd}, str(partial),
                            content_metadata={"model": dataclasses.asdict(module.cfg.model), "source": source})
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        os.replace(partial, out_dir)
        logger.info("wrote the LoRA run's base weights to %s", out_dir)
    if dist.is_initialized():
        dist.barrier()
