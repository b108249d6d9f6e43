"""Latent shards: tokenizer latents and T5 embeddings precomputed once, read without decoding.

Encoding 121-frame 720p clips with the video tokenizer and captions with the 11B T5 costs more
than a training step of a small model and repeats every epoch; post-training recipes usually
precompute both. A latent shard sample holds ``<key>.latent.pth`` (normalized latents
``[C, T, H, W]``, the tensor the diffusion model denoises), ``<key>.t5.pth`` (a dict with the
embedding ``[L, D]`` and the valid-token ``mask [L]``), the source ``<key>.json`` and any numeric
sidecars of the source sample.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_ext.data.shards import ShardError, ShardIndex, ShardWriter, encode_member, read_manifest, write_manifest

logger = logging.getLogger(__name__)

LATENT_EXTS = ("latent.pth", "t5.pth", "json")


def _load_tensor(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class LatentClipDataset(Dataset):
    """Items ``latents`` float32 [C, T, H, W], ``context`` float32 [L, D], ``context_mask`` bool [L],
    ``caption``, ``key``, ``fps`` (+ sidecars as stored), checked against the model's shapes."""

    def __init__(self, index: ShardIndex, latent_shape: tuple, context_shape: tuple, sidecars: Optional[dict] = None):
        self.index = index
        self.latent_shape = tuple(latent_shape)
        self.context_shape = tuple(context_shape)
        self.sidecars = dict(sidecars or {})

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> dict[str, Any]:
        import json

        i, seed = item if isinstance(item, tuple) else (int(item), int(item))
        ref = self.index[i]
        latents = _load_tensor(self.index.read(i, "latent.pth"))
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != self.latent_shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ShardError(
                f"shard {ref.shard}: {ref.key}.latent.pth has shape {got}; the model expects {self.latent_shape} "
                "(latent channels, frames, height, width: precompute with the run's data and tokenizer settings)"
            )
        t5 = _load_tensor(self.index.read(i, "t5.pth"))
        if not isinstance(t5, dict) or "embedding" not in t5 or tuple(t5["embedding"].shape) != self.context_shape:
            got = tuple(t5["embedding"].shape) if isinstance(t5, dict) and "embedding" in t5 else "no 'embedding'"
            raise ShardError(
                f"shard {ref.shard}: {ref.key}.t5.pth embedding {got}; the model expects {self.context_shape} "
                "(model.text_encoder.max_length, model.context_dim)"
            )
        meta = json.loads(self.index.read(i, "json"))
        out = {
            "latents": latents.float(),
            "context": t5["embedding"].float(),
            "context_mask": t5.get("mask", torch.ones(self.context_shape[0], dtype=torch.bool)).bool(),
            "caption": str(meta.get("caption") or ""),
            "key": ref.key,
            "fps": float(meta.get("fps", 0.0)),
            "sample_seed": int(seed),
            "failed_samples": 0,
        }
        for ext in self.sidecars:  # already cut to the clip when precomputed
            out[ext[: -len(".npy")]] = torch.from_numpy(np.load(io.BytesIO(self.index.read(i, ext)), allow_pickle=False))
        return out


def shards_up_to_date(out_dir: Path, params: dict, what: str) -> bool:
    """Resuming a precomputation (latent or token shards): True when ``out_dir`` already holds
    ``what`` shards made from ``params`` (nothing to do), False when it has none; shards made from
    other inputs are an error (never overwritten)."""
    if not (out_dir / "manifest.json").is_file():
        return False
    extra = read_manifest(out_dir).get("extra", {})
    if extra.get("params") == params:
        logger.info("%s shards in %s are up to date", what, out_dir)
        return True
    raise ValueError(f"{out_dir} holds {what} shards made from other inputs ({extra.get('params')}); choose another directory")


def clip_batches(cfg, src, batch_size: int, device, desc: str, progress: bool = True):
    """The clips a precomputation encodes: each sample of the video shards ``src`` cut like
    training clips from its start (``data.num_frames`` frames at ``data.height x data.width``,
    with the task's sidecars sliced alike). Returns (index, sidecars, batches), batches yielding
    ``(first sample index, items, video on device)``."""
    from tqdm import tqdm

    from nemo_ext.data.dataset import VideoClipDataset
    from nemo_ext.tasks import get_task

    d = cfg.data
    sidecars = dict(getattr(get_task(cfg.task.name), "sidecars", {}) or {})
    index = ShardIndex.from_paths(src, required_exts=("mp4", "json") + tuple(sidecars))
    clips = VideoClipDataset(index, d.num_frames, d.height, d.width, d.frame_stride, clip_sampling="start",
                             resize_mode=d.resize_mode, sidecars=sidecars)

    def batches():
        for start in tqdm(range(0, len(clips), batch_size), desc=desc, unit="batch", disable=not progress):
            items = [clips[(i, i)] for i in range(start, min(start + batch_size, len(clips)))]
            yield start, items, torch.stack([it["video"] for it in items]).to(device)

    return index, sidecars, batches()


def _tokenizer_label(tok) -> str:
    """What made the latents (a shard directory made by another tokenizer must not be reused)."""
    if tok.kind == "space_to_depth":
        return f"space_to_depth(s{tok.spatial_compression},t{tok.temporal_compression})"
    return tok.path or "tiny"


def precompute_latents(cfg, src, out_dir, batch_size: int = 4, device: Optional[str] = None,
                       dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
    """Encode every sample of the video shards ``src`` with the recipe's tokenizer and text encoder
    (clip: the first ``data.num_frames`` frames at ``data.height x data.width``) into latent shards
    in ``out_dir``. Resumable: an out_dir whose manifest records the same inputs is left as is."""
    from nemo_ext.conditioning.text import T5TextEncoder
    from nemo_ext.tokenizers.continuous import ContinuousVideoTokenizer

    out_dir = Path(out_dir)
    m, d = cfg.model, cfg.data
    params = {
        "source": str(Path(src).resolve()), "num_frames": d.num_frames, "height": d.height, "width": d.width,
        "resize_mode": d.resize_mode, "tokenizer": _tokenizer_label(m.tokenizer), "text_encoder": m.text_encoder.path or "tiny",
        "max_length": m.text_encoder.max_length, "dtype": str(dtype),
    }
    if shards_up_to_date(out_dir, params, "latent"):
        return out_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    index, sidecars, batches = clip_batches(cfg, src, batch_size, device, "latents", progress)
    enc_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = ContinuousVideoTokenizer(m.tokenizer, m.edm.sigma_data).to(device, enc_dtype)
    text = T5TextEncoder(m.text_encoder, m.context_dim).to(device, enc_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with ShardWriter(out_dir, prefix="latent", max_count=1000) as writer:
        for start, items, video in batches:
            latents = tokenizer.encode(video).to(dtype).cpu()
            emb, mask = text.encode([it["caption"] for it in items], device)
            for j, it in enumerate(items):
                sample = {
                    "__key__": it["key"],
                    "latent.pth": _to_bytes(latents[j].clone()),
                    "t5.pth": _to_bytes({"embedding": emb[j].to(dtype).cpu().clone(), "mask": mask[j].cpu().clone()}),
                    "json": index.read(start + j, "json"),
                }
                for ext in sidecars:  # the clip's slice, as the video loader would cut it
                    sample[ext] = encode_member(it[ext[: -len(".npy")]].numpy(), ext)
                writer.write(sample)
                count += 1
    write_manifest(out_dir, writer.shards, extra={"kind": "latent", "params": params, "samples": count})
    return out_dir
