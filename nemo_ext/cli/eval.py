"""Evaluate a trained run with its task's evaluation, and write a report.

    python -m nemo_ext.cli.eval --ckpt <run dir | checkpoint dir | .../last | last> [options] [key=value ...]

The run's config.yaml says which task it is; each task registers its evaluation from its folder
(``nemo_ext/tasks/<task>/evaluation.py``, on the shared core ``nemo_ext/eval/core.py``). Rollout
evaluations roll the model out over held-out episodes under the task's conditioning and under a
control that permutes it (and, with --base, the base model), and write report.json (the schema in
``nemo_ext/eval/report.py``), metrics.png and side-by-side mp4s into <run>/eval/<name>/.

Examples:
    python -m nemo_ext.cli.eval --ckpt runs/action_control/diffusion_dit_tiny_v2w_s2d/default --episodes 8
    python -m nemo_ext.cli.eval --ckpt last --recipe action_control --family ar --steps 2 --control episodes
    make recipe=action_control eval CKPT=last ARGS="--episodes 16 --sampler-steps 20"

Trailing key=value arguments override the run's config (e.g. model.tokenizer.builtin_weights=...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _evaluations_epilog() -> str:
    try:
        from nemo_ext.eval.core import EVALUATIONS

        return "evaluations:\n" + "\n".join(f"  {e.task}: {e.description}" for e in EVALUATIONS.values())
    except Exception as exc:  # noqa: BLE001 - --help must work even when a task package does not import
        return f"(cannot list the evaluations: {exc})"


def common_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemo_ext.cli.eval", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_evaluations_epilog() if add_help else None)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir, <run>/checkpoints/last, or 'last' "
                   "(the newest run of --recipe/--family/--model)")
    p.add_argument("--out", default=None, help="output directory (default: <run>/eval/<name>)")
    p.add_argument("--name", default=None, help="<run>/eval/<name> (default: step<N>_<split>_<timestamp>)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (the same noise for every rollout of an episode)")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"], help="auto: EMA when the checkpoint has it")
    p.add_argument("--weights-from", default=None, metavar="CKPT",
                   help="evaluate the run's model with another checkpoint's weights, e.g. the base model it was "
                   "post-trained from (trainer.init_from): the task's zero-initialized modules keep their init, "
                   "so the numbers are the base model's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--recipe", default=None, help="with --ckpt last, or for a checkpoint outside a run: the recipe")
    p.add_argument("--family", default=None, choices=["diffusion", "ar"], help="with --recipe (default diffusion)")
    p.add_argument("--model", default=None, help="with --recipe: the model preset (default: the recipe's)")
    return p


def task_of(ckpt: str, recipe=None, family=None, model=None) -> str:
    """The task of the run a --ckpt names (from its config.yaml; the recipe's for a loose checkpoint)."""
    from omegaconf import OmegaConf

    from nemo_ext.config.compose import ConfigError
    from nemo_ext.eval.generation import find_run_dir, resolve_last
    from nemo_ext.training.checkpoint import resolve_checkpoint

    path = resolve_last(recipe or "general", family or "diffusion", model) if ckpt == "last" else resolve_checkpoint(ckpt)
    run_dir = find_run_dir(Path(path))
    if run_dir is not None:
        return str(OmegaConf.load(run_dir / "config.yaml").task.name)
    if recipe:
        from nemo_ext.config.compose import compose

        return str(compose(recipe, family or "diffusion", [f"model={model}"] if model else []).task.name)
    raise ConfigError(f"{path} is not inside a run directory (no <run>/config.yaml): pass --recipe "
                      "(and --family / --model) to say which model it holds")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from nemo_ext.config.compose import ConfigError

    first, _ = common_parser(add_help=False).parse_known_args(argv)
    if any(a in ("-h", "--help") for a in argv) and not first.ckpt:
        common_parser().parse_args(argv)  # prints the help
    try:
        task = task_of(first.ckpt, first.recipe, first.family, first.model) if first.ckpt else None
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"eval error: {exc}", file=sys.stderr)
        return 2
    from nemo_ext.eval.core import EVALUATIONS, add_rollout_arguments, run_rollout_eval

    if task not in EVALUATIONS:
        print(f"eval error: the run at {first.ckpt} is a {task!r} task run; evaluations exist for: "
              f"{', '.join(EVALUATIONS.names())}", file=sys.stderr)
        return 2
    spec = EVALUATIONS.get(task)
    parser = common_parser()
    if spec.run is None:
        add_rollout_arguments(parser, spec.controls)
    spec.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)

    from nemo_ext.training.run import _show_our_logs

    _show_our_logs()
    try:
        return spec.run(args) if spec.run is not None else run_rollout_eval(spec, args)
    except (ConfigError, FileNotFoundError, ValueError, IndexError) as exc:  # EvalError is a ValueError
        print(f"eval error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
