"""Launch recipes on Slurm: single runs, sweeps as job arrays, sweep reports.

    python -m nemo_ext.cli.launch slurm --recipe general [--dry-run] [overrides ...]
    python -m nemo_ext.cli.launch sweep --recipe general --sweep "optim.lr=1e-5,3e-5" [--name N] [overrides ...]
    python -m nemo_ext.cli.launch sweep-report <sweep dir>

The cluster layout comes from the ``launcher`` config group (``launcher=slurm`` is implied):
``launcher.nodes=2 launcher.gpus_per_node=8 launcher.partition=batch launcher.account=proj
launcher.time=04:00:00 launcher.container=/images/cosmos.sqsh launcher.mounts=[/data:/data]``
(make: NODES= GPUS_PER_NODE= PARTITION= ACCOUNT= TIME= CONTAINER= MOUNTS=). The job script is
rendered from launchers/slurm.sbatch.j2 into the run (or sweep) directory and submitted with
sbatch; ``--dry-run`` prints it and submits nothing.

Inside the job, each srun task runs ``launch task``: it maps SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE, picks a sweep task's overrides by
SLURM_ARRAY_TASK_ID, and trains in the same process (so Slurm's SIGUSR1/SIGTERM reach the trainer,
which saves a checkpoint and, with launcher.requeue, requeues the job).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="general", help="recipe folder under recipes/ (the task)")
    p.add_argument("--family", default="diffusion", choices=["diffusion", "ar"], help="model family")
    p.add_argument("--dry-run", action="store_true", help="print the job script (and sweep tasks); submit nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every task, e.g. launcher.nodes=2 model=dit_7b")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nemo_ext.cli.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slurm", help="render + submit one Slurm job for a recipe run")
    _recipe_args(p)
    p = sub.add_parser("sweep", help="render + submit a sweep as one Slurm job array")
    _recipe_args(p)
    p.add_argument("--sweep", required=True, help='"key=v1,v2 key2=v3,...": the cartesian product is swept')
    p.add_argument("--name", default=None, help="sweep name (default sweep_<date>-<time>): runs go to <name>/<task>")
    p = sub.add_parser("sweep-report", help="tabulate a sweep's tasks: state, final/best validation loss")
    p.add_argument("sweep_dir", help="the sweep directory (runs/<recipe>/<family>_<model>/<sweep name>)")
    p = sub.add_parser("task", help="(inside a job) one srun task: map Slurm ids to ranks, then train")
    p.add_argument("--sweep", default=None, help="sweep.json: pick this array task's overrides")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train CLI's arguments")
    return parser.parse_args(argv)


def slurm_rank_environment(env=os.environ) -> dict:
    """RANK / LOCAL_RANK / WORLD_SIZE of an srun task (nothing outside srun, and a launcher's own
    values win)."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    mapped = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": env["SLURM_NTASKS"]}
    return {k: v for k, v in mapped.items() if k not in env}


def run_task(sweep: str | None, train_args: list[str]) -> int:
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    os.environ.update(slurm_rank_environment())
    if sweep:
        from nemo_ext.launch.sweep import task_overrides

        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task_id is None:
            print("launch task --sweep: SLURM_ARRAY_TASK_ID is not set (run inside the sweep's array job)", file=sys.stderr)
            return 2
        train_args = [*train_args, *task_overrides(Path(sweep), int(task_id))]
    from nemo_ext.cli.train import main as train_main

    return train_main(train_args)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "task":
        return run_task(args.sweep, args.train_args)
    from nemo_ext.config.compose import ConfigError

    try:
        if args.command == "slurm":
            from nemo_ext.launch.slurm import submit_run

            submit_run(args.recipe, args.family, args.overrides, dry_run=args.dry_run)
        elif args.command == "sweep":
            from nemo_ext.launch.sweep import submit_sweep

            submit_sweep(args.recipe, args.family, args.overrides, args.sweep, name=args.name, dry_run=args.dry_run)
        else:
            from nemo_ext.launch.sweep import sweep_report

            sweep_report(Path(args.sweep_dir))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
