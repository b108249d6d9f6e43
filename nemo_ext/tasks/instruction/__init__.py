"""instruction: video from a text instruction and the first frame(s) (Video2World).

The instruction is the caption: its T5 embedding conditions both families through cross-attention, as
in general post-training; the given first frame(s) are the Video2World condition (DiT: the first latent
frame(s) given; AR: the first token frame(s) as the prompt). Nothing new is added to the model, so a
general Video2World checkpoint is the base and step 0 is exactly it. ``task.caption_dropout`` trains
the unconditional prompt too, for classifier-free guidance (``make sample ... ARGS="--guidance 5"``).

Several instructions per episode (json ``instructions``, written by the converters): the caption is
the first; ``prep <source> --instructions each`` writes one sample per instruction instead.

The folder: this file, ``world.py`` (objects that move as the instruction says, with held-out
colour-direction pairs), ``evaluation.py`` (rollouts under the true vs another episode's instruction,
instruction-following success by colour segmentation, the human review page); converters in
``data_prep/instruction.py``; recipes in ``recipes/instruction/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_ext.conditioning.text import TextConditioner
from nemo_ext.tasks.base import TaskConfig, TaskSpec, register_task, require_video2world


@dataclass
class InstructionTaskConfig(TaskConfig):
    name: str = "instruction"


def check(task_cfg, cfg) -> None:
    require_video2world(cfg, "instruction", "continues the given first frame(s)",
                        "the instruction enters through cross-attention and the first frame is the prompt")
    if not 0.0 <= task_cfg.caption_dropout < 1.0:
        raise ValueError(f"task.caption_dropout={task_cfg.caption_dropout} must be in [0, 1)")


INSTRUCTION = register_task(
    TaskSpec(
        name="instruction",
        config_cls=InstructionTaskConfig,
        families=("diffusion", "ar"),
        sample_exts=("json",),
        world="instruction",
        build_conditioner=lambda task_cfg, model_cfg, data_cfg=None: TextConditioner(),
        check=check,
        description="video from a text instruction and the first frame(s) (T5 cross-attention, Video2World)",
    )
)

from nemo_ext.tasks.instruction import evaluation, world  # noqa: E402,F401  (register the world and the evaluation)
