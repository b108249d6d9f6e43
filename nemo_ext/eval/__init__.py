"""Evaluation of trained runs: generation from checkpoints (``generation``), for both model families."""
