"""Slurm jobs of a recipe: render ``launchers/slurm.sbatch.j2``, keep the script with the run, submit.

Layout choice (DESIGN.md section 0): **one srun task per GPU** (``--ntasks-per-node=<gpus>``), each
task mapping SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE
(``python -m nemo_ext.cli.launch task``). No torchrun inside the job: its agent does not forward
SIGUSR1, and the preemption warning must reach the trainer. CPU-only nodes (``gpus_per_node=0``)
run ``tasks_per_node`` processes each (gloo), which is how the tests drive a real local cluster.

Every configuration is composed and checked against the job's world size (nodes x tasks per node)
before anything is written or submitted: a layout that cannot fit is an error at the prompt, not in
the queue an hour later.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nemo_ext.config.compose import ConfigError, compose, to_typed

# Overrides the launcher sets itself in the job's train command (absolute paths, the device).
_LAUNCH_OWNED = ("runs_dir", "trainer.device")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def template_path() -> Path:
    return repo_root() / "launchers" / "slurm.sbatch.j2"


def with_slurm_launcher(overrides: list[str]) -> list[str]:
    """``launcher=slurm`` unless the overrides pick a launcher preset themselves."""
    if any(o.split("=", 1)[0].lstrip("+~") == "launcher" for o in overrides):
        return list(overrides)
    return ["launcher=slurm", *overrides]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class LaunchSpec:
    """One sbatch submission: a recipe run (or a sweep's array of runs) and its launcher settings."""

    recipe: str
    family: str
    overrides: list[str]  # Hydra overrides shared by every task (launcher=slurm included)
    launcher: object  # LauncherConfig of the composed config
    runs_dir: Path  # absolute
    extra_train_args: list[str] = field(default_factory=list)

    @property
    def gpus_per_node(self) -> int:
        return self.launcher.gpus_per_node

    @property
    def tasks_per_node(self) -> int:
        return self.launcher.gpus_per_node or self.launcher.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.launcher.nodes * self.tasks_per_node

    def train_args(self) -> list[str]:
        """The train CLI's arguments inside the job (without a sweep task's own overrides)."""
        own = [o for o in self.overrides if override_key(o) not in _LAUNCH_OWNED]
        device = "gpu" if self.gpus_per_node else "cpu"
        return ["--recipe", self.recipe, "--family", self.family, *own, f"runs_dir={self.runs_dir}",
                f"trainer.device={device}", *self.extra_train_args]


def check_launcher(launcher) -> None:
    if launcher.name != "slurm":
        raise ConfigError(f"launcher.name={launcher.name!r}: Slurm submission needs launcher=slurm")
    checks = [
        (launcher.nodes >= 1, f"launcher.nodes={launcher.nodes} must be >= 1"),
        (launcher.gpus_per_node >= 0, f"launcher.gpus_per_node={launcher.gpus_per_node} must be >= 0 (0 = CPU nodes)"),
        (launcher.tasks_per_node >= 1, f"launcher.tasks_per_node={launcher.tasks_per_node} must be >= 1"),
        (launcher.signal_seconds >= 0, f"launcher.signal_seconds={launcher.signal_seconds} must be >= 0"),
        (launcher.max_parallel >= 0, f"launcher.max_parallel={launcher.max_parallel} must be >= 0 (0 = no limit)"),
        (launcher.cpus_per_task is None or launcher.cpus_per_task >= 1,
         f"launcher.cpus_per_task={launcher.cpus_per_task} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if launcher.gpus_per_node and launcher.tasks_per_node != 1:
        raise ConfigError(
            f"launcher.tasks_per_node={launcher.tasks_per_node} applies to CPU nodes only: GPU jobs run one "
            f"task per GPU (launcher.gpus_per_node={launcher.gpus_per_node})"
        )
    if launcher.env_file and not (repo_root() / launcher.env_file).is_file() and not Path(launcher.env_file).is_file():
        raise ConfigError(f"launcher.env_file={launcher.env_file!r}: no such file (relative paths are from {repo_root()})")


def plan_for(recipe: str, family: str, overrides: list[str], launcher=None):
    """Compose + type + plan one configuration at the job's world size; returns (cfg, plan)."""
    from nemo_ext.config.plan import make_plan

    cfg = to_typed(compose(recipe, family, overrides))
    launcher = launcher or cfg.launcher
    check_launcher(launcher)
    tasks = launcher.gpus_per_node or launcher.tasks_per_node
    world = launcher.nodes * tasks
    cfg.trainer.device = "gpu" if launcher.gpus_per_node else "cpu"  # what the job's command sets
    try:
        plan = make_plan(cfg, world_size=world, cuda_available=bool(launcher.gpus_per_node))
    except ConfigError as exc:
        raise ConfigError(f"{exc} [Slurm job: {launcher.nodes} node(s) x {tasks} task(s) = world size {world}]") from None
    return cfg, plan


def absolute_runs_dir(cfg) -> Path:
    return Path(cfg.runs_dir).expanduser().resolve()


def make_spec(recipe: str, family: str, overrides: list[str]) -> tuple[LaunchSpec, object, object]:
    """(spec, cfg, plan) of a single-run submission."""
    overrides = with_slurm_launcher(overrides)
    cfg, plan = plan_for(recipe, family, overrides)
    spec = LaunchSpec(recipe, family, overrides, cfg.launcher, absolute_runs_dir(cfg))
    if not cfg.data.path and not cfg.data.sources:
        # The generated sample world at an absolute path: every node (and container) finds it.
        spec.extra_train_args.append(f"data.sample_dir={Path(cfg.data.sample_dir).expanduser().resolve()}")
    return spec, cfg, plan


def container_mounts(spec: LaunchSpec, cfg, create: bool = True) -> str:
    """User mounts + the runs dir and the sample data at their own absolute paths (created unless
    ``create`` is false: pyxis cannot mount a missing directory)."""
    mounts = list(spec.launcher.mounts)
    paths = [spec.runs_dir]
    if not cfg.data.path and not cfg.data.sources:
        paths.append(Path(cfg.data.sample_dir).expanduser().resolve().parent)
    for p in paths:
        if create:
            p.mkdir(parents=True, exist_ok=True)
        mounts.append(f"{p}:{p}")
    return ",".join(mounts)


def render(spec: LaunchSpec, cfg, *, command: str, description: str, log_pattern: Path, script_path: Path,
           task_args: list[str], array: Optional[str] = None, python: Optional[str] = None,
           dry_run: bool = False) -> str:
    import jinja2

    launcher = spec.launcher
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_path().parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["shell"] = lambda value: shlex.quote(str(value))
    if python is None:
        # In the image: its venv by absolute path (srun passes the host's PATH into the container).
        python = f"{launcher.container_workdir}/.venv/bin/python" if launcher.container else sys.executable
    task_command = shlex.join([python, "-m", "nemo_ext.cli.launch", "task", *task_args, "--", *spec.train_args()])
    # The batch script runs on the first node itself (not in the container): the host's repo copy.
    env_file = str(repo_root() / launcher.env_file) if launcher.env_file else None
    return env.get_template(template_path().name).render(
        description=description,
        command=command,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        script_path=script_path,
        job_name=launcher.job_name or f"cosmos-{spec.recipe}",
        nodes=launcher.nodes,
        tasks_per_node=spec.tasks_per_node,
        gpus_per_node=launcher.gpus_per_node,
        cpus_per_task=launcher.cpus_per_task,
        partition=launcher.partition,
        account=launcher.account,
        time=launcher.time,
        exclusive=launcher.exclusive,
        array=array,
        log_pattern=log_pattern,
        signal_seconds=launcher.signal_seconds,
        requeue=launcher.requeue,
        extra_sbatch=list(launcher.extra_sbatch),
        repo_root=repo_root(),
        env_file=env_file,
        container=launcher.container,
        container_mounts=container_mounts(spec, cfg, create=not dry_run) if launcher.container else "",
        container_workdir=launcher.container_workdir,
        task_command=task_command,
    )


def sbatch(script_path: Path) -> str:
    """Submit; returns the job id. Errors carry sbatch's own message."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: run this on a Slurm login node (or use --dry-run to see the script)") from None
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip().split(";")[0]


def record_submission(folder: Path, job_id: str, script_path: Path) -> None:
    with open(folder / "jobs.txt", "a") as f:
        f.write(f"{job_id}\t{datetime.datetime.now().isoformat(timespec='seconds')}\t{script_path}\n")


def submit_run(recipe: str, family: str, overrides: list[str], dry_run: bool = False, out=print) -> Optional[str]:
    """Render (and unless ``dry_run`` submit) a single run's job; returns the job id."""
    spec, cfg, plan = make_spec(recipe, family, overrides)
    run_dir = spec.runs_dir / plan.run_dir.relative_to(Path(cfg.runs_dir))
    slurm_dir = run_dir / "slurm"
    script_path = slurm_dir / "job.sbatch"
    text = render(
        spec, cfg, command="slurm",
        description=f"{recipe} ({family}, {cfg.model.name}) on {spec.launcher.nodes} node(s) x {spec.tasks_per_node} task(s)",
        log_pattern=slurm_dir / "%j.out", script_path=script_path, task_args=[], dry_run=dry_run,
    )
    if dry_run:
        out(text)
        return None
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(text)
    os.chmod(script_path, 0o755)
    job_id = sbatch(script_path)
    record_submission(slurm_dir, job_id, script_path)
    out(f"submitted Slurm job {job_id}: {recipe} ({family}, {cfg.model.name}), {spec.launcher.nodes} node(s) x "
        f"{spec.tasks_per_node} task(s), parallel tp={plan.tp} pp={plan.pp} cp={plan.cp} dp={plan.dp}")
    out(f"  run directory: {run_dir}")
    out(f"  log:           {slurm_dir / (job_id + '.out')}")
    out(f"  script:        {script_path}")
    return job_id
