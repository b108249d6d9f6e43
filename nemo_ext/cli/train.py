"""Post-train a Cosmos world model with a recipe.

    python -m nemo_ext.cli.train --recipe general [--family diffusion|ar] [hydra overrides ...]

Overrides are Hydra syntax: ``model=dit_7b``, ``parallel=tp8_sp``, ``data.path=/data/shards``,
``trainer.max_steps=1000``, ``optim.lr=1e-5``. The same command resumes the run from its last
checkpoint (``runs/<recipe>/<family>_<model>/<run_name>/checkpoints/last``). Launch several processes
with torchrun (or Slurm) for multi-GPU runs; the parallel layout is checked against the world size
before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _group_options() -> str:
    from nemo_ext.config.compose import available_recipes, recipes_dir

    lines = [f"recipes: {', '.join(available_recipes())}"]
    for group in sorted(p for p in (recipes_dir() / "_base").iterdir() if p.is_dir()):
        names = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name}=<{'|'.join(names)}>")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m nemo_ext.cli.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config groups and presets:\n" + _safe(_group_options),
    )
    parser.add_argument("--recipe", default="general", help="recipe folder under recipes/ (the task)")
    parser.add_argument("--family", default="diffusion", choices=["diffusion", "ar"], help="model family")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every third-party notice as it is (default: known-benign ones, such as the "
                        "Transformer Engine fallbacks, become one line each; env COSMOS_VERBOSE=1 does the same)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=10")
    return parser.parse_args(argv)


def _safe(fn) -> str:
    try:
        return fn()
    except Exception as exc:  # --help must work even with a broken recipes dir
        return f"(cannot list: {exc})"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from omegaconf import OmegaConf

    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.config.plan import make_plan
    from nemo_ext.data.shards import ShardError, check_data_paths

    try:
        composed = compose(args.recipe, args.family, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(composed), end="")
            return 0
        cfg = to_typed(composed)
        plan = make_plan(cfg)
        check_data_paths(cfg.data)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2

    from nemo.core.config import hydra_runner

    from nemo_ext.training.run import run_training

    # The composed config goes through NeMo's hydra_runner task-function path (cfg_passthrough):
    # recipe selection and the checks above need our own composition step first.
    @hydra_runner(config_path=None, config_name=None)
    def task(_cfg):
        return run_training(cfg, plan, composed=_cfg)

    task(composed)
    from nemo_ext.training.preemption import read_status

    status = read_status(plan.run_dir) or {}
    print(f"run directory: {Path(plan.run_dir).resolve()}")
    if status.get("state") == "preempted":
        then = "the job was requeued and resumes there" if status.get("requeued") else "run the same command to resume"
        print(f"stopped by {status.get('signal')} at step {status.get('step')} (checkpoint saved): {then}")
    return 0


if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices(verbose="-v" in sys.argv[1:] or "--verbose" in sys.argv[1:])
    sys.exit(main())
