"""Discrete video tokenizers for the autoregressive family (Cosmos DV8x16x16 and a built-in FSQ one).

The config below is the ``model.tokenizer`` node of the AR model presets. Every tokenizer is a frozen
:class:`DiscreteVideoTokenizer`: ``encode(video [B, 3, F, H, W] in [-1, 1]) -> tokens [B, T', H', W']``
(int64, in ``[0, vocab_size)``), ``decode(tokens) -> video``, ``token_grid(F, H, W) -> (T', H', W')``.
Time is compressed causally like the Cosmos tokenizers: ``F = 1 + 8k`` frames give ``1 + k`` token
frames (the first frame on its own). :func:`build_discrete_tokenizer` picks the implementation:

* ``model.tokenizer.path`` set: :class:`CosmosJITTokenizer`, the official TorchScript checkpoints
  (``encoder.jit`` returns ``(indices, codes, loss)``, ``decoder.jit`` takes the indices), called as
  NVIDIA's Cosmos code calls them;
* ``path`` null: :class:`FSQTokenizer`, a small causal conv autoencoder with finite scalar
  quantization, seed-0 weights or trained ones (``builtin_weights``, see :func:`train_fsq_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DiscreteTokenizerConfig:
    """The frozen discrete video tokenizer of an AR model.

    ``path``: a local directory with the official Cosmos tokenizer's TorchScript ``encoder.jit`` and
    ``decoder.jit`` (e.g. Cosmos-1.0-Tokenizer-DV8x16x16); ``null`` builds the small built-in FSQ
    tokenizer (conv encoder + FSQ + conv decoder, deterministic seed-0 weights unless
    ``builtin_weights`` points at trained ones).
    """

    path: Optional[str] = None
    # FSQ levels per code dimension; the vocabulary is their product (Cosmos DV: 8,8,8,5,5,5 = 64,000).
    levels: List[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    temporal_compression: int = 8
    spatial_compression: int = 16
    # Built-in tokenizer only: conv width and an optional trained state dict (.pt / .safetensors).
    tiny_channels: int = 32
    builtin_weights: Optional[str] = None
    # Encode clips longer than this (pixel frames, 1 + 8k) as independent chunks of this many frames,
    # as Cosmos AR models do (``pixel_chunk_duration``, 33 for Cosmos-1 DV8x16x16); null: one chunk.
    chunk_frames: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        n = 1
        for level in self.levels:
            n *= int(level)
        return n


# ------------------------------------------------------------------------------------------------
# Shapes and validation (usable without building a tokenizer)
# ------------------------------------------------------------------------------------------------

ENCODER_FILE = "encoder.jit"
DECODER_FILE = "decoder.jit"
# Bump when the built-in tokenizer's architecture changes: seed-0 token shards of an older
# architecture then no longer match the tokenizer identity (see tokenizer_identity).
FSQ_ARCH_VERSION = 1
_WEIGHTS_FORMAT = "nemo_ext.fsq_tokenizer"


def validate_tokenizer_config(cfg: DiscreteTokenizerConfig) -> None:
    """Raise ValueError naming the ``model.tokenizer`` field that cannot work."""
    levels = [int(v) for v in cfg.levels]
    if not levels or any(v < 2 for v in levels):
        raise ValueError(f"model.tokenizer.levels={list(cfg.levels)}: need at least one FSQ level, each >= 2")
    tc, sc = int(cfg.temporal_compression), int(cfg.spatial_compression)
    if tc < 1 or sc < 1:
        raise ValueError(f"model.tokenizer.temporal_compression={tc} and spatial_compression={sc} must be >= 1")
    if cfg.chunk_frames is not None and (int(cfg.chunk_frames) < 1 or (int(cfg.chunk_frames) - 1) % tc):
        raise ValueError(f"model.tokenizer.chunk_frames={cfg.chunk_frames}: a chunk needs 1 + {tc}k frames "
                         f"(temporal_compression={tc}), e.g. {1 + 4 * tc}")
    if not cfg.path:
        if sc & (sc - 1):
            raise ValueError(f"model.tokenizer.spatial_compression={sc}: the built-in FSQ tokenizer needs a power of 2")
        if int(cfg.tiny_channels) < 8 or int(cfg.tiny_channels) % 8:
            raise ValueError(f"model.tokenizer.tiny_channels={cfg.tiny_channels}: need a multiple of 8")


def token_grid(cfg: DiscreteTokenizerConfig, num_frames: int, height: int, width: int) -> Tuple[int, int, int]:
    """(T', H', W') of a clip of ``num_frames`` frames at ``height x width``: ``1 + (F - 1) / tc``
    token frames per chunk (``F`` itself when ``chunk_frames`` is null), ``H / sc``, ``W / sc``."""
    tc, sc = int(cfg.temporal_compression), int(cfg.spatial_compression)
    num_frames, height, width = int(num_frames), int(height), int(width)
    chunk = int(cfg.chunk_frames) if cfg.chunk_frames else num_frames
    if num_frames < 1 or num_frames % chunk:
        raise ValueError(f"num_frames={num_frames}: with model.tokenizer.chunk_frames={cfg.chunk_frames} clips need a "
                         f"multiple of {chunk} frames")
    if (chunk - 1) % tc:
        raise ValueError(f"num_frames={chunk}: the tokenizer compresses time {tc}x causally (the first frame on its own), "
                         f"so clips need 1 + {tc}k frames ({', '.join(str(1 + tc * k) for k in range(1, 4))}, ...)")
    if height < sc or width < sc or height % sc or width % sc:
        raise ValueError(f"clip size {height}x{width}: height and width must be multiples of the tokenizer's "
                         f"spatial compression {sc}")
    return (num_frames // chunk) * (1 + (chunk - 1) // tc), height // sc, width // sc


def num_frames_for(cfg: DiscreteTokenizerConfig, token_frames: int) -> int:
    """Pixel frames that ``token_frames`` token frames decode to (the inverse of ``token_grid``'s T')."""
    tc = int(cfg.temporal_compression)
    if cfg.chunk_frames:
        per_chunk = 1 + (int(cfg.chunk_frames) - 1) // tc
        if token_frames % per_chunk:
            raise ValueError(f"{token_frames} token frames: with model.tokenizer.chunk_frames={cfg.chunk_frames} "
                             f"token clips come in chunks of {per_chunk} frames")
        return token_frames // per_chunk * int(cfg.chunk_frames)
    return 1 + (int(token_frames) - 1) * tc


_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path) -> str:
    """sha256 of a file, cached per (path, size, mtime) in this process."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def tokenizer_identity(cfg: DiscreteTokenizerConfig, weights: bool = True) -> Dict[str, Any]:
    """What makes tokens comparable: the tokenizer kind, its quantizer and compression, and a
    fingerprint of its weights (sha256 of ``encoder.jit`` or of ``builtin_weights``; ``seed0`` for
    the untrained built-in; None with ``weights=False``). Paths are left out so shards made on
    another machine still match. Stored in token shards; training compares it with the run's
    ``model.tokenizer``."""
    ident: Dict[str, Any] = {
        "levels": [int(v) for v in cfg.levels],
        "temporal_compression": int(cfg.temporal_compression),
        "spatial_compression": int(cfg.spatial_compression),
        "chunk_frames": int(cfg.chunk_frames) if cfg.chunk_frames else None,
    }
    if cfg.path:
        enc = Path(cfg.path) / ENCODER_FILE
        if not weights:
            ident.update(kind="cosmos_jit", weights=None)
        elif not enc.is_file():
            raise FileNotFoundError(f"model.tokenizer.path={cfg.path}: no {ENCODER_FILE} (expected a Cosmos discrete "
                                    "tokenizer directory, e.g. Cosmos-1.0-Tokenizer-DV8x16x16)")
        ident.update(kind="cosmos_jit", weights=f"sha256:{file_sha256(enc)}")
    else:
        fingerprint = "seed0" if not cfg.builtin_weights else f"sha256:{file_sha256(cfg.builtin_weights)}" if weights else None
        ident.update(kind="fsq", arch_version=FSQ_ARCH_VERSION, tiny_channels=int(cfg.tiny_channels), weights=fingerprint)
    return ident


# ------------------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------------------


class DiscreteVideoTokenizer(nn.Module):
    """A frozen video tokenizer with a finite vocabulary (it stays in eval mode; no gradients).

    Subclasses implement ``_encode(chunk) -> int tokens`` and ``_decode(tokens) -> video`` for one
    temporal chunk; this class checks shapes, splits clips into ``chunk_frames`` chunks and casts.
    """

    def __init__(self, cfg: DiscreteTokenizerConfig):
        super().__init__()
        validate_tokenizer_config(cfg)
        self.cfg = cfg

    # shapes --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def token_grid(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int]:
        return token_grid(self.cfg, num_frames, height, width)

    def num_frames_for(self, token_frames: int) -> int:
        return num_frames_for(self.cfg, token_frames)

    def identity(self) -> Dict[str, Any]:
        return tokenizer_identity(self.cfg)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # encode / decode ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> tokens int64 [B, T', H', W'] in [0, vocab_size)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video [B, 3, F, H, W] in [-1, 1]; got shape {tuple(video.shape)}")
        b, _, f, h, w = video.shape
        grid = self.token_grid(f, h, w)
        chunk = int(self.cfg.chunk_frames) if self.cfg.chunk_frames else f
        x = video.to(self.device, self.dtype)
        tokens = torch.cat([self._encode(c.contiguous()) for c in x.split(chunk, dim=2)], dim=1)
        if tuple(tokens.shape) != (b, *grid):
            raise ValueError(
                f"{self.describe()} turned {b} clip(s) of {f} frames at {h}x{w} into tokens of shape "
                f"{tuple(tokens.shape)}; model.tokenizer (temporal_compression={self.cfg.temporal_compression}, "
                f"spatial_compression={self.cfg.spatial_compression}, chunk_frames={self.cfg.chunk_frames}) predicts "
                f"{(b, *grid)}: set them to the tokenizer's compression (Cosmos-1 DV8x16x16: 8 and 16)"
            )
        return tokens.long()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T', H', W'] (integers in [0, vocab_size)) -> video float32 [B, 3, F, H, W] in [-1, 1]."""
        if tokens.ndim != 4 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"decode expects integer tokens [B, T', H', W']; got {tuple(tokens.shape)} {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"tokens range over [{lo}, {hi}]; the tokenizer's vocabulary is [0, {self.vocab_size}) "
                             f"(model.tokenizer.levels={list(self.cfg.levels)})")
        b, t, hh, ww = tokens.shape
        frames = self.num_frames_for(t)
        per_chunk = 1 + (int(self.cfg.chunk_frames) - 1) // int(self.cfg.temporal_compression) if self.cfg.chunk_frames else t
        x = tokens.to(self.device).long()
        video = torch.cat([self._decode(c.contiguous()) for c in x.split(per_chunk, dim=1)], dim=2)
        sc = int(self.cfg.spatial_compression)
        if tuple(video.shape) != (b, 3, frames, hh * sc, ww * sc):
            raise ValueError(
                f"{self.describe()} decoded tokens {tuple(tokens.shape)} into a video of shape {tuple(video.shape)}; "
                f"model.tokenizer (temporal_compression={self.cfg.temporal_compression}, spatial_compression={sc}) "
                f"predicts {(b, 3, frames, hh * sc, ww * sc)}"
            )
        return video.float().clamp(-1, 1)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode when Lightning switches the module to train."""
        return super().train(False)


# ------------------------------------------------------------------------------------------------
# Cosmos TorchScript checkpoints
# ------------------------------------------------------------------------------------------------


def _load_jit(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch.jit.* is deprecated in recent torch; the Cosmos tokenizers ship only as TorchScript.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path} is not a loadable TorchScript module (torch.jit.load: {e})") from e
    return module.eval()


def _jit_levels(module: nn.Module) -> Optional[List[int]]:
    """The FSQ levels a Cosmos JIT module carries (buffer ``quantizer._levels``), if any."""
    for name, buf in module.named_buffers():
        if name.rsplit(".", 1)[-1] == "_levels":
            return [int(v) for v in buf.flatten().tolist()]
    return None


class CosmosJITTokenizer(DiscreteVideoTokenizer):
    """The official Cosmos discrete video tokenizer (e.g. Cosmos-1.0-Tokenizer-DV8x16x16) from a local
    directory holding TorchScript ``encoder.jit`` and ``decoder.jit``.

    Called as NVIDIA's code calls them (Cosmos-Tokenizer ``cosmos_tokenizer/video_lib.py``, Cosmos
    ``cosmos1/models/autoregressive/tokenizer/discrete_video.py``): the encoder takes a video
    ``[B, 3, F, H, W]`` in [-1, 1] in the module's dtype (bfloat16 in Cosmos; ``.to(dtype)`` this
    module) and returns ``(indices [B, T', H', W'], codes [B, 6, T', H', W'], quant_loss)``; the
    decoder takes the indices and returns the video in [-1, 1]. Clips of ``chunk_frames`` frames are
    encoded independently (Cosmos AR: 33 frames -> 5 token frames).
    """

    def __init__(self, cfg: DiscreteTokenizerConfig):
        super().__init__(cfg)
        root = Path(cfg.path)
        what = "a Cosmos discrete tokenizer directory with encoder.jit and decoder.jit (e.g. Cosmos-1.0-Tokenizer-DV8x16x16)"
        if not root.is_dir():
            raise FileNotFoundError(f"model.tokenizer.path={cfg.path} is not a directory; expected {what}")
        missing = [n for n in (ENCODER_FILE, DECODER_FILE) if not (root / n).is_file()]
        if missing:
            found = sorted(p.name for p in root.iterdir())[:12]
            raise FileNotFoundError(f"model.tokenizer.path={cfg.path}: missing {' and '.join(missing)} "
                                    f"(the directory holds {found}); expected {what}")
        # As Cosmos does: the TensorExpr fuser can make consecutive calls of a JIT model differ
        # (pytorch/pytorch#74534).
        set_fuser = getattr(torch._C, "_jit_set_texpr_fuser_enabled", None)
        if set_fuser is not None:
            set_fuser(False)
        self.encoder = _load_jit(root / ENCODER_FILE)
        self.decoder = _load_jit(root / DECODER_FILE)
        want = [int(v) for v in cfg.levels]
        for name, module in ((ENCODER_FILE, self.encoder), (DECODER_FILE, self.decoder)):
            levels = _jit_levels(module)
            if levels is not None and levels != want:
                raise ValueError(f"model.tokenizer.levels={want} (vocabulary {cfg.vocab_size}) but {root / name} quantizes "
                                 f"with FSQ levels {levels} (vocabulary {math.prod(levels)}); set model.tokenizer.levels="
                                 f"[{','.join(map(str, levels))}]")
        self.requires_grad_(False).eval()

    def describe(self) -> str:
        return f"the Cosmos tokenizer at {self.cfg.path}"

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        out = self.encoder(video)
        if isinstance(out, torch.Tensor):
            raise ValueError(f"{Path(self.cfg.path) / ENCODER_FILE} returned a single tensor {tuple(out.shape)}: a continuous "
                             "tokenizer (CV)? The AR family needs a discrete one (DV), whose encoder returns "
                             "(indices, codes, loss)")
        if not isinstance(out, (tuple, list)) or len(out) < 2 or not isinstance(out[0], torch.Tensor):
            raise ValueError(f"{Path(self.cfg.path) / ENCODER_FILE} returned {type(out).__name__}; expected a Cosmos DV "
                             "encoder's (indices, codes, loss)")
        indices = out[0]
        if indices.is_floating_point() or indices.ndim != 4:
            raise ValueError(f"{Path(self.cfg.path) / ENCODER_FILE} returned indices {tuple(indices.shape)} {indices.dtype}; "
                             "expected integers [B, T', H', W'] (a single-FSQ Cosmos DV tokenizer)")
        return indices.long()

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.decoder(tokens)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


# ------------------------------------------------------------------------------------------------
# The built-in FSQ tokenizer
# ------------------------------------------------------------------------------------------------


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

    Each of the ``len(levels)`` code dimensions is bounded with tanh to ``levels[i]`` values and
    rounded with a straight-through gradient; codes are those integers rescaled to [-1, 1]
    (divided by ``levels[i] // 2``) and the token index is their mixed-radix number (basis
    ``[1, L0, L0*L1, ...]``), the convention of the Cosmos tokenizers' ``FSQuantizer``.
    Inputs and outputs are channel-last ``[..., len(levels)]``.
    """

    def __init__(self, levels, eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"FSQ levels {levels}: each must be >= 2")
        basis = [1]
        for v in levels[:-1]:
            basis.append(basis[-1] * v)
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = eps
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    def _half_width(self) -> torch.Tensor:
        return (self._levels // 2).to(torch.float32)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` so that rounding gives ``levels[i]`` integer values per dimension."""
        levels = self._levels.to(torch.float32)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(torch.float32)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z.float() + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Codes in [-1, 1] (float32); the forward value is exactly the rounded code, the gradient
        that of the bound (straight-through)."""
        b = self.bound(z)
        q = torch.round(b).detach() + (b - b.detach())
        return q / self._half_width()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[-1] != self.dim:
            raise ValueError(f"codes have {codes.shape[-1]} channels in the last dimension; FSQ {self.levels} has {self.dim}")
        hw = self._half_width()
        digits = torch.round(codes.detach().float() * hw + hw).long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        hw = self._levels // 2
        return (digits - hw).to(torch.float32) / hw.to(torch.float32)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., D] -> (codes [..., D] with straight-through gradient, indices int64 [...])."""
        codes = self.quantize(z)
        return codes, self.codes_to_indices(codes)


def _pad_front(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat the first frame ``n`` times in front (causal padding in time)."""
    if n <= 0:
        return x
    return torch.cat([x[:, :, :1].expand(-1, -1, n, -1, -1), x], dim=2)


class _CausalConv3d(nn.Module):
    """A (kt, ks, ks) convolution that sees only the current and past frames (the first frame is
    replicated in front). Run as a 2D convolution over the ``kt`` stacked frames, folded into the
    batch: far faster than Conv3d on CPU (its backward especially), the same function."""

    def __init__(self, cin: int, cout: int, kt: int = 1, ks: int = 3, stride: int = 1):
        super().__init__()
        self.kt = kt
        self.conv = nn.Conv2d(cin * kt, cout, ks, stride=stride, padding=ks // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.kt > 1:
            xp = _pad_front(x, self.kt - 1)
            x = torch.cat([xp[:, :, i:i + t] for i in range(self.kt)], dim=1)  # [B, kt*C, T, H, W]
        y = self.conv(x.transpose(1, 2).reshape(b * t, -1, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class _FrameNorm(nn.GroupNorm):
    """GroupNorm per frame (statistics never mix time steps, so causality holds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = _FrameNorm(8, ch), _CausalConv3d(ch, ch, kt=2)
        self.norm2, self.conv2 = _FrameNorm(8, ch), _CausalConv3d(ch, ch, kt=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _CausalConv3d(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


def _patch_size(spatial_compression: int) -> int:
    return min(4, int(spatial_compression))


class _FSQEncoder(nn.Module):
    """[B, 3, 1 + tc*k, H, W] -> [B, D, 1 + k, H/sc, W/sc]: the first frame is replicated tc-1 times in
    front so that every token frame covers tc frames (token frame 0: frame 0 alone), the frames of a
    token frame and a p x p pixel patch go to channels, then strided convs reach H/sc."""

    def __init__(self, tc: int, sc: int, ch: int, dim: int):
        super().__init__()
        self.tc, self.p = tc, _patch_size(sc)
        c0 = 3 * tc * self.p * self.p
        blocks: List[nn.Module] = [_CausalConv3d(c0, ch)]
        for _ in range(int(math.log2(sc // self.p))):
            blocks += [_ResBlock(ch), _CausalConv3d(ch, ch, stride=2)]
        blocks += [_ResBlock(ch), _FrameNorm(8, ch), nn.SiLU(), _CausalConv3d(ch, dim, ks=1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tc, p = self.tc, self.p
        x = _pad_front(video, tc - 1)
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // tc, tc, h // p, p, w // p, p)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * tc * p * p, f // tc, h // p, w // p)
        return self.blocks(x)


class _FSQDecoder(nn.Module):
    """The mirror of :class:`_FSQEncoder`: [B, D, T', h, w] -> [B, 3, 1 + tc*(T'-1), h*sc, w*sc]."""

    def __init__(self, tc: int, sc: int, ch: int, dim: int):
        super().__init__()
        self.tc, self.p = tc, _patch_size(sc)
        c0 = 3 * tc * self.p * self.p
        blocks: List[nn.Module] = [_CausalConv3d(dim, ch), _ResBlock(ch)]
        for _ in range(int(math.log2(sc // self.p))):
            blocks += [_Upsample(ch), _ResBlock(ch)]
        blocks += [_FrameNorm(8, ch), nn.SiLU(), _CausalConv3d(ch, c0)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tc, p = self.tc, self.p
        x = self.blocks(codes)
        b, _, t, h, w = x.shape
        x = x.reshape(b, 3, tc, p, p, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, 3, t * tc, h * p, w * p)
        return x[:, :, tc - 1:]


class FSQTokenizer(DiscreteVideoTokenizer):
    """The built-in discrete tokenizer: causal conv encoder -> ``len(levels)`` dims -> :class:`FSQ`
    -> conv decoder, ``temporal_compression`` x ``spatial_compression`` x ``spatial_compression``.

    Seed-0 weights (deterministic, no download) unless ``model.tokenizer.builtin_weights`` names a
    file written by :func:`save_fsq_weights` / :func:`train_fsq_tokenizer` (or a plain state dict).
    """

    def __init__(self, cfg: DiscreteTokenizerConfig):
        super().__init__(cfg)
        tc, sc, ch, dim = int(cfg.temporal_compression), int(cfg.spatial_compression), int(cfg.tiny_channels), len(cfg.levels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.encoder = _FSQEncoder(tc, sc, ch, dim)
            self.decoder = _FSQDecoder(tc, sc, ch, dim)
        self.fsq = FSQ(cfg.levels)
        if cfg.builtin_weights:
            load_fsq_weights(self, cfg.builtin_weights)
        self.requires_grad_(False).eval()

    def describe(self) -> str:
        return "the built-in FSQ tokenizer"

    def quantized(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Differentiable encode (for training the tokenizer): (codes [B, D, T', h, w] with a
        straight-through gradient, indices [B, T', h, w])."""
        z = self.encoder(video.to(self.dtype))
        codes, indices = self.fsq(z.movedim(1, -1))
        return codes.movedim(-1, 1), indices

    def reconstruct(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Differentiable autoencoding: (reconstruction [B, 3, F, H, W], unclamped; indices)."""
        codes, indices = self.quantized(video)
        return self.decoder(codes.to(self.dtype)), indices

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.quantized(video)[1]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.fsq.indices_to_codes(tokens).movedim(-1, 1)
        return self.decoder(codes.to(self.dtype))


def _fsq_meta(cfg: DiscreteTokenizerConfig) -> Dict[str, Any]:
    return {"format": _WEIGHTS_FORMAT, "arch_version": FSQ_ARCH_VERSION, "levels": [int(v) for v in cfg.levels],
            "temporal_compression": int(cfg.temporal_compression), "spatial_compression": int(cfg.spatial_compression),
            "tiny_channels": int(cfg.tiny_channels)}


def save_fsq_weights(tokenizer: FSQTokenizer, path, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the built-in tokenizer's weights (``.safetensors``, else a torch ``.pt`` file) with its
    configuration, atomically; ``model.tokenizer.builtin_weights=<path>`` loads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**_fsq_meta(tokenizer.cfg), **(extra or {})}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tokenizer.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"nemo_ext": json.dumps(meta, sort_keys=True)})
    else:
        torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def read_fsq_weights(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, metadata) of a built-in tokenizer weights file; metadata is {} for a bare state dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.tokenizer.builtin_weights={path}: no such file (train one with "
                                "`python -m nemo_ext.cli.prep train-tokenizer --out <file>`)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("nemo_ext", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        return state, meta
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj["state_dict"], dict(obj.get("meta") or {})
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"model.tokenizer.builtin_weights={path}: not a state dict or a file written by save_fsq_weights")


def load_fsq_weights(tokenizer: FSQTokenizer, path) -> None:
    state, meta = read_fsq_weights(path)
    if meta:
        want = _fsq_meta(tokenizer.cfg)
        bad = [f"{k}={meta.get(k)!r} (config: {want[k]!r})" for k in want if k != "format" and meta.get(k) != want[k]]
        if bad:
            fields = ", ".join(bad)
            raise ValueError(f"model.tokenizer.builtin_weights={path} was made for another tokenizer: {fields}; set "
                             "model.tokenizer.* to match or retrain it")
    try:
        tokenizer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"model.tokenizer.builtin_weights={path} does not fit the built-in tokenizer of "
                         f"model.tokenizer (levels={list(tokenizer.cfg.levels)}, tiny_channels={tokenizer.cfg.tiny_channels}, "
                         f"compression={tokenizer.cfg.temporal_compression}x{tokenizer.cfg.spatial_compression}): {e}") from e


def build_discrete_tokenizer(cfg: DiscreteTokenizerConfig) -> DiscreteVideoTokenizer:
    """The frozen tokenizer of ``model.tokenizer``: Cosmos JIT checkpoints when ``path`` is set,
    the built-in FSQ tokenizer otherwise. CPU, float32: move it with ``.to(device, dtype)``."""
    return CosmosJITTokenizer(cfg) if cfg.path else FSQTokenizer(cfg)


# ------------------------------------------------------------------------------------------------
# Training the built-in tokenizer
# ------------------------------------------------------------------------------------------------


@dataclass
class FSQTrainResult:
    """What :func:`train_fsq_tokenizer` did; PSNR in dB on the held-out clips, encode -> decode."""

    out: Path
    steps: int
    seconds: float
    train_videos: int
    val_clips: int
    loss_first: float  # mean reconstruction loss of the first steps (up to 10, at most half of them)
    loss_last: float  # ... and of as many last ones
    psnr_before: float
    psnr_after: float


def _decode_head(data: bytes, max_frames: int):
    """The first ``max_frames`` frames of a video (fewer if it is shorter), RGB uint8 [F, H, W, 3]."""
    import numpy as np

    from nemo_ext.data.video import VideoDecodeError, frame_converter, open_video

    container, stream = open_video(data)
    frames = []
    try:
        converter = frame_converter()
        for frame in container.decode(stream):
            frames.append(converter.reformat(frame, format="rgb24", threads=1).to_ndarray())
            if len(frames) >= max_frames:
                break
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(f"decoding failed after {len(frames)} frames: {e}") from e
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError("no decodable frames")
    return np.stack(frames)


def _load_videos(index, items, num_frames: int, height: int, width: int, resize_mode: str, max_frames: int):
    """uint8 tensors [F_i, H, W, 3] (F_i >= num_frames) of the samples ``items`` of a ShardIndex;
    videos that fail to decode or are too short are skipped with a warning."""
    from nemo_ext.data.video import VideoDecodeError, resize_and_crop

    out = []
    for i in items:
        ref = index[i]
        try:
            frames = _decode_head(index.read(i, "mp4"), max_frames)
        except VideoDecodeError as e:
            logger.warning("tokenizer training: skipping %s:%s.mp4: %s", ref.shard, ref.key, e)
            continue
        if len(frames) < num_frames:
            logger.warning("tokenizer training: skipping %s:%s.mp4: %d frames, a clip needs %d", ref.shard, ref.key,
                           len(frames), num_frames)
            continue
        out.append(torch.from_numpy(resize_and_crop(frames, height, width, resize_mode)))
    return out


def _to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., F, H, W, 3] -> float [..., 3, F, H, W] in [-1, 1]."""
    return frames.movedim(-1, -4).float().div(127.5).sub(1.0)


@torch.no_grad()
def reconstruction_psnr(tokenizer: DiscreteVideoTokenizer, videos: torch.Tensor, batch_size: int = 4) -> float:
    """Mean PSNR (dB, images in [0, 1]; the evaluation core's metric, identical clips count as its cap) of
    ``decode(encode(v))`` over clips (each clip's frames as one image)."""
    from nemo_ext.eval.metrics import capped, psnr, unit

    scores = []
    for start in range(0, len(videos), batch_size):
        v = videos[start:start + batch_size]
        r = tokenizer.decode(tokenizer.encode(v)).to(v)
        b, c, t, h, w = v.shape
        scores += capped(psnr(unit(r).reshape(b, c, t * h, w), unit(v).reshape(b, c, t * h, w))).tolist()
    return float(sum(scores) / len(scores))


def train_fsq_tokenizer(cfg: DiscreteTokenizerConfig, src, out, *, num_frames: int = 17, height: int = 64,
                        width: int = 64, steps: int = 300, batch_size: int = 4, lr: float = 2e-3,
                        val_src=None, val_clips: int = 8, max_videos: int = 256, resize_mode: str = "crop",
                        seed: int = 0, log_every: int = 50, progress: bool = True,
                        device: Optional[str] = None) -> FSQTrainResult:
    """Train the built-in FSQ tokenizer of ``cfg`` (``path`` must be null) on video shards ``src``
    with an L1 + MSE reconstruction loss and write its weights to ``out`` (``.safetensors`` or
    ``.pt``; use them with ``model.tokenizer.builtin_weights=<out>``). Starts from
    ``cfg.builtin_weights`` when set (fine-tuning), else from the seed-0 weights.

    Clips of ``num_frames`` frames at ``height x width`` are cut at random positions (and flipped
    horizontally at random) from the first ``4 * num_frames`` frames of up to ``max_videos`` videos,
    decoded once into memory. PSNR is measured before and after on held-out clips: the first
    ``val_clips`` videos of ``val_src``, or else the last ``val_clips`` videos of ``src`` (which
    are then not trained on). A few hundred steps take a few minutes on a CPU at the default size.
    ``device``: where to train (default: the GPU when there is one; the clips stay in host memory).
    """
    from nemo_ext.data.shards import ShardIndex

    if cfg.path:
        raise ValueError(f"model.tokenizer.path={cfg.path}: only the built-in FSQ tokenizer (path: null) can be trained here")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    token_grid(cfg, num_frames, height, width)  # validates the clip shape
    t0 = time.time()
    index = ShardIndex.from_paths(src, required_exts=("mp4",))
    max_frames = 4 * num_frames
    n = len(index)
    if val_src is not None:
        val_index = ShardIndex.from_paths(val_src, required_exts=("mp4",))
        val_items, train_items = range(min(val_clips, len(val_index))), range(min(n, max_videos))
    else:
        val_index = index
        if n < 2:
            raise ValueError(f"{src} holds {n} video(s); need at least 2 (some are held out for the PSNR)")
        k = max(1, min(val_clips, n // 4))
        val_items, train_items = range(n - k, n), range(min(n - k, max_videos))
    train = _load_videos(index, train_items, num_frames, height, width, resize_mode, max_frames)
    val = _load_videos(val_index, val_items, num_frames, height, width, resize_mode, num_frames)
    if not train or not val:
        raise ValueError(f"no usable {'training' if not train else 'held-out'} video with >= {num_frames} frames in "
                         f"{src if not train else (val_src or src)}")
    val_videos = _to_video(torch.stack([v[:num_frames] for v in val]))
    logger.info("tokenizer training: %d videos (%d held out) decoded in %.1fs", len(train), len(val), time.time() - t0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FSQTokenizer(cfg)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        val_videos = val_videos.to(device)
        psnr_before = reconstruction_psnr(model, val_videos)
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(seed)
        losses: List[float] = []
        from tqdm import tqdm

        bar = tqdm(range(steps), desc="train tokenizer", unit="step", disable=not progress)
        for step in bar:
            clips = []
            for _ in range(batch_size):
                v = train[int(torch.randint(len(train), (1,), generator=gen))]
                start = int(torch.randint(len(v) - num_frames + 1, (1,), generator=gen))
                clip = v[start:start + num_frames]
                if bool(torch.rand((), generator=gen) < 0.5):
                    clip = clip.flip(2)
                clips.append(clip)
            video = _to_video(torch.stack(clips)).to(device, non_blocking=True)
            recon, _ = model.reconstruct(video)
            loss = F.l1_loss(recon, video) + F.mse_loss(recon, video)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                logger.info("tokenizer training: step %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.requires_grad_(False).eval()
        psnr_after = reconstruction_psnr(model, val_videos)
        model.cpu()
    k = max(1, min(10, len(losses) // 2))
    result = FSQTrainResult(out=Path(out), steps=steps, seconds=time.time() - t0, train_videos=len(train),
                            val_clips=len(val), loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k,
                            psnr_before=psnr_before, psnr_after=psnr_after)
    save_fsq_weights(model, out, extra={"trained_steps": steps, "psnr_before": round(psnr_before, 3),
                                        "psnr_after": round(psnr_after, 3), "clip": [num_frames, height, width]})
    return result
