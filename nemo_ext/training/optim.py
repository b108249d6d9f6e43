"""megatron's optimizer and LR schedule, adapted to Lightning.

Lightning's loop expects a ``torch.optim.Optimizer``; megatron's optimizer (fp32 main params for
bf16 models, grad clipping over the model-parallel groups, the distributed optimizer) is not one.
:class:`MegatronOptimizer` is the thin adapter: ``param_groups`` is megatron's (so LR monitors and
the scheduler see the real values), ``step`` runs megatron's step and records the grad norm.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


class MegatronOptimizer(torch.optim.Optimizer):
    def __init__(self, mcore_optimizer, fused: bool = False):
        # torch.optim.Optimizer.__init__ needs params; we delegate everything to megatron's.
        self.mcore = mcore_optimizer
        self.defaults = {}
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self.last_grad_norm: Optional[float] = None
        self.last_update_ok = True
        self.fused = fused  # optim.fused: keep torch's fused Adam kernel across load_state_dict

    @property
    def param_groups(self):
        return self.mcore.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.mcore.param_groups = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mcore.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            closure()
        ok, grad_norm, _ = self.mcore.step()
        self.last_update_ok = bool(ok)
        self.last_grad_norm = float(grad_norm) if grad_norm is not None else None
        return ok

    def state_dict(self):
        return self.mcore.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.mcore.load_state_dict(state_dict)
        if self.fused:
            # torch's load_state_dict takes the param groups' flags from the checkpoint: one saved
            # by the multi-tensor implementation would silently turn the fused kernel off
            _use_fused_torch_adam(self.mcore)
        self._unshare_adam_steps()

    def _torch_adams_of_distributed_optimizers(self):
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        return (inner for opt, inner in _torch_adams(self.mcore) if isinstance(opt, DistributedOptimizer))

    def _unshare_adam_steps(self) -> None:
        """megatron-core 0.19's distributed optimizer restores torch Adam's per-parameter ``step``
        as ONE tensor shared by every parameter; Adam increments it in place per parameter, so
        after a resume the bias correction used step counts far too high (measured: updates 20-80%
        too small at the first resumed step). Give every parameter its own copy (for a fused group:
        float32 on the parameter's device, where the fused kernel reads it)."""
        for _, inner in _torch_adams(self.mcore):
            for group in inner.param_groups:
                for p in group["params"]:
                    step = inner.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor):
                        inner.state[p]["step"] = (step.to(device=p.device, dtype=torch.float32, copy=True)
                                                  if group.get("fused") else step.clone())

    # The distributed optimizer's state in the canonical per-parameter layout, so its
    # checkpoints reshard across TP/PP/DP sizes (megatron's dp_reshardable would fix TP/PP).
    SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False):
        if is_loading:
            self._init_empty_adam_state()
        return self.mcore.sharded_state_dict(
            model_sharded_state_dict, is_loading=is_loading, metadata=dict(self.SHARDING_METADATA)
        )

    def _init_empty_adam_state(self) -> None:
        """megatron's distributed optimizer reads the inner torch Adam's ``step`` to build a load
        template, but torch Adam creates its state lazily at the first step (megatron relies on
        apex/TE optimizers that do not). Before a resume the state is empty: create it at zero;
        the checkpoint then overwrites it."""
        for inner in self._torch_adams_of_distributed_optimizers():
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if not state:
                        # the fused kernel wants its step counter on the parameter's device
                        state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device)
                                         if group.get("fused") else torch.tensor(0.0))
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def __repr__(self) -> str:
        return f"MegatronOptimizer({type(self.mcore).__name__})"


def build_optimizer(optim_cfg, parallel_cfg, model_chunks, dtype: torch.dtype) -> MegatronOptimizer:
    config = OptimizerConfig(
        optimizer=optim_cfg.name,
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.betas[0],
        adam_beta2=optim_cfg.betas[1],
        adam_eps=optim_cfg.eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
    )
    mcore = get_megatron_optimizer(config, model_chunks)
    if optim_cfg.fused:
        _use_fused_torch_adam(mcore)
    _patch_torch_adam_step_on_load(mcore)
    return MegatronOptimizer(mcore, fused=optim_cfg.fused)


def _torch_adams(mcore):
    """(megatron optimizer, its torch Adam(W)) for each part of megatron's (chained) optimizer that
    wraps one: megatron builds torch's when neither apex nor transformer-engine is installed."""
    for opt in getattr(mcore, "chained_optimizers", [mcore]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):
            yield opt, inner


def _use_fused_torch_adam(mcore) -> None:
    """Switch megatron's torch Adam(W) to torch's fused kernel (megatron constructs it with the
    default multi-tensor implementation and offers no switch). The fused step keeps its ``step``
    counters as float32 tensors on the parameters' device: torch creates them so at the first step,
    :meth:`MegatronOptimizer.load_state_dict` puts restored ones there."""
    for _, inner in _torch_adams(mcore):
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or not all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params):
            continue
        for group in (inner.defaults, *inner.param_groups):
            group["fused"], group["foreach"] = True, False


def _patch_torch_adam_step_on_load(mcore) -> None:
    """Work around megatron-core 0.19 with torch's Adam (no apex / TE): loading a
    ``fully_reshardable`` distributed-optimizer state copies every tensor of the per-parameter
    Adam state from the checkpoint, including torch's tensor ``step``, which megatron saves and
    restores separately and so is absent there (KeyError 'step'). Marking it as not-a-tensor in
    the source dict makes megatron skip it; the step itself is restored by ``load_state_dict``."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(mcore, "chained_optimizers", [mcore]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _original=original):
            return _original(model_param, {"step": None, **tensors})

        opt._set_main_param_and_optimizer_states = set_states


class LRSchedule(OptimizerParamScheduler):
    """megatron's warm-up + decay schedule (lr and weight decay written into the param groups),
    stepped once per optimizer step."""

    def __init__(self, optimizer: MegatronOptimizer, optim_cfg, max_steps: int):
        decay_steps = optim_cfg.decay_steps or max_steps
        super().__init__(
            optimizer,  # the adapter: Lightning checks schedulers belong to a returned optimizer
            init_lr=0.0 if optim_cfg.warmup_steps > 0 else optim_cfg.lr,
            max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr,
            lr_warmup_steps=optim_cfg.warmup_steps,
            lr_decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1),
            lr_decay_style=optim_cfg.decay,
            start_wd=optim_cfg.weight_decay,
            end_wd=optim_cfg.weight_decay,
            wd_incr_steps=max(1, max_steps),
            wd_incr_style="constant",
        )

    @property
    def lr(self) -> float:
        return self.get_lr(self.optimizer.param_groups[0])
