"""General post-training: learn a target video distribution conditioned on text (T5 embeddings).

The text encoder is frozen and runs outside the trained model, so the conditioner only routes
the caption embedding to cross-attention; it has no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from nemo_ext.conditioning import Conditioning
from nemo_ext.tasks.base import TaskConfig, TaskSpec, register_task


@dataclass
class GeneralTaskConfig(TaskConfig):
    name: str = "general"
    # Probability of replacing the caption by the empty prompt (classifier-free guidance training).
    caption_dropout: float = 0.0


class TextConditioner(nn.Module):
    def forward(self, batch: dict) -> Conditioning:
        return Conditioning(context=batch["context"])


GENERAL = register_task(
    TaskSpec(
        name="general",
        config_cls=GeneralTaskConfig,
        families=("diffusion", "ar"),
        sample_exts=("json",),
        sample_variant="general",
        build_conditioner=lambda task_cfg, model_cfg, data_cfg=None: TextConditioner(),
        description="a target video distribution (domain, camera spec), conditioned on text",
    )
)
