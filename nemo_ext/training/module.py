"""The Lightning module every model family trains with (one training loop for all of them).

One ``training_step`` is one optimizer step over a global batch: it pulls this data-parallel
rank's microbatches from the loader, lets megatron's forward/backward schedule run them (1F1B
under pipeline parallelism), then steps megatron's optimizer and the LR schedule. A family
subclass provides the model (``build_world_model``), how a loader batch becomes a microbatch
(``prepare_microbatch``; with ``validation=True`` for the held-out batches: fixed draws, no caption
dropout) and the forward pass with its loss (``forward_step``). ``validation_loss`` runs the same
forward pass, forward only, on held-out data (see ``nemo_ext.training.validation``).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import lightning.pytorch as pl
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_ext.tasks import get_task

logger = logging.getLogger(__name__)


class _Microbatches:
    """The iterator megatron's schedule pulls microbatches from: raw loader batches, counted and
    prepared (moved to the device, encoded, noised) on the way."""

    def __init__(self, source, prepare, count: int, account):
        self.source, self.prepare, self.count, self.account, self.index = source, prepare, count, account, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.count:
            raise StopIteration
        raw = next(self.source)
        if isinstance(raw, tuple):  # Lightning's dataloader_iter yields (batch, batch_idx, dataloader_idx)
            raw = raw[0]
        self.account(raw)
        out = self.prepare(raw, self.index)
        self.index += 1
        return out


def _rng_states() -> dict:
    """Every RNG state a training step may draw from: torch (CPU, CUDA), megatron's tracker
    streams (dropout per TP rank), Python and NumPy."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "tracker": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tracker.get_states().items()},
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_states(states: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    if states["tracker"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


class DataAccounting:
    """Samples seen per source and corrupt samples skipped by the loader (this rank), with the
    run-stopping threshold of ``data.max_failed_samples`` / ``data.max_failed_fraction``."""

    def __init__(self, max_failed: int, max_fraction: float):
        self.max_failed, self.max_fraction = max_failed, max_fraction
        self.seen = 0
        self.failed = 0
        self.per_source: dict[str, int] = {}

    def __call__(self, raw: dict) -> None:
        n = len(raw["key"]) if "key" in raw else 1
        self.seen += n
        failed = raw.get("failed_samples")
        self.failed += int(failed.sum()) if isinstance(failed, torch.Tensor) else int(failed or 0)
        for name in raw.get("source") or ["data"] * n:
            self.per_source[name] = self.per_source.get(name, 0) + 1
        too_many = self.failed > self.max_failed
        too_often = self.seen >= 100 and self.failed > self.max_fraction * (self.seen + self.failed)
        if too_many or too_often:
            raise RuntimeError(
                f"{self.failed} corrupt videos skipped after {self.seen} samples on this rank, over "
                + ("data.max_failed_samples" if too_many else "data.max_failed_fraction")
                + " (see the warnings above for which ones; fix or re-prepare those shards)"
            )


class WorldModelModule(pl.LightningModule):
    def __init__(self, cfg, plan):
        super().__init__()
        self.cfg = cfg
        self.plan = plan
        self.automatic_optimization = False
        self.task = get_task(cfg.task.name)
        self.world_model: Optional[torch.nn.Module] = None
        self._chunks: list = []
        self.last_stats: dict = {}
        self._nonfinite_steps = 0
        self.ema = None
        self.data_accounting = DataAccounting(cfg.data.max_failed_samples, cfg.data.max_failed_fraction)
        self._loader = None  # the training loader, when it has a position to checkpoint (DALI)
        self._loader_states: Optional[dict] = None  # that position, restored from a checkpoint
        # The frozen base a LoRA run trains on: trainer.init_from's full-weights checkpoint, or (None)
        # a random base, written to `random_base_dir` with the run's first checkpoint.
        self.lora_base = None
        self.parameter_counts: dict = {}

    # ---------------- model ----------------
    @property
    def lora(self) -> bool:
        return self.cfg.strategy.name == "lora"

    def configure_model(self) -> None:
        """Build the model, add LoRA adapters and freeze the base (``strategy=lora``), then load the
        starting weights: ``trainer.init_from``, or for a LoRA run without one its random base saved
        at the first checkpoint (``<run>/base``), when resuming. The same path for both families."""
        if self.world_model is not None:
            return
        from nemo_ext.training.checkpoint import load_weights

        self.world_model = self.build_world_model()
        if self.lora:
            self._apply_lora()
        if self.cfg.trainer.init_from:
            self.lora_base = load_weights(self, self.cfg.trainer.init_from)
        elif self.lora and (self.random_base_dir / "metadata.json").is_file():
            self.lora_base = load_weights(self, str(self.random_base_dir))
        elif self.lora:
            logger.warning(
                "strategy=lora on a randomly initialized base (trainer.init_from is not set): this exercises the "
                "plumbing only; LoRA post-trains a pretrained model (convert import it, then trainer.init_from=<dir>). "
                "A fresh DiT's AdaLN-Zero gates are zero, so its adapters get no gradient at all.")
        from nemo_ext.models.lora import describe, parameter_counts

        trainable, total = parameter_counts(self.world_model)
        self.parameter_counts = {"trainable": trainable, "total": total}
        logger.info("strategy=%s: %s", self.cfg.strategy.name, describe(trainable, total))

    @property
    def random_base_dir(self):
        return self.plan.run_dir / "base"

    def _apply_lora(self) -> None:
        from nemo_ext.config.compose import ConfigError
        from nemo_ext.models.lora import apply_lora, freeze_base, role_of

        st = self.cfg.strategy
        adapters = apply_lora(self.world_model, st.rank, st.alpha, st.dropout, st.target_modules, seed=self.cfg.trainer.seed)
        unmatched = freeze_base(self.world_model, st.trainable_modules)
        unmatched = self._unmatched_on_every_stage(unmatched, st.trainable_modules)
        if unmatched:
            names = sorted({n.split(".")[0] if n.startswith("conditioner") else ".".join(n.split(".")[:2])
                            for n, _ in self.world_model.named_modules() if n})
            raise ConfigError(f"strategy.trainable_modules: {unmatched} match no module of the model; its modules "
                              f"include {names} (fnmatch on dotted names, e.g. 'conditioner', 'net.final_layer*')")
        if not any(p.requires_grad for p in self.world_model.parameters()):
            raise ConfigError("strategy=lora: nothing to train on this pipeline stage (no adapter matched "
                              "strategy.target_modules and no module strategy.trainable_modules)")
        logger.info("LoRA: rank %d, alpha %g on %d linears of this stage (%s); trained fully: %s",
                    st.rank, st.alpha, len(adapters), ", ".join(sorted({role_of(n) for n in adapters})),
                    st.trainable_modules or "nothing else")

    @staticmethod
    def _unmatched_on_every_stage(unmatched: list, patterns: list) -> list:
        """Patterns that match no module on any pipeline stage (a stage lacks the others' modules)."""
        if parallel_state.get_pipeline_model_parallel_world_size() <= 1 or not patterns:
            return unmatched
        flags = torch.tensor([1.0 if p in unmatched else 0.0 for p in patterns],
                             device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN,
                                     group=parallel_state.get_pipeline_model_parallel_group())
        return [p for p, f in zip(patterns, flags.tolist()) if f > 0]

    def build_world_model(self) -> torch.nn.Module:
        """The trained megatron model (a WorldModel) of this pipeline stage; frozen helpers
        (tokenizers, text encoders) are attached to ``self`` here too."""
        raise NotImplementedError

    def prepare_microbatch(self, raw: dict, index: int, validation: bool = False) -> dict:
        """A loader batch -> the model's inputs on this rank's device. ``validation``: a held-out
        batch, whose random draws (noise, ...) must depend on ``raw["sample_seed"]`` only, with
        training-only augmentation (caption dropout, ...) off."""
        raise NotImplementedError

    def forward_step(self, data_iterator, model):
        """megatron's forward step: (output, loss_func) for the next microbatch."""
        raise NotImplementedError

    @staticmethod
    def task_entries(raw: dict, device, consumed: tuple) -> dict:
        """The loader batch's entries a family does not consume itself (the task's sidecars such as
        ``actions``, sample seeds, captions), tensors moved to ``device``."""
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in raw.items() if k not in consumed}

    def _text_context(self, raw: dict, dropped: list, device):
        """T5 context of the batch: precomputed embeddings or the frozen encoder's; a dropped
        caption (classifier-free guidance training) becomes the empty prompt's embedding."""
        if "context" in raw:
            context, mask = raw["context"].to(device), raw["context_mask"].to(device)
            if any(dropped):
                empty, empty_mask = self.text_encoder.encode([""], device)
                keep = torch.tensor(dropped, device=device).logical_not()
                context = torch.where(keep[:, None, None], context, empty)
                mask = torch.where(keep[:, None], mask, empty_mask)
            return context, mask
        captions = ["" if d else c for c, d in zip(raw["caption"], dropped)]
        return self.text_encoder.encode(captions, device)

    @property
    def compute_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.plan.device == "cuda" else torch.device("cpu")

    @property
    def megatron_config(self):
        return self.world_model.config

    def wrap_ddp(self) -> None:
        par = self.cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=par.overlap_grad_reduce,
            overlap_param_gather=par.overlap_param_gather,
            use_distributed_optimizer=par.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        self._chunks = [DistributedDataParallel(self.megatron_config, ddp_config, self.world_model)]
        for chunk in self._chunks:
            chunk.broadcast_params()  # identical replicas, whatever each rank initialized

    def connect_megatron_hooks(self) -> None:
        if self.cfg.trainer.ema_decay:
            from nemo_ext.training.ema import WeightEMA

            self.ema = WeightEMA(self.world_model, self.cfg.trainer.ema_decay)
        config = self.megatron_config
        opt = self.optimizers(use_pl_optimizer=False)
        config.grad_scale_func = opt.mcore.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self._chunks[0].no_sync
        if self.cfg.parallel.overlap_grad_reduce:
            config.grad_sync_func = self._chunks[0].start_grad_sync
        if self.cfg.parallel.overlap_param_gather and self.cfg.parallel.distributed_optimizer:
            config.param_sync_func = self._chunks[0].start_param_sync

    def sharded_state_dict(self) -> dict:
        """What a checkpoint of the run holds: the whole model, or with ``strategy=lora`` only what
        trains (adapters and the fully trained modules); the frozen base stays in its own checkpoint."""
        sd = self.full_sharded_state_dict()
        if self.lora:
            from nemo_ext.models.lora import trained_state_keys

            trained = {"model." + k for k in trained_state_keys(self.world_model, self.cfg.strategy.trainable_modules)}
            sd = {k: v for k, v in sd.items() if k in trained}
        return sd

    def full_sharded_state_dict(self) -> dict:
        return self.world_model.sharded_state_dict(prefix="model.")

    def save_random_base(self) -> None:
        """``strategy=lora`` without ``trainer.init_from``: write the (frozen, randomly initialized)
        base to ``<run>/base`` once, so that the run's adapter checkpoints can be resumed, sampled and
        merged. A collective (every rank calls it, from the strategy's checkpoint save)."""
        if not self.lora or self.lora_base is not None:
            return
        from nemo_ext.training.checkpoint import save_model_weights

        out = self.random_base_dir
        if not (out / "metadata.json").is_file():
            save_model_weights(self, out, source=f"random initialization (trainer.seed={self.cfg.trainer.seed}) "
                                                 f"of run {self.plan.run_dir}")
        self.lora_base = out.resolve()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.sharded_state_dict(checkpoint["state_dict"])
        if self._loader is not None:
            checkpoint["data_state"] = self.data_state_template(self._loader.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load(checkpoint["ema"])
        if "data_state" in checkpoint:
            self._loader_states = checkpoint["data_state"]

    @staticmethod
    def data_state_template(states: Optional[dict] = None):
        """The loader position of this data-parallel rank as one shard of a (dp,)-shaped object:
        each DP rank reads other samples, the TP/PP/CP ranks of one DP rank hold replicas."""
        from megatron.core.dist_checkpointing import ShardedObject

        ps = parallel_state
        return ShardedObject(
            "data_state", states, (ps.get_data_parallel_world_size(),), (ps.get_data_parallel_rank(),),
            replica_id=(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                        ps.get_context_parallel_rank()),
        )

    def load_megatron_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load loaded sharded-checkpoint tensors; ``strict``: everything ``sharded_state_dict``
        covers must be there (with LoRA, the adapters and fully trained modules only)."""
        inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        missing, unexpected = self.world_model.load_state_dict(inner, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if self.lora:
            expected = {k[len("model."):] for k in self.sharded_state_dict()}
            missing = [k for k in missing if k in expected]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")

    # ---------------- optimizer ----------------
    def configure_optimizers(self):
        from nemo_ext.training.optim import LRSchedule, build_optimizer

        opt = build_optimizer(self.cfg.optim, self.cfg.parallel, self._chunks, self.plan.dtype)
        sched = LRSchedule(opt, self.cfg.optim, self.cfg.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step(1)

    # ---------------- data ----------------
    def train_dataloader(self):
        from nemo_ext.training.data import build_train_dataloader

        loader = build_train_dataloader(self.cfg, self.task, self.plan, start_step=self.trainer.global_step,
                                        states=self._loader_states)
        self._loader = loader if hasattr(loader, "state_dict") and not isinstance(
            loader, torch.utils.data.DataLoader) else None
        return loader

    def training_step(self, dataloader_iter):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        for chunk in self._chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=_Microbatches(
                dataloader_iter, self.prepare_microbatch, self.plan.num_microbatches, self.data_accounting
            ),
            model=self._chunks,
            num_microbatches=self.plan.num_microbatches,
            seq_length=self.plan.num_tokens,
            micro_batch_size=self.cfg.data.micro_batch_size,
            forward_only=False,
        )
        opt.step()
        sched.step(1)
        if self.ema is not None:
            self.ema.update()
        loss = self._reduce_loss(losses)
        inner = opt.optimizer
        stats = {
            "loss": loss,
            "grad_norm": inner.last_grad_norm if inner.last_grad_norm is not None else float("nan"),
            "lr": sched.lr,
        }
        self.last_stats = stats
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=self.cfg.data.global_batch_size)
        self.log("train/grad_norm", stats["grad_norm"], on_step=True, batch_size=self.cfg.data.global_batch_size)
        self.log("train/lr", stats["lr"], on_step=True, batch_size=self.cfg.data.global_batch_size)
        return None

    def validation_loss(self, loader) -> tuple[float, int]:
        """Mean loss over the held-out samples of ``loader`` (this rank's share of the validation
        batches, ``nemo_ext.training.validation.build_val_dataloader``) and their number over all
        data-parallel ranks. A collective: every rank calls it at the same step.

        Megatron's schedule runs ``forward_step`` over the same model chunks, forward only, without
        grad, in eval mode; no optimizer state, gradient buffer or training loader is touched, and
        the RNG states are restored afterwards, so training goes on exactly as without it."""
        num_microbatches = len(loader)
        states = _rng_states()
        modes = [(m, m.training) for chunk in self._chunks for m in chunk.modules()]
        hooked = [chunk for chunk in self._chunks if getattr(chunk, "use_forward_hook", False)]
        for chunk in hooked:  # overlapped param all-gather: gather now, as megatron does for eval
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            for chunk in self._chunks:
                chunk.eval()
            with torch.no_grad():
                losses = get_forward_backward_func()(
                    forward_step_func=self.forward_step,
                    data_iterator=_Microbatches(
                        iter(loader), lambda raw, i: self.prepare_microbatch(raw, i, validation=True),
                        num_microbatches, lambda raw: None,
                    ),
                    model=self._chunks,
                    num_microbatches=num_microbatches,
                    seq_length=self.plan.num_tokens,
                    micro_batch_size=self.cfg.data.micro_batch_size,
                    forward_only=True,
                )
        finally:
            for module, training in modes:
                module.training = training
            for chunk in hooked:
                chunk.enable_forward_pre_hook()
            _set_rng_states(states)
        samples = num_microbatches * self.cfg.data.micro_batch_size * parallel_state.get_data_parallel_world_size()
        return self._reduce_loss(losses), samples

    def data_counts(self) -> dict[str, int]:
        """Samples seen per source and corrupt ones skipped, summed over data-parallel ranks
        (a collective: call it on every rank)."""
        acc = self.data_accounting
        names = sorted(acc.per_source)
        values = torch.tensor([acc.per_source[n] for n in names] + [acc.failed], dtype=torch.float64,
                              device=next(self.world_model.parameters()).device)
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        counts = {f"samples_from_{n}": int(v) for n, v in zip(names, values[:-1].tolist())}
        counts["failed_samples"] = int(values[-1].item())
        return counts

    def _reduce_loss(self, losses) -> float:
        """Mean microbatch loss on the last stage, shared with every rank (average over DP)."""
        value = torch.zeros(1, device=next(self.world_model.parameters()).device, dtype=torch.float32)
        if parallel_state.is_pipeline_last_stage() and losses:
            value += torch.stack([d["loss"].float() for d in losses]).mean()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= parallel_state.get_data_parallel_world_size()
        return float(value.item())

    def _check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            self._nonfinite_steps = 0
            return
        self._nonfinite_steps += 1
        logger.warning("step %d: loss is %s", self.global_step, loss)
        if self._nonfinite_steps >= self.cfg.trainer.max_nonfinite_steps:
            raise RuntimeError(
                f"loss was not finite for {self._nonfinite_steps} consecutive steps (trainer.max_nonfinite_steps); "
                "lower optim.lr or check the data"
            )
