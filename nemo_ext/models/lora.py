"""LoRA adapters for megatron-core's tensor-parallel linears (``strategy=lora``).

A LoRA adapter adds ``scale * B (A x)`` (``scale = alpha / rank``, ``A`` [r, in], ``B`` [out, r],
``B`` zero at init: the adapted model starts as the base model) to the output of a frozen linear.
Both families' attention and MLP linears are megatron ``ColumnParallelLinear`` /
``RowParallelLinear`` (or their transformer-engine twins: handled alike, unverified, TE cannot be
installed on the CPU machines); the adapter is split like the base weight
so that any tensor-parallel layout computes exactly the single-process function:

* column-parallel (output split over TP): ``A`` replicated, ``B`` split on its output rows like
  the weight (``[out/tp, r]``). The rank-r intermediate ``h = A x`` is computed on the tokens the
  base layer receives; under sequence parallelism that is this rank's token slice, and ``h`` (not
  the wide input) is all-gathered over the sequence. The backward of that gather (or, without SP,
  of megatron's copy-to-TP-region) sums ``dh`` over the TP ranks, whose ``B`` slices each saw part
  of the output.
* row-parallel (input split over TP): ``A`` split on its input columns like the weight
  (``[r, in/tp]``), ``B`` replicated. The partial ``A_t x_t`` is all-reduced (under SP:
  reduce-scattered over the sequence, as the base output is) before ``B``.

The adapter is registered next to its linear (``linear_qkv`` -> ``linear_qkv_lora`` with
parameters ``lora_a`` / ``lora_b``) and added to its output by a forward hook, so the base keeps its
module names, state-dict keys and checkpoint keys: a base checkpoint loads unchanged, and an
adapter checkpoint holds only ``*_lora.lora_{a,b}`` (and the task modules that train fully).
Adapters carry megatron's tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``)
for the grad norm and the distributed optimizer, and their grads that are partial sums over the TP
ranks under sequence parallelism (the replicated matrix sees only local tokens) carry the
``sequence_parallel`` attribute, which ``finalize_model_grads`` all-reduces. Their sharded state
dict splits them like their base weight (a SwiGLU ``linear_fc1``'s ``B`` as its two halves, like
the weight), so adapter checkpoints reshard across TP/PP layouts and merge on global tensors.

Target modules are chosen by name pattern against a linear's *role*: its path inside a transformer
layer (``self_attention.linear_qkv``, ``cross_attention.linear_kv``, ``mlp.linear_fc2``) or inside the
network (``output_layer``). Layer indices are not part of the role (they are per pipeline stage).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import zlib
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_SUFFIX = "_lora"
_LAYER = re.compile(r"^(?P<head>.*?\blayers)\.(?P<index>\d+)\.(?P<role>.+)$")


# ------------------------------------------------------------------------------------------------
# Which linears are tensor-parallel, and how
# ------------------------------------------------------------------------------------------------
def _parallel_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    column, row = [ColumnParallelLinear], [RowParallelLinear]
    try:  # transformer-engine linears (GPU only; unverified on the CPU machines)
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEColumnParallelLinear, TERowParallelLinear

        if HAVE_TE and isinstance(TEColumnParallelLinear, type) and isinstance(TERowParallelLinear, type):
            column.append(TEColumnParallelLinear)
            row.append(TERowParallelLinear)
    except Exception:  # noqa: BLE001 - TE absent (or broken): only the local linears exist
        pass
    return tuple(column), tuple(row)


def parallel_kind(module) -> Optional[str]:
    """"column" / "row" for a megatron (or TE) tensor-parallel linear, None otherwise."""
    column, row = _parallel_classes()
    if isinstance(module, column):
        return "column"
    if isinstance(module, row):
        return "row"
    return None


def role_of(name: str) -> str:
    """A module's name as target patterns see it: the path inside its transformer layer
    (``...decoder.layers.3.self_attention.linear_qkv`` -> ``self_attention.linear_qkv``), else the
    path inside the network (``net.output_layer`` -> ``output_layer``)."""
    m = _LAYER.match(name)
    if m:
        return m.group("role")
    return name[len("net."):] if name.startswith("net.") else name


def matches(name: str, pattern: str) -> bool:
    """fnmatch on the whole (role) name or on its last component: ``linear_qkv``,
    ``*attention.linear_*`` and ``cross_attention.*`` all select by name, not by layer."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def _spec_linears(spec, path: str = "") -> list[str]:
    """Roles of the tensor-parallel linears a megatron ModuleSpec builds (walks its submodules)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    out = []
    sub = getattr(spec, "submodules", None)
    if sub is None or not dataclasses.is_dataclass(sub):
        return out
    for f in dataclasses.fields(sub):
        value = getattr(sub, f.name)
        name = f"{path}{f.name}"
        if isinstance(value, ModuleSpec):
            out += _spec_linears(value, name + ".")
        elif isinstance(value, type) and issubclass(value, (ColumnParallelLinear, RowParallelLinear)):
            out.append(name)
    return out


def target_catalogue(family: str, model_cfg) -> list[str]:
    """Every linear role LoRA can adapt in a model of this config (from the layer spec the model is
    built from, so it cannot drift from the model): what ``strategy.target_modules`` patterns match."""
    if family == "diffusion":
        from nemo_ext.models.dit.layer import get_dit_layer_spec

        return _spec_linears(get_dit_layer_spec("local"))
    if family == "ar":
        from nemo_ext.models.ar.layer import get_ar_layer_spec
        from nemo_ext.models.ar.model import CosmosAR

        return _spec_linears(get_ar_layer_spec("local", model_cfg.cross_attention)) + list(CosmosAR.parallel_linears)
    raise ValueError(f"family={family!r}: no LoRA target catalogue")


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    names = list(names)
    return [p for p in patterns if not any(matches(n, p) for n in names)]


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------
class LoRAAdapter(nn.Module):
    """``scale * B (A dropout(x))`` for one tensor-parallel linear (see the module docstring)."""

    def __init__(self, base: nn.Module, kind: str, rank: int, alpha: float, dropout: float, *,
                 init_seed: int, gated: bool = False):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if kind == "column" and getattr(base, "gather_output", False):
            raise ValueError("LoRA on a ColumnParallelLinear with gather_output=True is not supported")
        if kind == "row" and not getattr(base, "input_is_parallel", True):
            raise ValueError("LoRA on a RowParallelLinear with input_is_parallel=False is not supported")
        self.kind, self.rank, self.alpha, self.gated = kind, rank, float(alpha), gated
        self.scale = float(alpha) / rank
        object.__setattr__(self, "base", base)  # not a submodule: the base keeps its own place and keys
        self.tp_group = getattr(base, "tp_group", None)
        if self.tp_group is None:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        tp_rank = self.tp_group.rank()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and self.tp_size > 1
        out_local, in_local = base.weight.shape
        in_full = in_local * (self.tp_size if kind == "row" else 1)
        dtype, device = base.weight.dtype, base.weight.device

        # A: uniform(+-1/sqrt(in)) (nn.Linear's / PEFT's init) of the *full* matrix from a generator
        # seeded by the adapter's global name, then this rank's slice: every layout starts alike.
        gen = torch.Generator().manual_seed(init_seed)
        bound = 1.0 / math.sqrt(in_full)
        a_full = torch.empty(rank, in_full).uniform_(-bound, bound, generator=gen)
        if kind == "row":
            a_full = a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        self.lora_a = nn.Parameter(a_full.to(device=device, dtype=dtype).contiguous())
        self.lora_b = nn.Parameter(torch.zeros(out_local, rank, device=device, dtype=dtype))
        split, replicated = (self.lora_b, self.lora_a) if kind == "column" else (self.lora_a, self.lora_b)
        set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
        set_tensor_model_parallel_attributes(replicated, False, 0, 1)
        if self.sequence_parallel:
            # The replicated matrix sees this rank's tokens only: its grad is a partial sum over TP.
            replicated.sequence_parallel = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import mappings

        g = self.tp_group
        if self.kind == "column":
            h = F.linear(self.dropout(x), self.lora_a)
            if self.sequence_parallel:
                h = mappings.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=g)
            elif self.tp_size > 1:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=g)
        else:
            if self.tp_size > 1 and not self.sequence_parallel and isinstance(self.dropout, nn.Dropout):
                with tensor_parallel.get_cuda_rng_tracker().fork():  # x is split over TP: own masks
                    x = self.dropout(x)
            else:  # (under SP the whole block already runs in the TP-rank RNG stream)
                x = self.dropout(x)
            h = F.linear(x, self.lora_a)
            if self.sequence_parallel:
                h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=g)
            elif self.tp_size > 1:
                h = mappings.reduce_from_tensor_model_parallel_region(h, group=g)
        return F.linear(h, self.lora_b) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """This rank's ``scale * B A``: the update of its slice of the base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axes = {"lora_b": 0} if self.kind == "column" else {"lora_a": 1}
        sd = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        if self.gated:  # B of a SwiGLU fc1 holds [w; v] rows per TP rank, like the weight
            key = f"{prefix}lora_b"
            sd[key] = apply_swiglu_sharded_factory(
                sd[key], sharded_offsets, metadata.get("singleton_local_shards", False),
                tp_group=self.tp_group, dp_group=metadata["dp_cp_group"],
            )
        return sd

    def extra_repr(self) -> str:
        return f"{self.kind}-parallel, rank={self.rank}, alpha={self.alpha:g}, a={tuple(self.lora_a.shape)}, b={tuple(self.lora_b.shape)}"


def _add_delta(adapter: LoRAAdapter, module, args, kwargs, output):
    x = args[0] if args else kwargs.get("input_", kwargs.get("inp"))
    if kwargs.get("runtime_gather_output"):
        raise ValueError("LoRA: runtime_gather_output=True is not supported")
    out, bias = output
    return out + adapter(x).to(out.dtype), bias


# ------------------------------------------------------------------------------------------------
# Applying, freezing, merging
# ------------------------------------------------------------------------------------------------
def _global_name(model: nn.Module, name: str) -> str:
    """``name`` with the layer index made global (``layer_number - 1`` of megatron's layers):
    stable across pipeline layouts, used to seed each adapter's init."""
    m = _LAYER.match(name)
    if not m:
        return name
    layer = model.get_submodule(f"{m.group('head')}.{m.group('index')}")
    index = getattr(layer, "layer_number", int(m.group("index")) + 1) - 1
    return f"{m.group('head')}.{index}.{m.group('role')}"


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str],
               seed: int = 0) -> dict[str, LoRAAdapter]:
    """Add an adapter to every tensor-parallel linear of ``model`` whose role matches a pattern of
    ``target_modules``; returns {linear name: adapter}. Freezing is :func:`freeze_base`'s job."""
    found = [(name, module, kind) for name, module in model.named_modules() if (kind := parallel_kind(module))]
    adapters = {}
    for name, module, kind in found:
        role = role_of(name)
        if not any(matches(role, p) for p in target_modules):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gated = attr == "linear_fc1" and bool(getattr(getattr(parent, "config", None), "gated_linear_unit", False))
        init_seed = (seed * 1_000_003 + zlib.crc32(_global_name(model, name).encode())) % (2**63 - 1)
        adapter = LoRAAdapter(module, kind, rank, alpha, dropout, init_seed=init_seed, gated=gated)
        parent.add_module(attr + ADAPTER_SUFFIX, adapter)
        adapter._hook = module.register_forward_hook(_hook_for(adapter), with_kwargs=True)
        adapters[name] = adapter
    return adapters


def _hook_for(adapter: LoRAAdapter):
    def hook(module, args, kwargs, output):
        return _add_delta(adapter, module, args, kwargs, output)

    return hook


def adapters_of(model: nn.Module) -> dict[str, LoRAAdapter]:
    return {name[: -len(ADAPTER_SUFFIX)]: m for name, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def freeze_base(model: nn.Module, trainable_modules: Sequence[str]) -> list[str]:
    """Everything stops training except the LoRA adapters and the modules whose name (relative to
    ``model``, e.g. ``conditioner``, ``net.final_layer``) matches a pattern of ``trainable_modules``
    (they train fully). Returns the patterns that matched no module of this model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter in adapters_of(model).values():
        for p in adapter.parameters():
            p.requires_grad_(True)
    names = [n for n, _ in model.named_modules() if n]
    unmatched = []
    for pattern in trainable_modules:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            unmatched.append(pattern)
        for n in hit:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    return unmatched


def trained_state_keys(model: nn.Module, trainable_modules: Sequence[str]) -> set[str]:
    """State-dict keys a LoRA checkpoint holds: every trained parameter (adapters, fully trained
    modules) and the buffers of the fully trained modules (e.g. a conditioner's normalization
    statistics, which travel with its weights)."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in trainable_modules):
            keys |= set(module.state_dict(prefix=f"{name}.", keep_vars=True))
    return keys


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += scale * B A`` on this rank's slices) and
    remove it: the model computes the same function without adapters. Returns how many merged."""
    adapters = adapters_of(model)
    for name, adapter in adapters.items():
        base = adapter.base
        base.weight.add_(adapter.delta_weight().to(base.weight.dtype))
        adapter._hook.remove()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        delattr(parent, attr + ADAPTER_SUFFIX)
    return len(adapters)


def merge_global(tensors: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float,
                 prefix: str = "") -> tuple[dict[str, torch.Tensor], int]:
    """The same merge on a checkpoint's *global* tensors (any layout wrote them): for every
    ``<linear>_lora.lora_a`` / ``lora_b`` pair in ``adapters`` (layer-stacked ``[L, ...]`` or not),
    ``<linear>.weight += scale * B @ A``. ``tensors`` (the base weights) is updated in place;
    returns it and the number of merged weights. Raises ValueError naming a key without its pair
    or its base weight."""
    suffix_a = f"{ADAPTER_SUFFIX}.lora_a"
    merged = 0
    for key_a in sorted(k for k in adapters if k.endswith(suffix_a)):
        stem = key_a[: -len(suffix_a)]
        key_b, key_w = f"{stem}{ADAPTER_SUFFIX}.lora_b", f"{stem}.weight"
        if key_b not in adapters:
            raise ValueError(f"{key_a} has no {key_b}")
        if key_w not in tensors:
            raise ValueError(f"the base has no {key_w} for the adapter {stem}{ADAPTER_SUFFIX}")
        w = tensors[key_w]
        delta = torch.matmul(adapters[key_b].float(), adapters[key_a].float()) * scale
        if delta.shape != w.shape:
            raise ValueError(f"{key_w}: adapter product {tuple(delta.shape)} != weight {tuple(w.shape)}")
        tensors[key_w] = (w.float() + delta).to(w.dtype)
        merged += 1
    return tensors, merged


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------
def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model over every rank: TP slices summed,
    TP/CP/DP replicas and the pipeline-replicated copies (``shared``) counted once. A collective
    when torch.distributed is initialized (call it on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    owner = True
    tp_rank = 0
    if ps.model_parallel_is_initialized():
        owner = ps.get_data_parallel_rank(with_context_parallel=True) == 0
        tp_rank = ps.get_tensor_model_parallel_rank()
    trainable = total = 0
    if owner:
        for p in model.parameters():
            if getattr(p, "shared", False) or (tp_rank > 0 and not getattr(p, "tensor_model_parallel", False)):
                continue
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([trainable, total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        trainable, total = counts.tolist()
    return int(trainable), int(total)


def describe(trainable: int, total: int) -> str:
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable parameters: {trainable:,} of {total:,} ({pct:.3g}%)"
