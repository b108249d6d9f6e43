"""Discrete video tokenizers (built-in FSQ, Cosmos TorchScript loader), token shards, tokenizer training."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemo_ext.data.shards import ShardError, ShardIndex, read_manifest
from nemo_ext.data.tokens import (
    TokenClipDataset,
    build_token_dataset,
    check_token_manifests,
    precompute_tokens,
    token_dtype,
    token_spec,
)
from nemo_ext.models.dit.config import TextEncoderConfig
from nemo_ext.tokenizers.discrete import (
    FSQ,
    CosmosJITTokenizer,
    DiscreteTokenizerConfig,
    FSQTokenizer,
    build_discrete_tokenizer,
    reconstruction_psnr,
    save_fsq_weights,
    token_grid,
    tokenizer_identity,
    train_fsq_tokenizer,
)

SMALL = DiscreteTokenizerConfig(levels=[8, 5, 5, 5], tiny_channels=16)  # the ar_tiny preset's tokenizer


def video(b=2, f=17, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 3, h // 16, w // 16, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(f, h, w), mode="trilinear")


# ------------------------------------------------------------------------------------------------
# shapes, FSQ
# ------------------------------------------------------------------------------------------------


def test_token_grid_follows_the_causal_compression():
    cfg = DiscreteTokenizerConfig()
    assert token_grid(cfg, 17, 64, 64) == (3, 4, 4)
    assert token_grid(cfg, 33, 640, 1024) == (5, 40, 64)  # Cosmos-1 AR: 33 frames at 640x1024
    assert token_grid(cfg, 1, 32, 48) == (1, 2, 3)
    assert token_grid(replace(cfg, chunk_frames=9), 18, 64, 64) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"1 \+ 8k frames"):
        token_grid(cfg, 16, 64, 64)
    with pytest.raises(ValueError, match="multiples of the tokenizer's spatial compression 16"):
        token_grid(cfg, 17, 64, 72)
    with pytest.raises(ValueError, match="chunk_frames=9"):
        token_grid(replace(cfg, chunk_frames=9), 17, 64, 64)
    with pytest.raises(ValueError, match="levels"):
        FSQTokenizer(replace(cfg, levels=[8, 1]))


@pytest.mark.parametrize("levels", [[8, 8, 8, 5, 5, 5], [8, 5, 5, 5], [7, 4, 3]])
def test_fsq_indices_codes_and_straight_through_gradient(levels):
    fsq = FSQ(levels)
    vocab = int(np.prod(levels))
    z = (torch.randn(4, 5, 7, len(levels), generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    codes, indices = fsq(z)
    assert indices.dtype == torch.int64 and indices.shape == (4, 5, 7)
    assert int(indices.min()) >= 0 and int(indices.max()) < vocab
    assert float(codes.detach().abs().max()) <= 1.0
    # codes round trip through indices exactly, and every index is a distinct code
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(codes.detach())), codes.detach())
    every = torch.arange(vocab)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(every)), every)
    # straight-through: the rounding passes the bound's gradient
    (codes * torch.linspace(0.5, 1.5, len(levels))).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad.abs() > 0).float().mean() > 0.5


# ------------------------------------------------------------------------------------------------
# the built-in FSQ tokenizer
# ------------------------------------------------------------------------------------------------


def test_fsq_tokenizer_round_trip_is_frozen_deterministic_and_causal():
    tok = build_discrete_tokenizer(SMALL)
    assert isinstance(tok, FSQTokenizer) and tok.vocab_size == 1000
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training
    v = video()
    tokens = tok.encode(v)
    assert tokens.shape == (2, 3, 4, 4) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    rec = tok.decode(tokens)
    assert rec.shape == v.shape and rec.dtype == torch.float32 and float(rec.abs().max()) <= 1.0
    assert torch.equal(build_discrete_tokenizer(SMALL).encode(v), tokens)  # seed-0 weights
    # token frame 0 sees frame 0, frame 1 frames 1-8: changing frames 9.. leaves them as they were
    later = v.clone()
    later[:, :, 9:] = -later[:, :, 9:]
    assert torch.equal(tok.encode(later)[:, :2], tokens[:, :2])
    # chunked: two 9-frame chunks are encoded independently
    chunked = build_discrete_tokenizer(replace(SMALL, chunk_frames=9))
    v18 = video(f=18)
    both = chunked.encode(v18)
    assert both.shape == (2, 4, 4, 4)
    assert torch.equal(both, torch.cat([tok.encode(v18[:, :, :9]), tok.encode(v18[:, :, 9:])], dim=1))
    assert chunked.decode(both).shape == v18.shape
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode(torch.full((1, 1, 2, 2), 1000))


def test_fsq_weights_save_load_and_mismatch(tmp_path):
    tok = FSQTokenizer(SMALL)
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.01 * torch.randn_like(p))
    v = video()
    for name in ("w.safetensors", "w.pt"):
        path = save_fsq_weights(tok, tmp_path / name)
        loaded = build_discrete_tokenizer(replace(SMALL, builtin_weights=str(path)))
        assert torch.equal(loaded.encode(v), tok.encode(v))
        assert tokenizer_identity(loaded.cfg)["weights"].startswith("sha256:")
    assert tokenizer_identity(SMALL)["weights"] == "seed0"
    with pytest.raises(ValueError, match="levels"):
        FSQTokenizer(replace(SMALL, levels=[8, 8, 5, 5], builtin_weights=str(tmp_path / "w.pt")))
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        FSQTokenizer(replace(SMALL, builtin_weights=str(tmp_path / "missing.pt")))


# ------------------------------------------------------------------------------------------------
# Cosmos TorchScript checkpoints (tiny stand-ins with the same call signature)
# ------------------------------------------------------------------------------------------------


class _Quantizer(nn.Module):
    def __init__(self, levels):
        super().__init__()
        basis = np.cumprod([1] + list(levels[:-1])).tolist()
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int32), persistent=False)


class TinyCosmosEncoder(nn.Module):
    """Like Cosmos ``encoder.jit`` (encoder -> quant_conv -> FSQ): video [B,3,1+tc*k,H,W] in [-1,1] ->
    (indices int32 [B,1+k,H/sc,W/sc], codes [B,D,1+k,H/sc,W/sc], loss)."""

    def __init__(self, levels, tc: int = 8, sc: int = 16):
        super().__init__()
        self.tc, self.sc = tc, sc
        self.quant_conv = nn.Conv3d(3, len(levels), 1)
        self.quantizer = _Quantizer(levels)

    def forward(self, x: torch.Tensor):
        b, c, t, h, w = x.shape
        rest = x[:, :, 1:].reshape(b, c, (t - 1) // self.tc, self.tc, h, w).mean(3)
        x = torch.cat([x[:, :, :1], rest], 2)
        x = F.avg_pool3d(x.float(), (1, self.sc, self.sc)).to(rest.dtype)  # no bf16 pooling on CPU
        z = self.quant_conv(x).float()
        levels = self.quantizer._levels.view(1, -1, 1, 1, 1)
        digits = torch.round((torch.tanh(z) + 1) / 2 * (levels - 1).float()).to(torch.int32)
        half = torch.div(levels, 2, rounding_mode="floor")
        codes = (digits - half).float() / half.float()
        indices = (digits * self.quantizer._basis.view(1, -1, 1, 1, 1)).sum(1).to(torch.int32)
        return indices, codes.to(x.dtype), torch.zeros(1, dtype=x.dtype)


class _InvQuant(nn.Module):
    def __init__(self, levels):
        super().__init__()
        self.quantizer = _Quantizer(levels)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.long().unsqueeze(1)
        levels = self.quantizer._levels.long().view(1, -1, 1, 1, 1)
        digits = torch.div(idx, self.quantizer._basis.long().view(1, -1, 1, 1, 1), rounding_mode="floor") % levels
        half = torch.div(levels, 2, rounding_mode="floor")
        return (digits - half).float() / half.float()


class TinyCosmosDecoder(nn.Module):
    """Like Cosmos ``decoder.jit`` (inv_quant -> post_quant_conv -> decoder): indices -> video."""

    def __init__(self, levels, tc: int = 8, sc: int = 16):
        super().__init__()
        self.tc, self.sc = tc, sc
        self.inv_quant = _InvQuant(levels)
        self.post_quant_conv = nn.Conv3d(len(levels), 3, 1)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.inv_quant(indices)
        x = self.post_quant_conv(codes.to(self.post_quant_conv.weight.dtype))
        x = torch.cat([x[:, :, :1], torch.repeat_interleave(x[:, :, 1:], self.tc, dim=2)], 2)
        x = torch.repeat_interleave(torch.repeat_interleave(x, self.sc, dim=3), self.sc, dim=4)
        return torch.tanh(x)


class ContinuousEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::8, ::8, ::8]


def write_jit(folder: Path, levels=(8, 5, 5, 5), tc=8, sc=16, encoder=None, decoder=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(encoder if encoder is not None else TinyCosmosEncoder(list(levels), tc, sc)),
                   str(folder / "encoder.jit"))
    if decoder:
        torch.jit.save(torch.jit.script(TinyCosmosDecoder(list(levels), tc, sc)), str(folder / "decoder.jit"))
    return folder


def test_cosmos_jit_tokenizer_loads_and_calls_like_cosmos(tmp_path):
    folder = write_jit(tmp_path / "dv")
    cfg = replace(SMALL, path=str(folder))
    tok = build_discrete_tokenizer(cfg)
    assert isinstance(tok, CosmosJITTokenizer) and not tok.training
    assert not any(p.requires_grad for p in tok.parameters())
    v = video()
    tokens = tok.encode(v)
    assert tokens.shape == (2, 3, 4, 4) and tokens.dtype == torch.int64
    ref = torch.jit.load(str(folder / "encoder.jit"))(v)[0]
    assert torch.equal(tokens, ref.long())
    rec = tok.decode(tokens)
    assert rec.shape == v.shape and float(rec.abs().max()) <= 1.0
    # in bfloat16, as the Cosmos pipelines run it: the input is cast, the output comes back as float32
    tok16 = build_discrete_tokenizer(cfg).to(torch.bfloat16)
    assert tok16.encode(v).shape == tokens.shape and tok16.decode(tokens).dtype == torch.float32
    ident = tokenizer_identity(cfg)
    assert ident["kind"] == "cosmos_jit" and ident["weights"] == \
        "sha256:" + hashlib.sha256((folder / "encoder.jit").read_bytes()).hexdigest()


def test_cosmos_jit_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_discrete_tokenizer(replace(SMALL, path=str(tmp_path / "nowhere")))
    half = write_jit(tmp_path / "half", decoder=False)
    with pytest.raises(FileNotFoundError, match="missing decoder.jit"):
        build_discrete_tokenizer(replace(SMALL, path=str(half)))
    dv = write_jit(tmp_path / "dv")
    with pytest.raises(ValueError, match=r"levels=\[8,5,5,5\]"):
        build_discrete_tokenizer(replace(SMALL, path=str(dv), levels=[8, 8, 8, 5, 5, 5]))
    with pytest.raises(ValueError, match="spatial_compression=8"):
        build_discrete_tokenizer(replace(SMALL, path=str(dv), spatial_compression=8)).encode(video())
    cont = write_jit(tmp_path / "cv", encoder=ContinuousEncoder())
    with pytest.raises(ValueError, match="continuous"):
        build_discrete_tokenizer(replace(SMALL, path=str(cont))).encode(video())
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "encoder.jit").write_bytes(b"not torchscript")
    (junk / "decoder.jit").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="TorchScript"):
        build_discrete_tokenizer(replace(SMALL, path=str(junk)))


# ------------------------------------------------------------------------------------------------
# token shards
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nemo_ext.worlds import generate

    return generate(tmp_path_factory.mktemp("world"), num_videos=6, num_frames=17, height=64, width=64,
                    shard_max_count=4, progress=False)


def run_cfg(tokenizer=SMALL, cross_attention=False, num_frames=17):
    model = SimpleNamespace(tokenizer=tokenizer, cross_attention=cross_attention, context_dim=32,
                            text_encoder=TextEncoderConfig(max_length=16))
    data = SimpleNamespace(num_frames=num_frames, height=64, width=64, frame_stride=1, resize_mode="crop")
    return SimpleNamespace(model=model, data=data, task=SimpleNamespace(name="general"))


def test_token_shards_round_trip(world, tmp_path):
    cfg = run_cfg()
    out = precompute_tokens(cfg, world, tmp_path / "tokens", batch_size=4, device="cpu", progress=False)
    ds = build_token_dataset(cfg, out)
    assert len(ds) == 6
    raw = np.load(io.BytesIO(ds.index.read(0, "tokens.npy")))
    assert raw.dtype == np.uint16 and raw.shape == (3, 4, 4)
    meta = json.loads(ds.index.read(0, "json"))
    assert meta["caption"] and meta["tokens"]["grid"] == [3, 4, 4] and meta["tokens"]["vocab_size"] == 1000
    assert not ds.index.has(0, "t5.pth")  # no cross-attention: no text embeddings
    item = ds[(2, 11)]
    assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (3, 4, 4)
    assert item["key"] == ds.index[2].key and item["sample_seed"] == 11 and "context" not in item
    # the tokens are the tokenizer's tokens of the clip the video loader cuts
    from nemo_ext.data.dataset import VideoClipDataset

    clips = VideoClipDataset(ShardIndex.from_paths(world), 17, 64, 64, clip_sampling="start")
    direct = FSQTokenizer(SMALL).encode(clips[(2, 0)]["video"][None])[0]
    assert torch.equal(item["tokens"], direct)
    # deterministic: byte-identical shards; the same command again is a no-op; other inputs are refused
    again = precompute_tokens(cfg, world, tmp_path / "again", batch_size=2, device="cpu", progress=False)
    shas = [[s["sha256"] for s in read_manifest(d)["shards"]] for d in (out, again)]
    assert shas[0] == shas[1]
    assert precompute_tokens(cfg, world, out, device="cpu", progress=False) == out
    with pytest.raises(ValueError, match="other inputs"):
        precompute_tokens(run_cfg(num_frames=9), world, out, device="cpu", progress=False)
    assert token_dtype(64000) == np.uint16 and token_dtype(1 << 17) == np.int32


def test_token_shards_mismatch_is_a_clear_error(world, tmp_path):
    cfg = run_cfg(cross_attention=True)
    out = precompute_tokens(cfg, world, tmp_path / "tokens", device="cpu", dtype=torch.float32, progress=False)
    item = build_token_dataset(cfg, out)[0]
    assert item["context"].shape == (16, 32) and item["context_mask"].dtype == torch.bool
    other = run_cfg(tokenizer=replace(SMALL, tiny_channels=8), cross_attention=True)
    with pytest.raises(ShardError, match="another tokenizer.*tiny_channels"):
        build_token_dataset(other, out)
    index = ShardIndex.from_paths(out)
    with pytest.raises(ShardError, match="another tokenizer"):  # also per sample, without a manifest
        TokenClipDataset(index, token_spec(other))[0]
    with pytest.raises(ShardError, match=r"token grid is \(3, 4, 4\), the run expects \(2, 4, 4\)"):
        build_token_dataset(run_cfg(num_frames=9, cross_attention=True), out)
    with pytest.raises(ShardError, match="T5 embeddings"):
        check_token_manifests(str(out), replace(token_spec(cfg), context_shape=(16, 64)))
    with pytest.raises(ShardError, match="not token shards"):
        build_token_dataset(cfg, world)
    # a training machine without the tokenizer's weights checks everything but the weights
    elsewhere = run_cfg(tokenizer=replace(SMALL, builtin_weights=str(tmp_path / "absent.pt")), cross_attention=True)
    assert token_spec(elsewhere).tokenizer["weights"] is None
    assert build_token_dataset(elsewhere, out)[0]["tokens"].shape == (3, 4, 4)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        precompute_tokens(elsewhere, world, tmp_path / "t2", device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------
# training the built-in tokenizer
# ------------------------------------------------------------------------------------------------


def test_train_tokenizer_lowers_the_reconstruction_loss(world, tmp_path):
    out = tmp_path / "fsq.safetensors"
    result = train_fsq_tokenizer(SMALL, world, out, steps=12, batch_size=2, lr=3e-3, val_clips=2, progress=False)
    assert result.loss_last < result.loss_first
    assert result.train_videos == 5 and result.val_clips == 1
    assert np.isfinite(result.psnr_before) and np.isfinite(result.psnr_after)
    trained = build_discrete_tokenizer(replace(SMALL, builtin_weights=str(out)))
    v = video(b=1)
    assert reconstruction_psnr(trained, v) == pytest.approx(reconstruction_psnr(trained, v))
    assert not torch.equal(trained.encoder.blocks[0].conv.weight, FSQTokenizer(SMALL).encoder.blocks[0].conv.weight)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "recipes/general/recipe_ar.yaml").is_file(),
                    reason="the general recipe has no AR family yet")
def test_prep_cli_tokens_and_train_tokenizer(world, tmp_path, capsys):
    from nemo_ext.cli.prep import main

    weights = tmp_path / "fsq.pt"
    assert main(["train-tokenizer", "--family", "ar", "--out", str(weights), "--data", str(world), "--steps", "2",
                 "--batch-size", "1", "--val-clips", "1", "--no-progress"]) == 0
    assert "PSNR" in capsys.readouterr().out and weights.is_file()
    out = tmp_path / "tokens"
    assert main(["tokens", "--from", str(world), "--out", str(out), "--family", "ar",
                 f"model.tokenizer.builtin_weights={weights}"]) == 0
    assert read_manifest(out)["extra"]["spec"]["tokenizer"]["weights"].startswith("sha256:")
    assert main(["tokens", "--from", str(world), "--out", str(tmp_path / "d"), "--family", "diffusion"]) == 2
