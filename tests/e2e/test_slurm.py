"""The Slurm launcher against a real Slurm (Debian's slurm-wlm, started here on localhost, CPU nodes):
`make slurm` runs a 2-task job (rank mapping, DP over gloo), `make sweep` a 3-task job array whose
`make sweep-report` ranks the tasks by validation loss, and a job warned with SIGUSR1 saves a
checkpoint, requeues itself and resumes from that step."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from slurm_cluster import ensure_installed, start_cluster, wait_for
from support import REPO

FAST = ["trainer.progress_bar=false", "data.num_workers=0", "trainer.log_every_n_steps=1", "data.sample_num_videos=16"]


@pytest.fixture(scope="module")
def slurm():
    why = ensure_installed()
    if why:
        pytest.skip(why)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def make(cluster, *args, check=True) -> subprocess.CompletedProcess:
    env = dict(cluster.env)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(var, None)
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def args_of(*overrides) -> str:
    return "ARGS=" + " ".join(overrides)


def metrics(run_dir) -> list[dict]:
    """The run's rows across restarts (NeMo moves a resumed run's earlier files to run_<n>/)."""
    from nemo_ext.launch.sweep import run_metrics

    return run_metrics(run_dir)


def job_log(cluster, job, path) -> str:
    return path.read_text() if path.is_file() else f"(no log at {path})"


def test_make_slurm_runs_a_two_task_job(slurm, sample_world, tmp_path):
    runs = tmp_path / "runs"
    out = make(slurm, "recipe=general", "slurm", "NODES=1", "GPUS_PER_NODE=0", args_of(
        *FAST, f"runs_dir={runs}", "run_name=job", "launcher.tasks_per_node=2", f"data.sample_dir={sample_world}",
        "data.global_batch_size=4", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4",
        "trainer.val_every_n_steps=2"))
    job = re.search(r"submitted Slurm job (\d+)", out.stdout).group(1)
    run_dir = runs / "general" / "diffusion_dit_tiny" / "job"
    log = run_dir / "slurm" / f"{job}.out"
    assert str(log) in out.stdout and (run_dir / "slurm" / "job.sbatch").is_file()
    state = slurm.wait(job)[job]
    text = job_log(slurm, job, log)
    assert state["JobState"] == "COMPLETED", f"{state['JobState']} {state['ExitCode']}\n{text[-6000:]}"
    assert "2 tasks, rendezvous localhost:" in text
    config = (run_dir / "config.yaml").read_text()
    assert "name: slurm" in config  # the launcher config travelled into the run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert (run_dir / "checkpoints" / "last").resolve().name == "step_4"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 4 and status["slurm_job"] == job
    # world size 2 -> dp=2 with one microbatch each: the data-parallel path ran
    assert "dp=2" in out.stdout


def test_make_sweep_runs_an_array_and_reports(slurm, sample_world, tmp_path):
    runs = tmp_path / "runs"
    out = make(slurm, "recipe=general", "sweep", "SWEEP=optim.lr=1e-4,1e-3,3e-3", "NAME=lrs", "GPUS_PER_NODE=0",
               args_of(*FAST, f"runs_dir={runs}", f"data.sample_dir={sample_world}", "trainer.max_steps=4",
                       "trainer.checkpoint_every_n_steps=4", "trainer.val_every_n_steps=2"))
    job = re.search(r"as Slurm array job (\d+)", out.stdout).group(1)
    sweep_dir = runs / "general" / "diffusion_dit_tiny" / "lrs"
    states = slurm.wait(job)
    assert len(states) == 3, states.keys()
    for task in range(3):
        log = sweep_dir / "slurm" / f"{job}_{task}.out"
        key = f"{job}_{task}"
        assert states[key]["JobState"] == "COMPLETED", job_log(slurm, key, log)[-6000:]
        cfg = (sweep_dir / str(task) / "config.yaml").read_text()
        assert f"lr: {['0.0001', '0.001', '0.003'][task]}" in cfg

    report = make(slurm, "sweep-report", f"RUN={sweep_dir}")
    lines = report.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task"))
    assert "optim.lr" in lines[header] and "best val" in lines[header]
    assert len([line for line in lines[header + 1:] if re.match(r"^[0-2]\s", line)]) == 3
    data = json.loads((sweep_dir / "report.json").read_text())
    assert {t["task"] for t in data["tasks"]} == {0, 1, 2}
    best = [t["best_val_loss"] for t in data["tasks"]]
    assert all(b is not None for b in best) and best == sorted(best)
    assert all(t["state"] == "completed" and t["step"] == 4 and t["best_val_step"] in (2, 4) for t in data["tasks"])


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, sample_world, tmp_path):
    runs = tmp_path / "runs"
    out = make(slurm, "recipe=general", "slurm", "NODES=1", "GPUS_PER_NODE=0", args_of(
        *FAST, f"runs_dir={runs}", "run_name=preempt", f"data.sample_dir={sample_world}", "trainer.max_steps=60",
        "trainer.checkpoint_every_n_steps=1000", "trainer.val_every_n_steps=0"))
    job = re.search(r"submitted Slurm job (\d+)", out.stdout).group(1)
    run_dir = runs / "general" / "diffusion_dit_tiny" / "preempt"
    log = run_dir / "slurm" / f"{job}.out"
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 5 or not slurm.queued(job), 300, "training to reach step 5")
    except TimeoutError:
        pytest.fail(job_log(slurm, job, log)[-6000:])
    assert slurm.queued(job), f"the job ended before the signal:\n{job_log(slurm, job, log)[-6000:]}"
    # What Slurm sends `launcher.signal_seconds` before the time limit (--signal=USR1@120), now.
    slurm.run("scancel", "--signal=USR1", job)
    state = slurm.wait(job, timeout=600)[job]
    text = job_log(slurm, job, log)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{text[-6000:]}"
    saved = int(re.search(r"received SIGUSR1: saving a checkpoint of step (\d+)", text).group(1))
    assert 5 <= saved < 60
    assert f"requeued Slurm job {job}" in text
    assert re.search(rf"resuming from \S*step_{saved}\b", text), text[-6000:]
    assert "restart 1 on localhost" in text
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 61)), steps  # no step lost
    first = [json.loads(x)["step"] for x in (run_dir / "run_0" / "metrics.jsonl").read_text().splitlines()]
    assert max(first) == saved  # the first segment stopped at the saved step: nothing to repeat
    assert (run_dir / "checkpoints" / "last").resolve().name == "step_60"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["restarts"] == 1
