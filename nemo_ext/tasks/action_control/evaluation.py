"""action_control's evaluation on the shared core (``make recipe=action_control eval CKPT=...``).

Rollouts from each held-out episode's first frame through its action sequence, ``task.chunk``
actions per chunk, under the true actions and under the control: the actions permuted across time
(``--control time``, default) or swapped between episodes (``--control episodes``). For the procedural
action world (json ``variant: action``) the ground-truth control replays every episode in the world's
simulator (:func:`nemo_ext.tasks.action_control.world.render_action_episode`) under both: how
different the permuted future really is (the largest gap a perfect model could show). The verdict:
the shared rule on the paired PSNR gaps over the control and over the base model (``--base``),
margin 0.25 dB.

Pixel metrics need a decodable tokenizer: the random-weight tiny VAE (``dit_tiny_v2w``) and the
untrained built-in FSQ tokenizer make them meaningless (plumbing only; the report says so). Use
``model=dit_tiny_v2w_s2d`` (exactly invertible space-to-depth) for small diffusion experiments, a
trained FSQ tokenizer for AR, or real Cosmos tokenizers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_ext.eval.core import Evaluation, register_evaluation, require_one_given_frame
from nemo_ext.eval.episodes import Episode, EvalError, to_video


class SimulatorPredictor:
    """The action world's simulator as a predictor (the ground truth for any actions): the episode's
    ``(seed, index)`` re-rendered under the action prefix."""

    def __init__(self, episodes: Sequence[Episode], height: int, width: int, resize_mode: str = "crop"):
        self.episodes = {ep.index: ep for ep in episodes}
        self.size = (height, width, resize_mode)

    @staticmethod
    def supports(episode: Episode) -> bool:
        m = episode.meta
        return m.get("variant") == "action" and all(k in m for k in ("seed", "index", "height", "width"))

    def __call__(self, current, cond, step, ids):
        from nemo_ext.data.video import resize_and_crop
        from nemo_ext.tasks.action_control.world import render_action_episode
        from nemo_ext.worlds import WorldSpec

        prefix = cond["actions_prefix"]
        chunk = cond["actions"].shape[1]
        out = []
        for row, i in enumerate(ids):
            m = self.episodes[i].meta
            spec = WorldSpec(num_frames=prefix.shape[1] + 1, height=int(m["height"]), width=int(m["width"]),
                             fps=float(m.get("fps") or 8))
            frames, _, _ = render_action_episode(spec, int(m["seed"]), int(m["index"]), actions=prefix[row].numpy())
            h, w, mode = self.size
            out.append(to_video(resize_and_crop(frames[-chunk:], h, w, mode)))
        return torch.stack(out)


def simulator(episodes, cfg):
    if not all(SimulatorPredictor.supports(ep) for ep in episodes):
        return None
    return SimulatorPredictor(episodes, cfg.data.height, cfg.data.width, cfg.data.resize_mode)


def check_run(run) -> None:
    cfg = run.cfg
    require_one_given_frame(run)
    if cfg.data.num_frames != cfg.task.chunk + 1:
        raise EvalError(f"data.num_frames={cfg.data.num_frames} but task.chunk={cfg.task.chunk}: a clip is 1 + chunk frames")


ACTION_CONTROL_EVALUATION = register_evaluation(Evaluation(
    task="action_control",
    description="autoregressive rollouts over held-out episodes from the first frame and the full action sequence; "
                "per-step PSNR / SSIM, latent L2 (diffusion) or token accuracy (AR); the same rollout with the actions "
                "permuted (the control) and by the base model; the simulator's ground truth under both",
    signal="actions",
    controls=("time", "episodes"),
    margin_db=0.25,
    chunk=lambda cfg: cfg.task.chunk,
    dims=lambda cfg: {"actions": (cfg.task.action_dim, "task.action_dim")},
    check_run=check_run,
    simulator=simulator,
    panels=("ground truth", "prediction", "prediction with permuted actions"),
    control_label="permuted actions",
))
