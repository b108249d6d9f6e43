"""General post-training: learn a target video distribution conditioned on text (T5 embeddings).

The text encoder is frozen and runs outside the trained model, so the conditioner only routes
the caption embedding to cross-attention; it has no parameters. The folder: this file, ``world.py``
(bouncing shapes with captions) and ``evaluation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_ext.conditioning.text import TextConditioner
from nemo_ext.tasks.base import TaskConfig, TaskSpec, register_task


@dataclass
class GeneralTaskConfig(TaskConfig):
    name: str = "general"


GENERAL = register_task(
    TaskSpec(
        name="general",
        config_cls=GeneralTaskConfig,
        families=("diffusion", "ar"),
        sample_exts=("json",),
        world="general",
        build_conditioner=lambda task_cfg, model_cfg, data_cfg=None: TextConditioner(),
        description="a target video distribution (domain, camera spec), conditioned on text",
    )
)

from nemo_ext.tasks.general import evaluation, world  # noqa: E402,F401  (register the world and the evaluation)
