"""Hyperparameter sweeps as one Slurm job array, and their report.

``SWEEP="optim.lr=1e-5,3e-5 trainer.max_steps=100"``: each whitespace-separated item is a Hydra key
with comma-separated values (commas inside brackets or quotes belong to the value:
``optim.betas=[0.9,0.95],[0.9,0.999]``); the cartesian product of the items is the set of
configurations, the last item varying fastest. Task ``i`` of ``sbatch --array=0-<K-1>%<M>`` picks
configuration ``i`` by SLURM_ARRAY_TASK_ID and trains run ``<sweep_name>/<i>``, so the sweep lives in

    runs/<recipe>/<family>_<model>/<sweep_name>/
        sweep.json          axes, each task's overrides, the job id(s)
        sweep.sbatch        the array job script
        slurm/%A_%a.out     one log per task (appended across requeues)
        <i>/                each task's run directory (config, metrics.jsonl, status.json, checkpoints)
        report.json         written by `sweep-report`

Every configuration is composed and checked against the job's world size before submission.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
from pathlib import Path
from typing import Optional

from nemo_ext.config.compose import ConfigError
from nemo_ext.launch.slurm import (
    LaunchSpec, absolute_runs_dir, override_key, plan_for, record_submission, render, sbatch, with_slurm_launcher,
)

# Keys a sweep cannot vary: they decide where the runs live or how the job is laid out.
FIXED_KEYS = ("model", "recipe", "family", "run_name", "runs_dir")
FIXED_PREFIXES = ("launcher",)


def split_values(text: str) -> list[str]:
    """``a,b,[c,d],'e,f'`` -> ``['a', 'b', '[c,d]', "'e,f'"]``: commas at bracket depth 0 outside quotes."""
    values, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(ch)
    values.append("".join(current))
    return values


def parse_sweep(text: str) -> dict[str, list[str]]:
    """The sweep string -> {key: [values]} in the order given."""
    import shlex

    axes: dict[str, list[str]] = {}
    for item in shlex.split(text, posix=False):
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r}: expected key=value1,value2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or not raw:
            raise ConfigError(f"sweep item {item!r}: expected key=value1,value2,...")
        if key in axes:
            raise ConfigError(f"sweep key {key!r} is given twice")
        if key in FIXED_KEYS or key.split(".")[0] in FIXED_PREFIXES:
            raise ConfigError(
                f"sweep key {key!r} cannot be swept: it decides where runs live or how the job is laid out "
                f"(sweep one model per sweep: MODEL=..., layout via launcher.* in ARGS)"
            )
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"sweep item {item!r}: empty value")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep item {item!r}: repeated value")
        axes[key] = values
    if not axes:
        raise ConfigError('empty sweep: give SWEEP="key=v1,v2 key2=v3,..."')
    return axes


def expand(axes: dict[str, list[str]]) -> list[list[str]]:
    """The cartesian product as override lists, last axis fastest."""
    keys = list(axes)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(axes[k] for k in keys))]


def default_sweep_name() -> str:
    return "sweep_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def submit_sweep(recipe: str, family: str, overrides: list[str], sweep: str, name: Optional[str] = None,
                 dry_run: bool = False, out=print) -> Optional[str]:
    """Check every configuration, write the sweep directory, submit one job array; returns its id."""
    axes = parse_sweep(sweep)
    overrides = with_slurm_launcher(overrides)
    clash = sorted({override_key(o) for o in overrides} & set(axes))
    if clash:
        raise ConfigError(f"{clash} are both swept and set in ARGS: set them in one place")
    name = name or default_sweep_name()
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"sweep name {name!r}: one path component expected")
    configurations = expand(axes)
    tasks, base_cfg, plans = [], None, []
    for i, task_overrides in enumerate(configurations):
        try:
            cfg, plan = plan_for(recipe, family, [*overrides, *task_overrides, f"run_name={name}/{i}"])
        except ConfigError as exc:
            raise ConfigError(f"sweep task {i} ({' '.join(task_overrides)}): {exc}") from None
        base_cfg = base_cfg or cfg
        plans.append(plan)
        tasks.append({"id": i, "overrides": task_overrides})
    spec = LaunchSpec(recipe, family, overrides, base_cfg.launcher, absolute_runs_dir(base_cfg))
    if not base_cfg.data.path and not base_cfg.data.sources:
        spec.extra_train_args.append(f"data.sample_dir={Path(base_cfg.data.sample_dir).expanduser().resolve()}")
    sweep_dir = spec.runs_dir / plans[0].run_dir.parent.relative_to(Path(base_cfg.runs_dir))
    if (sweep_dir / "sweep.json").exists() and not dry_run:
        raise ConfigError(f"sweep {name!r} exists already ({sweep_dir}): pick another name (or resubmit its sweep.sbatch)")
    k = len(tasks)
    limit = spec.launcher.max_parallel
    array = f"0-{k - 1}" + (f"%{limit}" if limit else "")
    sweep_file = sweep_dir / "sweep.json"
    script_path = sweep_dir / "sweep.sbatch"
    text = render(
        spec, base_cfg, command="sweep",
        description=f"sweep {name}: {recipe} ({family}, {base_cfg.model.name}), {k} configurations of "
                    + " x ".join(f"{key} ({len(v)})" for key, v in axes.items()),
        log_pattern=sweep_dir / "slurm" / "%A_%a.out", script_path=script_path,
        task_args=["--sweep", str(sweep_file)], array=array, dry_run=dry_run,
    )
    if dry_run:
        for t in tasks:
            out(f"# task {t['id']}: {' '.join(t['overrides'])}")
        out(text)
        return None
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    record = {
        "name": name, "recipe": recipe, "family": family, "model": base_cfg.model.name,
        "base_overrides": overrides, "axes": axes, "tasks": tasks,
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "jobs": [],
    }
    sweep_file.write_text(json.dumps(record, indent=1) + "\n")
    script_path.write_text(text)
    os.chmod(script_path, 0o755)
    job_id = sbatch(script_path)
    record["jobs"].append(job_id)
    sweep_file.write_text(json.dumps(record, indent=1) + "\n")
    record_submission(sweep_dir, job_id, script_path)
    out(f"submitted sweep {name} as Slurm array job {job_id} ({k} tasks{f', at most {limit} at once' if limit else ''})")
    for t in tasks:
        out(f"  task {t['id']}: {' '.join(t['overrides'])}")
    out(f"  sweep directory: {sweep_dir}")
    out(f"  logs:            {sweep_dir / 'slurm'}/{job_id}_<task>.out")
    out(f"  report:          make sweep-report RUN={sweep_dir}")
    return job_id


def task_overrides(sweep_file: Path, task_id: int) -> list[str]:
    """An array task's own overrides (its configuration and its run name)."""
    record = json.loads(Path(sweep_file).read_text())
    tasks = record["tasks"]
    if not 0 <= task_id < len(tasks):
        raise ConfigError(f"array task {task_id} is outside sweep {record['name']!r} (tasks 0..{len(tasks) - 1})")
    return [*tasks[task_id]["overrides"], f"run_name={record['name']}/{task_id}"]


# ---------------------------------------------------------------- report


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return rows


def run_metrics(run_dir: Path) -> list[dict]:
    """Every metrics row of a run across its restarts, by step. On resume NeMo's exp_manager moves
    the previous segment's files to ``run_<n>/``; a step logged again after a resume (the run had
    gone past its last checkpoint) keeps the later value."""
    run_dir = Path(run_dir)
    segments = sorted((p for p in run_dir.glob("run_*") if p.is_dir() and p.name[4:].isdigit()),
                      key=lambda p: int(p.name[4:]))
    merged: dict[tuple[str, int], dict] = {}
    for folder in [*segments, run_dir]:
        for row in _read_metrics(folder / "metrics.jsonl"):
            kind = "val" if "val_loss" in row else "train"
            merged[(kind, row.get("step", 0))] = row
    return [merged[k] for k in sorted(merged, key=lambda k: (k[1], k[0] == "val"))]


def task_summary(sweep_dir: Path, task: dict) -> dict:
    from nemo_ext.training.preemption import read_status

    run_dir = sweep_dir / str(task["id"])
    rows = run_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r and math.isfinite(r["val_loss"])]
    status = read_status(run_dir) or {}
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    return {
        "task": task["id"],
        "overrides": task["overrides"],
        "state": status.get("state", "pending" if not run_dir.exists() else "unknown"),
        "step": status.get("step", train[-1]["step"] if train else 0),
        "max_steps": status.get("max_steps"),
        "restarts": status.get("restarts", 0),
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "final_val_step": val[-1]["step"] if val else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "run_dir": str(run_dir),
    }


def sweep_report(sweep_dir: Path, out=print) -> dict:
    """Tabulate a sweep (best validation loss first) and write ``report.json``."""
    sweep_dir = Path(sweep_dir)
    sweep_file = sweep_dir / "sweep.json"
    if not sweep_file.is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no sweep.json)")
    record = json.loads(sweep_file.read_text())
    rows = [task_summary(sweep_dir, t) for t in record["tasks"]]

    def rank(r):
        for key in ("best_val_loss", "final_train_loss"):
            if r[key] is not None and math.isfinite(r[key]):
                return (0 if key == "best_val_loss" else 1, r[key])
        return (2, 0.0)

    rows.sort(key=rank)
    axes = list(record["axes"])
    report = {"name": record["name"], "recipe": record["recipe"], "family": record["family"], "model": record["model"],
              "jobs": record.get("jobs", []), "axes": record["axes"], "ranked_by": "best_val_loss", "tasks": rows}
    (sweep_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    values = {r["task"]: dict(o.split("=", 1) for o in r["overrides"]) for r in rows}
    header = ["task", *axes, "state", "step", "train loss", "val loss", "best val (step)"]
    table = [[str(r["task"]), *[values[r["task"]][a] for a in axes], r["state"]
              + (f" ({r['restarts']} restarts)" if r["restarts"] else ""),
              f"{r['step']}" + (f"/{r['max_steps']}" if r["max_steps"] else ""),
              fmt(r["final_train_loss"]), fmt(r["final_val_loss"]),
              "-" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} ({r['best_val_step']})"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    out(f"sweep {record['name']}: {record['recipe']} ({record['family']}, {record['model']}), "
        f"{len(rows)} configurations, best validation loss first")
    out("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        out("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if not any(r["best_val_loss"] is not None for r in rows):
        out("(no validation loss recorded: ranked by final training loss; enable validation with "
            "trainer.val_every_n_steps and data.val_path)")
    out(f"report: {sweep_dir / 'report.json'}")
    return report
