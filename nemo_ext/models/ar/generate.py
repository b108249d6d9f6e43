"""Token generation with a KV cache for :class:`~nemo_ext.models.ar.model.CosmosAR`.

The prompt is run once (prefill) with a :class:`~nemo_ext.models.ar.layer.KVCache` attached to
every self-attention layer; each new token then costs one single-token forward at its position of
the (t, h, w) grid (3D RoPE and absolute rows of that position). The cross-attention to a text
context is recomputed each step (its K/V do not depend on the tokens). The result equals running
the model on the whole prefix at every step (``tests/unit/test_ar_model.py``).

One pipeline stage (PP=1), no sequence parallelism; tensor parallelism works (the logits are
gathered over the TP group; give every TP rank the same ``generator`` seed).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from nemo_ext.models.ar.layer import CachedSDPACoreAttention, KVCache


@contextlib.contextmanager
def kv_cache(model: torch.nn.Module, max_length: int):
    """Attach a fresh KV cache to every self-attention layer of ``model`` for the duration."""
    cores = [m for m in model.modules() if isinstance(m, CachedSDPACoreAttention)]
    if not cores:
        raise ValueError(
            "KV-cache generation needs the SDPA attention path: this model was built with transformer-engine "
            "layers; build it with model.attention_backend=cudnn|flash|efficient|math"
        )
    for core in cores:
        core.kv_cache = KVCache(max_length)
    try:
        yield
    finally:
        for core in cores:
            core.kv_cache = None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 = greedy (argmax); top_k keeps the k most likely,
    top_p the smallest set whose probability reaches p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep tokens until p is reached
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_tokens: torch.Tensor,
    grid: Sequence[int],
    num_new_tokens: int,
    context: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    context_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Continue ``prompt_tokens`` [B, S0] (starting with <bov> for a Video2World model) by
    ``num_new_tokens`` tokens of the sequence of ``grid``; returns [B, S0 + num_new_tokens].

    ``model`` is a one-stage CosmosAR; ``temperature=0`` is greedy decoding. ``context`` /
    ``context_mask``: the cross-attention context of a Video2World model ([B, S_ctx, D], [B, S_ctx])."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("generate() runs one pipeline stage: use parallel.pp=1 for generation")
    if getattr(model.config, "sequence_parallel", False):
        raise ValueError("generate() decodes one token at a time: build the model without sequence parallelism")
    if prompt_tokens.dim() != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(f"prompt_tokens: expected [B, S0] with S0 >= 1, got {tuple(prompt_tokens.shape)}")
    if num_new_tokens < 0:
        raise ValueError(f"num_new_tokens={num_new_tokens} must be >= 0")
    s0 = prompt_tokens.shape[1]
    total = s0 + num_new_tokens
    if num_new_tokens == 0:
        return prompt_tokens.clone()
    was_training = model.training
    model.eval()
    out = [prompt_tokens]
    try:
        with kv_cache(model, total):
            logits = model(prompt_tokens, grid, context, context_mask)[:, -1]
            for i in range(num_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)[:, None].to(prompt_tokens.dtype)
                out.append(nxt)
                if i + 1 < num_new_tokens:
                    logits = model(nxt, grid, context, context_mask, position_offset=s0 + i)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
