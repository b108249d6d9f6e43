"""Layout-free access to our sharded checkpoints.

A megatron dist_checkpointing checkpoint stores *global* tensors (a TP-sharded weight is saved as
the full weight, the layers of a block as one ``[num_layers, ...]`` tensor), whatever layout wrote
it. :func:`read_tensors` reads them whole in one process; :func:`unstack_layers` turns the stacked
layer tensors back into per-layer module keys; :func:`write_model_checkpoint` writes a checkpoint
that any layout can load, from a model template built on the meta device.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch

LAYER_STACKS = ("decoder.layers.",)


def read_tensors(ckpt_dir, prefixes: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Global tensors of a checkpoint (by their checkpoint key), optionally only some prefixes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a dist_checkpointing checkpoint (no .metadata)")
    reader = dcp.FileSystemReader(str(ckpt_dir))
    metadata = reader.read_metadata()
    prefixes = tuple(prefixes) if prefixes else None
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and (prefixes is None or key.startswith(prefixes))
    }
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def unstack_layers(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}<path>`` global tensors -> module state-dict keys without the prefix; stacked
    layer tensors ``...decoder.layers.<name>`` [L, ...] become ``...decoder.layers.<i>.<name>``."""
    out = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        stack = next((s for s in LAYER_STACKS if s in name), None)
        if stack is None:
            out[name] = value
            continue
        head, tail = name.split(stack, 1)
        for i in range(value.shape[0]):
            out[f"{head}{stack}{i}.{tail}"] = value[i]
    return out


def save_new_checkpoint(sharded: dict, out_dir, content_metadata: dict) -> None:
    """Save a sharded state dict as a new checkpoint directory: written to ``<out_dir>.partial``
    and renamed when complete, so a crash never leaves a half checkpoint under the real name; an
    existing non-empty ``out_dir`` is an error (nothing is overwritten)."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"state_dict": sharded}, str(partial), content_metadata=content_metadata)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(partial, out_dir)


def write_model_checkpoint(template: dict, tensors: dict[str, torch.Tensor], out_dir, content_metadata: dict,
                           key_prefix: str = "") -> None:
    """Save ``tensors`` (module state-dict keys, with ``key_prefix``) into the sharded structure of
    ``template`` (a one-process model's sharded state dict). Raises ValueError naming any key that
    is missing, unexpected or of the wrong shape. Needs a (one-process) torch.distributed group.

    A ShardedTensorFactory entry (megatron's SwiGLU ``linear_fc1``: w and v halves sharded
    separately over TP) takes the TP1 tensor (``cat(w1, w3)``); megatron applies it at save time."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    expected = {k: v for k, v in template.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    wanted = {key_prefix + k: v for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(wanted)), sorted(set(wanted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for key, sh in expected.items():
        value = wanted[key]
        shape = sh.local_shape if isinstance(sh, ShardedTensor) else tuple(sh.data.shape)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the source, the model expects {tuple(shape)}")
        sh.data = value.contiguous()
    save_new_checkpoint(expected, out_dir, content_metadata)


def write_global_tensors(tensors: dict[str, torch.Tensor], out_dir, content_metadata: dict) -> None:
    """Save global tensors under their checkpoint keys (e.g. what :func:`read_tensors` returned,
    edited) as a checkpoint that any layout can load: each tensor is one whole shard, and loading
    reads the slices a rank needs. Needs a (one-process) torch.distributed group."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded = {key: ShardedTensor.from_rank_offsets(key, value.contiguous(), replica_id=0) for key, value in tensors.items()}
    save_new_checkpoint(sharded, out_dir, content_metadata)
