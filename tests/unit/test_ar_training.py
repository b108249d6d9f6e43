"""The AR family's training sequences: next-token labels, context frames and padding out of the loss."""

from __future__ import annotations

import torch

from nemo_ext.training.ar import sequence_batch


def _grid(b=2, t=3, h=2, w=2):
    return torch.arange(b * t * h * w).reshape(b, t, h, w) % 97


def test_labels_are_the_next_token_and_context_frames_are_not_targets():
    tokens = _grid()
    inputs, labels, mask = sequence_batch(tokens, seq_length=12, condition_frames=1)
    flat = tokens.reshape(2, 12)
    assert torch.equal(inputs, flat)
    assert torch.equal(labels[:, :11], flat[:, 1:])
    # targets are tokens 1..11; tokens 0..3 (the first frame, 2x2) are context: labels 0..2 are masked
    assert mask[0].tolist() == [0, 0, 0] + [1] * 8 + [0]
    assert mask.shape == (2, 12) and mask.dtype == torch.float32


def test_bov_sequences_and_padding():
    tokens = _grid()
    inputs, labels, mask = sequence_batch(tokens, seq_length=16, condition_frames=1, bov_id=1000)
    flat = tokens.reshape(2, 12)
    assert (inputs[:, 0] == 1000).all() and torch.equal(inputs[:, 1:13], flat) and (inputs[:, 13:] == 0).all()
    assert torch.equal(labels[:, :12], flat)  # after <bov> comes token 0
    # targets 0..3 (first frame) masked, 4..11 counted, padding (12..15) never
    assert mask[0].tolist() == [0] * 4 + [1] * 8 + [0] * 4


def test_no_context_frames_with_bov_predicts_every_token():
    _, _, mask = sequence_batch(_grid(), seq_length=13, condition_frames=0, bov_id=7)
    assert mask.sum(1).tolist() == [12, 12]
