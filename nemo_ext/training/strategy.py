"""``MegatronStrategy``: runs megatron-core models inside Lightning's Trainer.

NeMo 3 no longer ships a Megatron strategy; this is ours. It

* initializes torch.distributed (NCCL on GPU, gloo on CPU) from the launcher's environment
  (torchrun, or Slurm with one task per GPU mapped to RANK/LOCAL_RANK/WORLD_SIZE) and megatron's
  ``parallel_state`` with the TP/PP/CP layout of the ``parallel`` config;
* wraps the LightningModule's megatron model in megatron DDP and builds megatron's optimizer
  (``setup``), leaving the forward/backward schedule to the module's ``training_step`` (so pipeline
  parallelism works);
* saves and loads megatron ``dist_checkpointing`` sharded checkpoints, which reshard across
  layouts. A checkpoint is written into ``<dir>.partial`` and renamed when every rank has finished,
  so a directory ``step_<N>`` is always complete.

The process is started by the launcher, never by Lightning (no Lightning launcher).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy

logger = logging.getLogger(__name__)


class LauncherEnvironment(ClusterEnvironment):
    """Ranks from the launcher's variables (torchrun, or our Slurm mapping of SLURM_* to these)."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", "29500"))

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return int(os.environ.get("RANK", "0"))

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    def node_rank(self) -> int:
        return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))


def init_distributed(device: str, timeout_minutes: int = 30) -> None:
    """Idempotent process-group init; a single process without launcher variables gets world 1."""
    if dist.is_initialized():
        return
    if device == "cpu":
        from nemo_ext.utils import cpu_compat

        cpu_compat.enable()
    env = LauncherEnvironment()
    if env.world_size() == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # A lone process has no peer to meet: take any free port (an inherited MASTER_PORT may be
        # in use by the process that started us).
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if device == "cuda":
        torch.cuda.set_device(env.local_rank())
    dist.init_process_group(
        backend="nccl" if device == "cuda" else "gloo",
        rank=env.global_rank(),
        world_size=env.world_size(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def init_model_parallel(parallel_cfg, seed: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel_cfg.tp,
            pipeline_model_parallel_size=parallel_cfg.pp,
            context_parallel_size=parallel_cfg.cp,
        )
    # Same seed on every DP rank: identical weights before the first step; TP ranks get distinct
    # dropout streams from megatron's tracker.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MegatronStrategy(ParallelStrategy):
    strategy_name = "megatron"

    def __init__(self, parallel_cfg, device: str, seed: int):
        self._device_type = device
        env = LauncherEnvironment()
        root = torch.device("cuda", env.local_rank()) if device == "cuda" else torch.device("cpu")
        super().__init__(
            accelerator=None,
            parallel_devices=[root],
            cluster_environment=env,
            checkpoint_io=None,
            precision_plugin=Precision(),
        )
        self.parallel_cfg = parallel_cfg
        self.seed = seed
        self._launcher = None
        self._model_sharded_sd = None

    # ---- environment ----
    @property
    def root_device(self) -> torch.device:
        return self.parallel_devices[0]

    def _configure_launcher(self) -> None:
        self._launcher = None

    def setup_environment(self) -> None:
        init_distributed(self._device_type)
        init_model_parallel(self.parallel_cfg, self.seed)
        super().setup_environment()

    def setup(self, trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        self.accelerator.setup(trainer)
        module = self.lightning_module
        self.model = module
        self.model_to_device()
        module.wrap_ddp()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            module.connect_megatron_hooks()

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init=None):
        """Build on the CPU (megatron's use_cpu_initialization splits master weights there); setup
        moves the module to the device. Lightning's default would make CUDA the default device."""
        yield

    def model_to_device(self) -> None:
        self.lightning_module.to(self.root_device)

    # ---- collectives ----
    def barrier(self, name: Optional[str] = None) -> None:
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj, src: int = 0):
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def reduce(self, tensor, group=None, reduce_op="mean"):
        if not isinstance(tensor, torch.Tensor) or not dist.is_initialized() or dist.get_world_size() == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        if reduce_op in ("mean", "avg") or str(reduce_op).lower().endswith("mean"):
            out = out / dist.get_world_size(group)
        return out

    # ---- checkpoints: megatron dist_checkpointing ----
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the sharded template needs the built model and optimizer

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True  # microbatches are megatron's schedule's business

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        self._model_sharded_sd = self.lightning_module.sharded_state_dict()
        return self._model_sharded_sd

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)
        model_sd = self._model_sharded_sd or self.lightning_module.sharded_state_dict()
        return inner.sharded_state_dict(model_sd, is_loading=False)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options=None) -> None:
        from megatron.core import dist_checkpointing

        # A LoRA run on a random base writes that base once, before its first adapter checkpoint.
        self.lightning_module.save_random_base()
        final = Path(filepath)
        partial = final.with_name(final.name + ".partial")
        if self.is_global_zero:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        self.barrier()
        dist_checkpointing.save(checkpoint, str(partial), content_metadata=self.content_metadata())
        self.barrier()
        if self.is_global_zero:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        self.barrier()
        self._model_sharded_sd = None

    def content_metadata(self) -> Dict[str, Any]:
        """What a checkpoint's layout and optimizer-state format depend on (stored with it)."""
        from megatron.core import parallel_state

        module = self.lightning_module
        return {
            "tp": self.parallel_cfg.tp,
            "pp": self.parallel_cfg.pp,
            "cp": self.parallel_cfg.cp,
            "dp": parallel_state.get_data_parallel_world_size(),
            "distributed_optimizer": bool(self.parallel_cfg.distributed_optimizer),
            "precision": str(module.plan.dtype).replace("torch.", ""),
            "optimizer": module.cfg.optim.name,
            "model": dataclasses.asdict(module.cfg.model),
            "ema": module.ema is not None,
            "data_state": module._loader is not None,
            # strategy=lora: the checkpoint holds the adapters (+ fully trained modules) of this base.
            "strategy": dataclasses.asdict(module.cfg.strategy),
            "base": str(module.lora_base) if module.lora and module.lora_base is not None else None,
            "parameters": dict(module.parameter_counts),
        }

    # Strategy settings a checkpoint's tensors depend on (the dropout does not change them).
    STRATEGY_KEYS = ("name", "rank", "alpha", "target_modules", "trainable_modules")

    def _check_strategy(self, path: Path, saved: Dict[str, Any]) -> None:
        """A run resumes only with the strategy it was written with (LoRA: same adapters, on the
        same base)."""
        from nemo_ext.training.checkpoint import checkpoint_strategy

        module = self.lightning_module
        before, now = checkpoint_strategy(saved), dataclasses.asdict(module.cfg.strategy)
        keys = self.STRATEGY_KEYS if now["name"] == "lora" and before.get("name") == "lora" else ("name",)
        diffs = [f"strategy.{k}: checkpoint {before.get(k)} vs now {now[k]}" for k in keys if before.get(k) != now[k]]
        if diffs:
            raise RuntimeError(
                f"cannot resume {path}: " + "; ".join(diffs) + ". Keep those settings to resume, or start a new run "
                f"(run_name=...) with trainer.init_from={path}"
                + (" after merging its adapters (python -m nemo_ext.cli.convert merge)" if before.get("name") == "lora" else "")
            )
        if now["name"] != "lora":
            return
        if module.lora_base is None and saved.get("base"):
            raise RuntimeError(f"cannot resume {path}: its adapters were trained on the base {saved['base']}, "
                               f"but this run has no trainer.init_from and no {module.random_base_dir}")
        if saved.get("base") and module.lora_base is not None and Path(saved["base"]).resolve() != Path(module.lora_base):
            logger.warning("resuming the adapters of %s, trained on the base %s, on the base %s (trainer.init_from)",
                           path, saved["base"], module.lora_base)

    def _check_optimizer_format(self, path: Path) -> None:
        """Model weights reshard across any layout; megatron's optimizer-state formats differ by
        optimizer kind and precision, so a change of those cannot resume the optimizer."""
        from megatron.core import dist_checkpointing

        saved = dist_checkpointing.load_content_metadata(str(path)) or {}
        current = self.content_metadata()
        keys = {"distributed_optimizer": "parallel.distributed_optimizer", "precision": "trainer.precision",
                "optimizer": "optim.name"}
        diffs = [f"{name}: checkpoint {saved[k]} vs now {current[k]}" for k, name in keys.items()
                 if k in saved and saved[k] != current[k]]
        if diffs:
            raise RuntimeError(
                f"cannot resume the optimizer state of {path}: " + "; ".join(diffs) + ". Keep those settings to "
                "resume, or start a new run (run_name=...) from its weights with trainer.init_from=" + str(path)
            )

    def load_checkpoint(self, checkpoint_path) -> Dict[str, Any]:
        from megatron.core import dist_checkpointing, parallel_state

        path = Path(checkpoint_path).resolve()
        if not (path / "metadata.json").is_file():
            raise FileNotFoundError(f"{checkpoint_path} is not a complete checkpoint (no metadata.json)")
        saved = dist_checkpointing.load_content_metadata(str(path)) or {}
        self._check_strategy(path, saved)
        if self.lightning_restore_optimizer and self.optimizers:
            self._check_optimizer_format(path)
        module = self.lightning_module
        model_sd = module.sharded_state_dict()
        template: Dict[str, Any] = {"state_dict": model_sd}
        if self.lightning_restore_optimizer and self.optimizers:
            template["optimizer_states"] = [
                getattr(opt, "_optimizer", opt).sharded_state_dict(model_sd, is_loading=True) for opt in self.optimizers
            ]
        if module.ema is not None and saved.get("ema"):
            template["ema"] = module.ema.sharded_state_dict(model_sd)
        # The DALI loader's reader positions (the PyAV loader derives its position from the step).
        if self.lightning_restore_optimizer and saved.get("data_state"):
            if saved.get("dp") == parallel_state.get_data_parallel_world_size():
                template["data_state"] = module.data_state_template()
            elif module.cfg.data.backend != "pyav":
                logger.warning(
                    "the checkpoint's DALI reader positions are for %s data-parallel ranks, this run has %s: "
                    "the readers start over (samples already seen may come again)",
                    saved.get("dp"), parallel_state.get_data_parallel_world_size())
        logger.info("loading checkpoint %s", path)
        return dist_checkpointing.load(template, str(path))

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        self.lightning_module.load_megatron_state_dict(checkpoint["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for opt, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            getattr(opt, "_optimizer", opt).load_state_dict(state)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)
