"""The Cosmos AR model (CPU, one process): shapes, causality, 3D positions, KV-cache generation,
the released checkpoint layout (import/export and a forward against an independent reference of
the released network), layout validation and the FLOPs accounting."""

from __future__ import annotations

import math
import types

import pytest
import torch

LAYOUT = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None)
GRID = (3, 4, 4)


def _cfg(**kw):
    from nemo_ext.models.ar.config import ARConfig
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                max_size=[4, 8, 8], context_dim=32, attention_backend="math", name="tiny",
                tokenizer=DiscreteTokenizerConfig(levels=[8, 5, 5, 5]))
    return ARConfig(**{**base, **kw})


V2W = dict(cross_attention=True, bov_token=True, abs_pos_emb="sincos")
VARIANTS = {
    "base": {},
    "v2w": V2W,
    "learnable": dict(abs_pos_emb="learnable"),
    "12b_like": dict(kv_channels=24, yarn_scale=2.0, yarn_original_grid=[2, 3, 4], **V2W),  # attention width != hidden
}


def _model(cfg, std=None, seed=0):
    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config

    torch.manual_seed(seed)
    model = CosmosAR(build_transformer_config(cfg, LAYOUT, torch.float32), cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=std)
    return model.eval()


def _inputs(cfg, batch=2, seed=0, ctx_len=8):
    g = torch.Generator().manual_seed(seed)
    s = cfg.num_positions(GRID)
    tokens = torch.randint(0, cfg.vocab_size, (batch, s), generator=g)
    if cfg.bov_token:
        tokens[:, 0] = cfg.bov_id
    context = torch.randn(batch, ctx_len, cfg.context_dim, generator=g)
    mask = torch.ones(batch, ctx_len, dtype=torch.bool)
    mask[0, ctx_len // 2:] = False
    return tokens, context, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_loss_and_loss_mask(megatron_world, variant):
    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg, std=0.05)
    tokens, ctx, mask = _inputs(cfg)
    s = tokens.shape[1]
    logits = model(tokens, GRID, ctx, mask)
    assert logits.shape == (2, s, cfg.vocab_size)
    labels = torch.randint(0, cfg.vocab_size, tokens.shape)
    loss = model(tokens, GRID, ctx, mask, labels=labels)
    assert loss.shape == (2, s) and loss.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, s)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss_mask = torch.ones(2, s)
    loss_mask[:, :5] = 0
    masked = model(tokens, GRID, ctx, mask, labels=labels, loss_mask=loss_mask)
    assert masked[:, :5].abs().sum() == 0 and torch.equal(masked[:, 5:], loss[:, 5:])
    # Padding past the grid (zero positions) does not change the real tokens' outputs (causal).
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=tokens.dtype)], dim=1)
    torch.testing.assert_close(model(padded, GRID, ctx, mask)[:, :s], logits)


@pytest.mark.parametrize("variant", ["base", "v2w"])
def test_a_future_token_does_not_change_earlier_outputs(megatron_world, variant):
    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg, std=0.05)
    tokens, ctx, mask = _inputs(cfg)
    k = 20
    changed = tokens.clone()
    changed[:, k] = (changed[:, k] + 1) % cfg.vocab_size
    a, b = model(tokens, GRID, ctx, mask), model(changed, GRID, ctx, mask)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=0)
    assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-4


def test_positions_follow_the_3d_grid(megatron_world):
    """Token i of a (T, H, W) grid gets RoPE angle t*f_t | h*f_h | w*f_w in its bands (repeated for the
    rotate-half layout), and the same t/h/w rows of the absolute table; <bov> and padding get zeros."""
    for variant in ("base", "v2w", "learnable"):
        cfg = _cfg(**VARIANTS[variant])
        model = _model(cfg)
        s = cfg.num_positions(GRID) + 2  # two padding tokens
        rotary, absolute = model.positions(GRID, 0, s, "cpu")
        assert rotary.shape == (s, 1, 1, cfg.head_dim)
        dt, dh, dw = cfg.rope_dims
        f = lambda dim: 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2).float() / dim)  # noqa: E731
        first = 1 if cfg.bov_token else 0
        t_, h_, w_ = GRID
        for i in range(t_ * h_ * w_):
            t, h, w = i // (h_ * w_), i // w_ % h_, i % w_
            half = torch.cat([t * f(dt), h * f(dh), w * f(dw)])
            torch.testing.assert_close(rotary[first + i, 0, 0], torch.cat([half, half]))
        assert rotary[s - 2:].abs().sum() == 0
        if cfg.bov_token:
            assert rotary[0].abs().sum() == 0
        if absolute is None:
            assert cfg.abs_pos_emb is None
            continue
        assert absolute.shape == (s, 1, cfg.hidden_size) and absolute[s - 2:].abs().sum() == 0
        grid_rows = absolute[first:first + t_ * h_ * w_, 0].view(t_, h_, w_, -1)
        if cfg.abs_pos_emb == "sincos":  # bands (t, h, w): each depends on its own axis only
            bt, bh = cfg.hidden_size - 2 * (cfg.hidden_size // 6 * 2), cfg.hidden_size // 6 * 2
            assert torch.equal(grid_rows[1, 0, 0, :bt], grid_rows[1, 3, 2, :bt])
            assert torch.equal(grid_rows[0, 2, 0, bt:bt + bh], grid_rows[2, 2, 3, bt:bt + bh])
            assert torch.equal(grid_rows[0, 0, 1, bt + bh:], grid_rows[2, 3, 1, bt + bh:])
            torch.testing.assert_close(grid_rows[0, 0, 0, :bt], torch.cat([torch.zeros(bt // 2), torch.ones(bt // 2)]))
        # A window further in the sequence sees the same rows (generation's positions).
        r2, a2 = model.positions(GRID, 7, 5, "cpu")
        assert torch.equal(r2, rotary[7:12]) and torch.equal(a2, absolute[7:12])
    # The model's output depends on the grid, not only on the token count.
    cfg = _cfg()
    model = _model(cfg, std=0.3)
    tokens, _, _ = _inputs(cfg)
    assert (model(tokens, (3, 4, 4)) - model(tokens, (3, 2, 8))).abs().amax() > 1e-2
    with pytest.raises(ValueError, match="exceeds model.max_size"):
        model(tokens[:, :45], (5, 3, 3))


@pytest.mark.parametrize("variant", ["base", "v2w"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20), dict(temperature=0.9, top_p=0.8)])
def test_kv_cache_generation_equals_full_recomputation(megatron_world, variant, sampling):
    from nemo_ext.models.ar.generate import generate, sample_next

    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg, std=0.3)
    tokens, ctx, mask = _inputs(cfg)
    prompt, new = tokens[:, :9], 14
    out = generate(model, prompt, GRID, new, ctx, generator=torch.Generator().manual_seed(5), context_mask=mask, **sampling)
    assert out.shape == (2, 9 + new) and torch.equal(out[:, :9], prompt)
    gen, ref = torch.Generator().manual_seed(5), prompt
    with torch.no_grad():
        for _ in range(new):
            logits = model(ref, GRID, ctx, mask)[:, -1]
            ref = torch.cat([ref, sample_next(logits, generator=gen, **sampling)[:, None]], dim=1)
    assert torch.equal(out, ref)
    assert out[:, 9:].max() < cfg.vocab_size  # never the <bov> id


# ---------------------------------------------------------------- released checkpoint layout
def _released_state_dict(cfg, seed=0):
    """A random state dict in the released model.pt layout (``model.``-prefixed) for ``cfg``."""
    from nemo_ext.checkpoint.cosmos_ar import _expected_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in _expected_shapes(cfg).items():
        std = 0.3 if key.endswith(("norm.weight", "_norm.weight")) else 0.08
        base = 1.0 if "norm" in key else 0.0
        out["model." + key] = (base + std * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return out


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _reference_forward(sd, cfg, tokens, grid, context=None, context_mask=None):
    """The released network written out from its description (float64): Llama-3 pre-norm layers,
    wq/wk/wv/wo with per-head RMSNorm q_norm/k_norm before the 3D RoPE, GQA by repeat_interleave,
    SwiGLU w2(silu(w1 x) * w3 x), optional cross-attention (no RoPE), optional <bov> and sin-cos
    table added before every layer, final norm and untied output."""
    sd = {k[len("model."):]: v.double() for k, v in sd.items()}
    heads, groups, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    b, s = tokens.shape
    x = sd["tok_embeddings.weight"][tokens]
    # 3D RoPE (cat([t, h, w] * 2), rotate-half), YaRN on the inverse frequencies.
    dh = hd // 6 * 2
    dt = hd - 2 * dh

    def inv(dim, length):
        f = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].double() / dim))
        if cfg.yarn_scale:
            lo, hi = 2 * math.pi * cfg.yarn_beta_slow / length, 2 * math.pi * cfg.yarn_beta_fast / length
            m = ((f - lo) / (hi - lo)).clamp(0, 1)
            f = f * ((1 - m) / cfg.yarn_scale + m)
        return f

    orig = cfg.yarn_original_grid or [1, 1, 1]
    t, h, w = torch.meshgrid(*(torch.arange(n).double() for n in grid), indexing="ij")
    half = torch.cat([t.reshape(-1, 1) * inv(dt, orig[0]), h.reshape(-1, 1) * inv(dh, orig[1]),
                      w.reshape(-1, 1) * inv(dh, orig[1])], dim=1)
    ang = torch.cat([half, half], dim=1)
    pos = None
    if cfg.abs_pos_emb == "sincos":
        def sincos(dim, p):
            om = 1.0 / 10000 ** (torch.arange(dim // 2).double() / (dim / 2))
            return torch.cat([torch.sin(p[:, None] * om), torch.cos(p[:, None] * om)], dim=1)
        d = cfg.hidden_size
        ph = d // 6 * 2
        pos = torch.cat([sincos(d - 2 * ph, t.reshape(-1)), sincos(ph, h.reshape(-1)), sincos(ph, w.reshape(-1))], dim=1)
    if cfg.bov_token:
        ang = torch.cat([torch.zeros(1, hd).double(), ang])
        pos = None if pos is None else torch.cat([torch.zeros(1, pos.shape[1]).double(), pos])
    ang, pos = ang[:s], None if pos is None else pos[:s]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(u):
        u1, u2 = u.chunk(2, dim=-1)
        return u * cos + torch.cat([-u2, u1], dim=-1) * sin

    def attend(q, k, v, mask):
        k, v = k.repeat_interleave(heads // groups, dim=2), v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, q.shape[1], heads * hd)

    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        r = f"layers.{i}."
        if pos is not None:
            x = x + pos
        u = _rms(x, sd[r + "attention_norm.weight"])
        q = _rms((u @ sd[r + "attention.wq.weight"].T).view(b, s, heads, hd), sd[r + "attention.q_norm.weight"])
        k = _rms((u @ sd[r + "attention.wk.weight"].T).view(b, s, groups, hd), sd[r + "attention.k_norm.weight"])
        v = (u @ sd[r + "attention.wv.weight"].T).view(b, s, groups, hd)
        x = x + attend(rope(q), rope(k), v, causal) @ sd[r + "attention.wo.weight"].T
        if cfg.cross_attention:
            c = context.double()
            u = _rms(x, sd[r + "cross_attention_norm.weight"])
            q = _rms((u @ sd[r + "cross_attention.wq.weight"].T).view(b, s, heads, hd), sd[r + "cross_attention.q_norm.weight"])
            k = _rms((c @ sd[r + "cross_attention.wk.weight"].T).view(b, -1, groups, hd), sd[r + "cross_attention.k_norm.weight"])
            v = (c @ sd[r + "cross_attention.wv.weight"].T).view(b, -1, groups, hd)
            x = x + attend(q, k, v, context_mask[:, None, None, :]) @ sd[r + "cross_attention.wo.weight"].T
        u = _rms(x, sd[r + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(u @ sd[r + "feed_forward.w1.weight"].T) * (u @ sd[r + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[r + "feed_forward.w2.weight"].T
    return _rms(x, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("variant", ["base", "v2w", "12b_like"])
def test_released_layout_imports_to_the_same_function(megatron_world, variant):
    """Weights in the released layout, converted and loaded into CosmosAR, give the logits of an
    independent float64 implementation of the released network."""
    from nemo_ext.checkpoint.cosmos_ar import cosmos_ar_to_ours, ours_to_cosmos_ar

    cfg = _cfg(**VARIANTS[variant])
    released = _released_state_dict(cfg)
    ours = cosmos_ar_to_ours(released, cfg)
    model = _model(cfg)
    missing, unexpected = model.load_state_dict({k[len("net."):]: v.float() for k, v in ours.items()}, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    tokens, ctx, mask = _inputs(cfg)
    with torch.no_grad():
        logits = model(tokens, GRID, ctx, mask)
    ref = _reference_forward(released, cfg, tokens, GRID, ctx, mask)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    # ... and back to the released layout, bit for bit (from the loaded module's own tensors too).
    back = ours_to_cosmos_ar(ours, cfg)
    assert back.keys() == released.keys() and all(torch.equal(back[k], released[k]) for k in released)
    from_module = ours_to_cosmos_ar({"net." + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
                                     if v is not None and not k.endswith("_extra_state")}, cfg)
    assert all(torch.equal(from_module[k], released[k]) for k in released)


def test_import_export_files_round_trip_bit_exact(megatron_world, tmp_path):
    """model.pt -> our sharded checkpoint (what trainer.init_from loads) -> model.pt, bit-exact;
    mismatched architectures fail naming the tensor."""
    from nemo_ext.checkpoint.cosmos_ar import (
        ConversionError,
        ar_config_of,
        cosmos_ar_to_ours,
        export_cosmos_ar,
        import_cosmos_ar,
        read_cosmos_ar_pt,
    )

    cfg = _cfg(**V2W)
    released = _released_state_dict(cfg)
    torch.save(released, tmp_path / "model.pt")
    import_cosmos_ar(tmp_path / "model.pt", tmp_path / "ckpt", cfg)
    assert ar_config_of(tmp_path / "ckpt").architecture() == cfg.architecture()
    assert export_cosmos_ar(tmp_path / "ckpt", tmp_path / "out") == "raw"
    back = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert back.keys() == released.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], released[k]) for k in released)
    # The nested {"model": ...} form and unprefixed keys read the same.
    torch.save({"model": {k[len("model."):]: v for k, v in released.items()}}, tmp_path / "nested.pt")
    assert read_cosmos_ar_pt(tmp_path / "nested.pt").keys() == read_cosmos_ar_pt(tmp_path / "model.pt").keys()
    with pytest.raises(ConversionError, match="has no place for"):
        cosmos_ar_to_ours(released, _cfg())  # a Video2World checkpoint into a base preset
    with pytest.raises(ConversionError, match=r"attention.wk.weight: shape \(32, 64\) in the checkpoint"):
        cosmos_ar_to_ours(released, _cfg(num_attention_heads=8, num_query_groups=2, **V2W))


def test_convert_cli_imports_and_exports_ar(megatron_world, tmp_path):
    from nemo_ext.cli.convert import main
    from nemo_ext.models.ar.config import ar_preset

    cfg = ar_preset("ar_tiny")
    released = _released_state_dict(cfg)
    torch.save(released, tmp_path / "model.pt")
    assert main(["import", "--from", str(tmp_path / "model.pt"), "--to", str(tmp_path / "ckpt"), "--model", "ar_tiny"]) == 0
    assert main(["export", "--from", str(tmp_path / "ckpt"), "--to", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], released[k]) for k in released)
    assert main(["import", "--from", str(tmp_path / "model.pt"), "--to", str(tmp_path / "x")]) == 2  # --model missing


# ---------------------------------------------------------------- config, layouts, FLOPs
def test_presets_have_the_released_shapes(megatron_world):
    from nemo_ext.checkpoint.cosmos_ar import ar_template
    from nemo_ext.models.ar.config import ar_preset

    grid = ar_preset("ar_4b").token_grid(33, 640, 1024)
    assert grid == (5, 40, 64)
    expected = {"ar_4b": (16, 4096, 64000, 4), "ar_5b": (16, 4096, 64064, 5), "ar_12b": (40, 5120, 64000, 12),
                "ar_13b": (40, 5120, 64064, 13)}
    for name, (layers, hidden, emb_rows, billions) in expected.items():
        cfg = ar_preset(name)
        assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
                cfg.head_dim, cfg.vocab_size, cfg.embedding_vocab_size) == (layers, hidden, 14336, 32, 8, 128, 64000, emb_rows)
        assert cfg.rope_dims == (44, 42, 42) and cfg.rope_theta == 5e5
        assert cfg.cross_attention == (billions in (5, 13)) and cfg.bov_token == cfg.cross_attention
        assert (cfg.yarn_scale is not None) == (layers == 40)
        sd = ar_template(cfg, torch.bfloat16, prefix="")  # meta device: shapes only
        params = sum(v.data.numel() for v in sd.values() if getattr(v, "data", None) is not None)
        assert round(params / 1e9) == billions, (name, params)
    assert ar_preset("ar_5b").seq_length(grid, multiple=64) == 12864  # 12,800 tokens + <bov>, padded as released
    tiny = ar_preset("ar_tiny")
    assert tiny.token_grid(17, 64, 64) == (3, 4, 4) and tiny.vocab_size == 1000


@pytest.mark.parametrize(
    "layout,needle",
    [
        (dict(tp=4), "parallel.tp=4 exceeds model.num_query_groups=2 (GQA: each TP rank needs at least one KV group)"),
        (dict(cp=2), "parallel.cp=2: context parallelism is not supported by the AR family"),
        (dict(pp=3), "model.num_layers=2 is not divisible by parallel.pp=3"),
        (dict(tp=2, sequence_parallel=True, seq_length=49), "sequence of 49 tokens is not divisible by parallel.tp=2"),
        (dict(tp=2, sequence_parallel=True, context_len=7), "model.text_encoder.max_length=7 is not divisible"),
        (dict(sequence_parallel=True), "needs parallel.tp > 1"),
    ],
)
def test_bad_layouts_are_rejected_naming_the_keys(layout, needle):
    cfg = _cfg(**V2W)
    args = {**dict(tp=1, pp=1, cp=1, sequence_parallel=False), **layout}
    with pytest.raises(ValueError) as exc:
        cfg.check_parallel(**args)
    assert needle in str(exc.value)


def test_divisibility_errors_and_build_time_check(megatron_world):
    from nemo_ext.models.ar.model import build_transformer_config

    with pytest.raises(ValueError, match="model.ffn_hidden_size=90 is not divisible by parallel.tp=4"):
        _cfg(num_attention_heads=8, num_query_groups=4, ffn_hidden_size=90).check_parallel(4, 1, 1, False)
    with pytest.raises(ValueError, match=r"model.vocab_size=1000 .* not divisible by parallel.tp=16"):
        _cfg(num_attention_heads=16, num_query_groups=16).check_parallel(16, 1, 1, False)
    with pytest.raises(ValueError, match="num_query_groups=8 \\(GQA"):
        build_transformer_config(_cfg(num_attention_heads=32, num_query_groups=8), types.SimpleNamespace(
            tp=16, pp=1, cp=1, sequence_parallel=True, recompute=None), torch.float32)
    with pytest.raises(ValueError, match="model.tokenizer.levels"):
        _cfg(vocab_size=64000)
    with pytest.raises(ValueError, match="model.abs_pos_emb='rope'"):
        _cfg(abs_pos_emb="rope")


def test_a_new_cross_attention_starts_at_zero(megatron_world):
    """A freshly built Video2World model ignores its context (zero-initialized cross-attention output)."""
    cfg = _cfg(cross_attention=True)
    model = _model(cfg)
    tokens, ctx, mask = _inputs(cfg)
    torch.testing.assert_close(model(tokens, GRID, ctx, mask), model(tokens, GRID, 3 * ctx + 1, mask), rtol=0, atol=0)


def test_full_activation_recompute_gives_the_same_gradients(megatron_world):
    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config

    cfg = _cfg(**V2W)
    tokens, ctx, mask = _inputs(cfg)
    grads = []
    for recompute in (None, "full"):
        layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=recompute,
                                       recompute_method="uniform", recompute_num_layers=1)
        torch.manual_seed(0)
        model = CosmosAR(build_transformer_config(cfg, layout, torch.float32), cfg).train()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        model(tokens, GRID, ctx, mask, labels=tokens).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_transformer_engine_requested_but_unavailable_is_a_clear_error(megatron_world):
    with pytest.raises(ValueError, match="transformer-engine is not importable"):
        _model(_cfg(attention_backend="te"))


@pytest.mark.parametrize("variant", ["base", "v2w"])
def test_flops_per_sample_matches_a_flop_counter(megatron_world, variant):
    """Our FLOPs with the full S^2 are the forward's matmul work x 3 as torch's FLOP counter counts it
    op by op (attention included whichever SDPA kernel torch picks: support.count_matmul_flops); the
    default counts the causal half of the self-attention scores."""
    from support import count_matmul_flops

    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg)
    tokens, ctx, mask = _inputs(cfg, batch=1, ctx_len=8)
    s = tokens.shape[1]
    counted = count_matmul_flops(lambda: model(tokens, GRID, ctx, mask, labels=tokens))
    full = cfg.flops_per_sample(s, 8, causal_half=False)
    assert full / 3 == pytest.approx(sum(counted.values()), rel=1e-6), counted
    attention = 3 * cfg.num_layers * 4 * cfg.num_attention_heads * cfg.head_dim * s * s
    assert cfg.flops_per_sample(s, 8) == pytest.approx(full - attention / 2, rel=1e-9)
