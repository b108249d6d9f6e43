"""Token shards: discrete-tokenizer tokens (and T5 embeddings) precomputed for the AR family.

The AR model trains on token ids, so the frozen video tokenizer runs once, here, instead of every
epoch. A token shard sample holds

* ``<key>.tokens.npy``: the clip's tokens ``[T', H', W']``, ``uint16`` when the vocabulary has at
  most 65,536 ids (Cosmos DV: 64,000), ``int32`` otherwise;
* ``<key>.t5.pth``: when the model cross-attends to text (``model.cross_attention``), the caption's
  T5 embedding ``[L, D]`` and valid-token ``mask [L]``, as in latent shards;
* ``<key>.json``: the source sample's json plus ``tokens``: the grid, vocabulary size, storage dtype,
  clip size and the tokenizer's identity (:func:`~nemo_ext.tokenizers.discrete.tokenizer_identity`),
  so that a run whose ``model.tokenizer`` or clip size differs stops with a clear error;
* the numeric sidecars of the task, cut to the clip.

``manifest.json`` records the inputs (resumable: the same command is a no-op) and the token spec.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_ext.data.latents import _load_tensor, _to_bytes, clip_batches, shards_up_to_date
from nemo_ext.data.shards import ShardError, ShardIndex, ShardWriter, encode_member, expand_paths, read_manifest, write_manifest

logger = logging.getLogger(__name__)

__all__ = ["TOKEN_EXTS", "TokenSpec", "token_spec", "token_dtype", "TokenClipDataset", "build_token_dataset",
           "check_token_manifests", "precompute_tokens"]

TOKEN_EXTS = ("tokens.npy", "json")
_KIND = "tokens"
_FIX = "re-run `python -m nemo_ext.cli.prep tokens` with the run's model.tokenizer and data.num_frames/height/width"


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of token ids: uint16 up to 65,536 ids, int32 beyond."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass(frozen=True)
class TokenSpec:
    """What a run expects of its token shards. ``tokenizer`` (an identity dict) and
    ``context_shape`` ``(L, D)`` are not checked / not read when None."""

    grid: tuple
    vocab_size: int
    tokenizer: Optional[dict] = None
    context_shape: Optional[tuple] = None

    def describe_mismatch(self, meta: dict) -> Optional[str]:
        """Why token metadata ``meta`` (the json's ``tokens`` node or the manifest's spec) does not fit, or None."""
        if not isinstance(meta, dict):
            return "it has no token metadata (not a token shard?)"
        if tuple(meta.get("grid") or ()) != tuple(self.grid):
            return f"its token grid is {tuple(meta.get('grid') or ())}, the run expects {tuple(self.grid)}"
        if int(meta.get("vocab_size", -1)) != int(self.vocab_size):
            return f"its vocabulary has {meta.get('vocab_size')} ids, the run's model.tokenizer has {self.vocab_size}"
        if self.tokenizer is None:
            return None
        got = meta.get("tokenizer") or {}
        # expected weights None: the run's tokenizer files are not on this machine (see token_spec)
        diff = sorted(k for k in set(got) | set(self.tokenizer) if got.get(k) != self.tokenizer.get(k)
                      and not (k == "weights" and self.tokenizer.get(k) is None))
        if diff:
            details = ", ".join(f"{k}: {got.get(k)!r} vs {self.tokenizer.get(k)!r}" for k in diff)
            return f"it was made with another tokenizer than the run's model.tokenizer ({details})"
        return None


def token_spec(cfg, tokenizer_identity: bool = True) -> TokenSpec:
    """The token spec of a run: grid from ``data.num_frames/height/width`` and ``model.tokenizer``,
    its vocabulary and identity, and the T5 context shape when ``model.cross_attention``."""
    from nemo_ext.tokenizers.discrete import token_grid, tokenizer_identity as identity

    m, d = cfg.model, cfg.data
    grid = token_grid(m.tokenizer, d.num_frames, d.height, d.width)
    context = (int(m.text_encoder.max_length), int(m.context_dim)) if getattr(m, "cross_attention", False) else None
    ident = None
    if tokenizer_identity:
        try:
            ident = identity(m.tokenizer)
        except FileNotFoundError as e:  # training on tokens does not need the tokenizer itself
            logger.warning("cannot fingerprint the tokenizer weights (%s): token shards are checked without them", e)
            ident = identity(m.tokenizer, weights=False)
    return TokenSpec(grid=tuple(grid), vocab_size=int(m.tokenizer.vocab_size), tokenizer=ident, context_shape=context)


class TokenClipDataset(Dataset):
    """Map-style reader of token shards. Items: ``tokens`` int64 ``[T', H', W']``, ``caption``, ``key``,
    ``fps``, ``sample_seed``, ``failed_samples`` (0), with ``context`` float32 ``[L, D]`` and
    ``context_mask`` bool ``[L]`` when ``spec.context_shape`` is set, plus the task's sidecars.

    Each sample's metadata is checked against ``spec`` (grid, vocabulary, tokenizer identity) and
    each token array against the grid and the vocabulary: a mismatch raises :class:`ShardError`.
    """

    def __init__(self, index: ShardIndex, spec: TokenSpec, sidecars: Optional[dict] = None):
        self.index = index
        self.spec = spec
        self.sidecars = dict(sidecars or {})

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> dict[str, Any]:
        i, seed = item if isinstance(item, tuple) else (int(item), int(item))
        ref = self.index[i]
        try:
            meta = json.loads(self.index.read(i, "json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"shard {ref.shard}: {ref.key}.json is not valid JSON: {e}") from e
        why = self.spec.describe_mismatch(meta.get(_KIND) if isinstance(meta, dict) else None)
        if why:
            raise ShardError(f"shard {ref.shard}: sample {ref.key}: {why}; {_FIX}")
        try:
            arr = np.load(io.BytesIO(self.index.read(i, "tokens.npy")), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ShardError(f"shard {ref.shard}: {ref.key}.tokens.npy is not a readable .npy array: {e}") from e
        if arr.dtype.kind not in "iu" or tuple(arr.shape) != tuple(self.spec.grid):
            raise ShardError(f"shard {ref.shard}: {ref.key}.tokens.npy is {arr.dtype} {tuple(arr.shape)}; expected integer "
                             f"token ids of shape {tuple(self.spec.grid)}")
        tokens = torch.from_numpy(arr.astype(np.int64))
        if arr.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.spec.vocab_size):
            raise ShardError(f"shard {ref.shard}: {ref.key}.tokens.npy has ids in [{int(tokens.min())}, {int(tokens.max())}], "
                             f"outside the vocabulary [0, {self.spec.vocab_size})")
        out: dict[str, Any] = {
            "tokens": tokens,
            "caption": str(meta.get("caption") or ""),
            "key": ref.key,
            "fps": float(meta.get("fps", 0.0)),
            "sample_seed": int(seed),
            "failed_samples": 0,
        }
        if self.spec.context_shape is not None:
            if not self.index.has(i, "t5.pth"):
                raise ShardError(f"shard {ref.shard}: sample {ref.key} has no t5.pth but the model cross-attends to text "
                                 f"(model.cross_attention=true); {_FIX}")
            t5 = _load_tensor(self.index.read(i, "t5.pth"))
            shape = tuple(self.spec.context_shape)
            if not isinstance(t5, dict) or "embedding" not in t5 or tuple(t5["embedding"].shape) != shape:
                got = tuple(t5["embedding"].shape) if isinstance(t5, dict) and "embedding" in t5 else "no 'embedding'"
                raise ShardError(f"shard {ref.shard}: {ref.key}.t5.pth embedding {got}; the model expects {shape} "
                                 "(model.text_encoder.max_length, model.context_dim)")
            out["context"] = t5["embedding"].float()
            out["context_mask"] = t5.get("mask", torch.ones(shape[0], dtype=torch.bool)).bool()
        for ext in self.sidecars:  # already cut to the clip when precomputed
            out[ext[: -len(".npy")]] = torch.from_numpy(np.load(io.BytesIO(self.index.read(i, ext)), allow_pickle=False))
        return out


def check_token_manifests(paths, spec: TokenSpec) -> None:
    """Fail fast: every shard directory of ``paths`` whose ``manifest.json`` describes token shards
    must match ``spec`` (samples are checked again one by one when read)."""
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for d in sorted({p.parent for s in specs for p in expand_paths(s)}):
        if not (d / "manifest.json").is_file():
            continue
        extra = read_manifest(d).get("extra", {})
        if extra.get("kind") != _KIND:
            raise ShardError(f"{d} holds {extra.get('kind') or 'non-token'} shards, not token shards "
                             "(make them with `python -m nemo_ext.cli.prep tokens --from <video shards> --out DIR`)")
        stored = extra.get("spec") or {}
        why = spec.describe_mismatch(stored)
        if why:
            raise ShardError(f"token shards in {d}: {why}; {_FIX}")
        if spec.context_shape is not None and tuple(stored.get("context_shape") or ()) != tuple(spec.context_shape):
            have = tuple(stored["context_shape"]) if stored.get("context_shape") else "none"
            raise ShardError(f"token shards in {d} hold T5 embeddings of shape {have}; the model cross-attends to text "
                             f"of shape {tuple(spec.context_shape)} (model.text_encoder.max_length, model.context_dim); {_FIX}")


def build_token_dataset(cfg, path, sidecars: Optional[dict] = None) -> TokenClipDataset:
    """The token dataset of a run: shards at ``path`` (directories / globs / brace patterns) checked
    against :func:`token_spec` of ``cfg``, reading the task's ``sidecars``."""
    spec = token_spec(cfg)
    check_token_manifests(path, spec)
    required = TOKEN_EXTS + (("t5.pth",) if spec.context_shape is not None else ()) + tuple(sidecars or {})
    return TokenClipDataset(ShardIndex.from_paths(path, required_exts=required), spec, sidecars)


def precompute_tokens(cfg, src, out_dir, batch_size: int = 4, device: Optional[str] = None,
                      dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
    """Tokenize every sample of the video shards ``src`` with the run's ``model.tokenizer`` (clip:
    the first ``data.num_frames`` frames at ``data.height x data.width``) into token shards in
    ``out_dir``, with T5 embeddings of the captions (stored as ``dtype``) when
    ``model.cross_attention``. Resumable: an out_dir whose manifest records the same inputs is left
    as is; one made from other inputs is an error."""
    from nemo_ext.tokenizers.discrete import CosmosJITTokenizer, build_discrete_tokenizer, tokenizer_identity

    out_dir = Path(out_dir)
    m, d = cfg.model, cfg.data
    spec = replace(token_spec(cfg, tokenizer_identity=False), tokenizer=tokenizer_identity(m.tokenizer))
    store = token_dtype(spec.vocab_size)
    params = {
        "source": str(Path(src).resolve()), "num_frames": d.num_frames, "height": d.height, "width": d.width,
        "frame_stride": d.frame_stride, "resize_mode": d.resize_mode, "tokenizer": spec.tokenizer,
    }
    if spec.context_shape is not None:
        params.update(text_encoder=m.text_encoder.path or "tiny", max_length=m.text_encoder.max_length,
                      context_dim=m.context_dim, dtype=str(dtype))
    if shards_up_to_date(out_dir, params, "token"):
        return out_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    index, sidecars, batches = clip_batches(cfg, src, batch_size, device, "tokens", progress)
    tokenizer = build_discrete_tokenizer(m.tokenizer)
    # The Cosmos tokenizers run in bfloat16 on GPU (as NVIDIA's pipelines run them); the small built-in
    # one stays float32 so that CPU and GPU give the same tokens.
    tok_dtype = torch.bfloat16 if device.startswith("cuda") and isinstance(tokenizer, CosmosJITTokenizer) else torch.float32
    tokenizer = tokenizer.to(device, tok_dtype)
    text = None
    if spec.context_shape is not None:
        from nemo_ext.conditioning.text import T5TextEncoder

        enc_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        text = T5TextEncoder(m.text_encoder, m.context_dim).to(device, enc_dtype)
    token_meta = {"grid": list(spec.grid), "vocab_size": spec.vocab_size, "dtype": store.name,
                  "tokenizer": spec.tokenizer, "clip": {"num_frames": d.num_frames, "height": d.height, "width": d.width}}
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with ShardWriter(out_dir, prefix="tokens", max_count=1000) as writer:
        for start, items, video in batches:
            tokens = tokenizer.encode(video).cpu().numpy()
            if text is not None:
                emb, mask = text.encode([it["caption"] for it in items], device)
            for j, it in enumerate(items):
                src_meta = json.loads(index.read(start + j, "json"))
                src_meta = src_meta if isinstance(src_meta, dict) else {}
                sample = {
                    "__key__": it["key"],
                    "tokens.npy": encode_member(np.ascontiguousarray(tokens[j].astype(store)), "tokens.npy"),
                    "json": {**src_meta, _KIND: token_meta},
                }
                if text is not None:
                    sample["t5.pth"] = _to_bytes({"embedding": emb[j].to(dtype).cpu().clone(), "mask": mask[j].cpu().clone()})
                for ext in sidecars:  # the clip's slice, as the video loader would cut it
                    sample[ext] = encode_member(it[ext[: -len(".npy")]].numpy(), ext)
                writer.write(sample)
                count += 1
    spec_meta = {**asdict(spec), "grid": list(spec.grid),
                 "context_shape": list(spec.context_shape) if spec.context_shape else None}
    write_manifest(out_dir, writer.shards, extra={"kind": _KIND, "params": params, "spec": spec_meta, "samples": count})
    return out_dir
