"""Autoregressive family: next-token post-training of the Cosmos AR GPT over discrete video tokens.

Video is tokenized by the frozen discrete tokenizer on the fly (``data.kind=video``) or read from
token shards (``data.kind=tokens``, ``python -m nemo_ext.cli.prep tokens``); captions go through the
frozen T5 when the model cross-attends to text (Video2World presets). The training loop is the
shared one of :class:`WorldModelModule`; this file only says how a batch becomes a sequence:

    sequence = [<bov>] + grid tokens in (t, h, w) raster order, padded to plan.num_tokens
    input[j] = sequence[j], label[j] = sequence[j + 1]

The loss is the mean cross entropy over the labels that are video tokens of the predicted frames:
the first ``model.condition_frames`` token frames are context (inputs only), padding never counts.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from nemo_ext.training.module import WorldModelModule


def sequence_batch(tokens: torch.Tensor, seq_length: int, condition_frames: int, bov_id=None):
    """Token grids [B, T, H, W] -> (input ids, labels, loss mask), each [B, seq_length]."""
    b, t, h, w = tokens.shape
    ids = tokens.reshape(b, t * h * w)
    if bov_id is not None:
        ids = torch.cat([torch.full((b, 1), bov_id, dtype=ids.dtype, device=ids.device), ids], dim=1)
    n = ids.shape[1]
    if n > seq_length:
        raise ValueError(f"{n} positions do not fit the sequence length {seq_length}")
    inputs = torch.zeros(b, seq_length, dtype=torch.long, device=ids.device)
    inputs[:, :n] = ids
    labels = torch.zeros_like(inputs)
    labels[:, : n - 1] = ids[:, 1:]
    j = torch.arange(seq_length, device=ids.device)
    target = j + (0 if bov_id is not None else 1)  # the label's index in the grid's raster order
    mask = (j < n - 1) & (target >= condition_frames * h * w)
    return inputs, labels, mask.to(torch.float32).expand(b, -1).contiguous()


class ARModule(WorldModelModule):
    def build_world_model(self):
        from nemo_ext.conditioning.text import T5TextEncoder
        from nemo_ext.models.ar.model import CosmosAR, build_transformer_config
        from nemo_ext.models.world_model import WorldModel
        from nemo_ext.tokenizers.discrete import build_discrete_tokenizer

        m = self.cfg.model
        precomputed = self.cfg.data.kind == "tokens"
        # The tokenizer stays fp32: its quantizer's rounding is not something to do in bf16.
        self.tokenizer = None if precomputed else build_discrete_tokenizer(m.tokenizer)
        needs_text = m.cross_attention and self.task.uses_text(self.cfg.task) and (
            not precomputed or self.cfg.task.caption_dropout > 0)
        self.text_encoder = T5TextEncoder(m.text_encoder, m.context_dim).to(self.plan.dtype) if needs_text else None
        try:
            config = build_transformer_config(m, self.cfg.parallel, self.plan.dtype)
        except ValueError as exc:  # make_plan checked this already; keep the message if not
            raise RuntimeError(str(exc)) from None
        net = CosmosAR(
            config, m,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        return WorldModel(config, net, self.task.build_conditioner(self.cfg.task, m, self.cfg.data))

    @property
    def grid(self) -> tuple:
        return tuple(self.plan.latent_shape)

    def prepare_microbatch(self, raw: dict, index: int, validation: bool = False) -> dict:
        """A loader batch -> input ids, labels and loss mask (and the T5 context of cross-attending
        models). Caption dropout is drawn from each sample's seed, off for validation."""
        m = self.cfg.model
        device = self.compute_device
        if "tokens" in raw:
            tokens = raw["tokens"].to(device, non_blocking=True)
        else:
            tokens = self.tokenizer.encode(raw["video"].to(device, non_blocking=True))
        if tuple(tokens.shape[1:]) != self.grid:
            raise RuntimeError(f"token grid {tuple(tokens.shape[1:])} of the batch differs from the run's {self.grid}")
        inputs, labels, loss_mask = sequence_batch(tokens, self.plan.num_tokens, m.condition_frames, m.bov_id)
        batch = self.task_entries(raw, device, ("video", "tokens", "context", "context_mask"))
        batch.update(tokens=inputs, labels=labels, loss_mask=loss_mask, context=None, context_mask=None)
        if m.cross_attention and self.task.uses_text(self.cfg.task):
            p_drop = 0.0 if validation else self.cfg.task.caption_dropout
            gen = torch.Generator(device="cpu")
            dropped = []
            for seed in raw["sample_seed"].tolist():
                gen.manual_seed((self.cfg.trainer.seed * 0x9E3779B1 + seed) % (2**63 - 1))
                dropped.append(p_drop > 0 and torch.rand(1, generator=gen).item() < p_drop)
            batch["context"], batch["context_mask"] = self._text_context(raw, dropped, device)
        return batch

    def forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], None, mb, grid=self.grid, labels=mb["labels"], loss_mask=mb["loss_mask"])
        return out, partial(self._loss, mb["loss_mask"])

    @staticmethod
    def _loss(loss_mask, output):
        loss = output.float().sum() / loss_mask.sum().clamp(min=1)
        # clone: megatron divides the returned loss in place by the number of microbatches
        return loss, {"loss": loss.detach().clone()}
