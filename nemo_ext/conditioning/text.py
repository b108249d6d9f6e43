"""Frozen T5 text encoder (Cosmos-1 uses T5-11B's encoder: 1024-d, 512 tokens).

``model.text_encoder.path`` is a local transformers directory holding ``T5EncoderModel`` weights
and its tokenizer. Without a path a tiny ``T5EncoderModel`` is built (random weights, seed 0,
d_model = ``model.context_dim``) with the file-free byte-level ``ByT5Tokenizer``. As in Cosmos,
embeddings beyond the caption's length are zeroed and the sequence is padded to ``max_length``.
"""

from __future__ import annotations

import os

import torch

from nemo_ext.models.dit.config import TextEncoderConfig


class T5TextEncoder(torch.nn.Module):
    def __init__(self, cfg: TextEncoderConfig, context_dim: int):
        super().__init__()
        from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

        self.cfg = cfg
        if cfg.path:
            if not os.path.isfile(os.path.join(cfg.path, "config.json")):
                raise FileNotFoundError(
                    f"model.text_encoder.path={cfg.path}: expected a transformers T5 directory with config.json"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
            self.encoder = T5EncoderModel.from_pretrained(cfg.path, local_files_only=True)
        else:
            self.tokenizer = ByT5Tokenizer()
            heads = cfg.tiny_heads
            t5 = T5Config(
                vocab_size=len(self.tokenizer),
                d_model=context_dim,
                d_kv=max(1, context_dim // heads),
                d_ff=2 * context_dim,
                num_layers=cfg.tiny_layers,
                num_heads=heads,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.encoder = T5EncoderModel(t5)
        if self.encoder.config.d_model != context_dim:
            raise ValueError(
                f"model.context_dim={context_dim} but the text encoder at {cfg.path} outputs "
                f"{self.encoder.config.d_model}-d embeddings"
            )
        self.encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeddings [B, max_length, D] fp32 with zeros past each caption, valid mask [B, max_length])."""
        tok = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(device)
        mask = tok.attention_mask.to(device).bool()
        emb = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        return emb * mask[..., None], mask

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode (no dropout) when Lightning switches the module to train."""
        return super().train(False)


class TextConditioner(torch.nn.Module):
    """The text tasks' conditioner (general, instruction): the caption's (instruction's) T5 embedding,
    computed by the frozen encoder outside the trained model, routed to cross-attention; no parameters.
    All the context's tokens are attended to (padding embeds as the encoder gives it), as Cosmos does."""

    def forward(self, batch: dict):
        from nemo_ext.conditioning import Conditioning

        return Conditioning(context=batch["context"])
