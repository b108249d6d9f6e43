"""CPU compatibility layer for megatron-core.

megatron-core calls CUDA APIs even in a single process (``torch.cuda.current_device()`` for
buffers and RoPE, ``device="cuda"`` literals in the pipeline schedules, CUDA RNG trackers, CUDA
streams in DDP, ``torch.cuda.*Tensor`` type checks in the optimizer). On a machine without a GPU
every one of those raises. This module maps them onto the CPU so the *same* training code path runs
on a laptop, in CI and on a GPU cluster.

It is a product feature (the embedded default ``make recipe=general train`` runs on CPU), enabled by
the trainer only when ``torch.cuda.is_available()`` is false, and a strict no-op on a CUDA machine.
Call :func:`enable` before building any megatron module; it is idempotent and per process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def is_enabled() -> bool:
    return _ENABLED


def _stub_paged_stash_kernels() -> None:
    """megatron's MoE paged-stash kernels import triton unconditionally; we never use MoE."""
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"
    mod = types.ModuleType(name)
    mod.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*_a, **_k):
        raise RuntimeError("triton kernels are unavailable on this machine (no triton installed)")

    mod.paged_stash_copy_kernel = mod.paged_stash_pop_kernel = _unavailable
    sys.modules.setdefault(name, mod)


def _is_cuda(dev) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` factory kwargs, ``.to("cuda")`` and ``.cuda()`` to the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and not isinstance(args[1], torch.dtype)
            and _is_cuda(args[1])
        ):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NoStream:
    def __init__(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoEvent(_NoStream):
    def record(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, *a, **k):
        return 0.0


def _patch_rng_tracker() -> None:
    """Keep megatron's per-TP-rank RNG streams, backed by the CPU generator."""
    import megatron.core.tensor_parallel.random as rnd

    rnd._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    rnd.CudaRNGStatesTracker.add = add


def enable() -> bool:
    """Install the CPU mappings. Returns True when active, False on a CUDA machine."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _stub_paged_stash_kernels()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    orig_type = torch.Tensor.type

    def _type(self, *a, **k):
        # megatron asserts grads/params are torch.cuda.*Tensor; report the CUDA name on CPU.
        if a or k:
            return orig_type(self, *a, **k)
        t = orig_type(self)
        return t if t.startswith("torch.cuda.") else t.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = _type
    _CudaToCpu().__enter__()
    _patch_rng_tracker()
    _ENABLED = True
    return True
