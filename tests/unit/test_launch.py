"""Launchers without a cluster: the rendered sbatch script (multi-node GPU, container), sweep
parsing and expansion, the checks made before anything is submitted, rank mapping, sweep reports,
and the local launcher script."""

from __future__ import annotations

import json
import subprocess

import pytest

from nemo_ext.cli.launch import main as launch_main
from nemo_ext.cli.launch import slurm_rank_environment
from nemo_ext.config.compose import ConfigError
from nemo_ext.launch.slurm import submit_run
from nemo_ext.launch.sweep import expand, parse_sweep, run_metrics, submit_sweep, sweep_report, task_overrides
from support import REPO


def render(overrides, tmp_path):
    lines = []
    submit_run("general", "diffusion", [f"runs_dir={tmp_path / 'runs'}", *overrides], dry_run=True, out=lines.append)
    return "\n".join(lines)


def test_multinode_gpu_script_with_container(tmp_path):
    script = render(["launcher.nodes=4", "launcher.gpus_per_node=8", "launcher.partition=batch", "launcher.account=proj",
                     "launcher.time=02:00:00", "model=dit_7b", "parallel=tp8_sp", "data.global_batch_size=8", "launcher.container=/img/cosmos.sqsh",
                     "launcher.mounts=[/data:/data]", "launcher.extra_sbatch=['--qos=high']"], tmp_path)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=batch", "#SBATCH --account=proj", "#SBATCH --time=02:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --qos=high"):
        assert line in script.splitlines(), line
    run_dir = tmp_path / "runs" / "general" / "diffusion_dit_7b" / "default"
    assert f"#SBATCH --output={run_dir}/slurm/%j.out" in script
    assert "--container-image=/img/cosmos.sqsh" in script
    assert f"--container-mounts=/data:/data,{tmp_path / 'runs'}:{tmp_path / 'runs'}" in script
    # one task per GPU running the trainer directly (no torchrun: SIGUSR1 must reach it)
    assert "torchrun" not in script and "torch.distributed.run" not in script
    srun = script[script.index("srun "):]
    assert "/workspace/cosmos-recipes/.venv/bin/python -m nemo_ext.cli.launch task -- --recipe general" in srun
    assert "trainer.device=gpu" in srun
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert not (tmp_path / "runs" / "general").exists() or not any(run_dir.glob("slurm/*"))  # dry run: nothing written
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cpu_script_without_container(tmp_path):
    script = render(["launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.requeue=false",
                     "launcher.signal_seconds=0"], tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    assert "#SBATCH --no-requeue" in script and "--signal" not in script and "--container" not in script
    assert "trainer.device=cpu" in script


@pytest.mark.parametrize("overrides, message", [
    (["launcher.gpus_per_node=2", "parallel=tp4_sp"], "world size 2"),
    (["launcher.gpus_per_node=0", "launcher.tasks_per_node=3", "data.global_batch_size=2"], "data.global_batch_size=2"),
    (["launcher.nodes=0"], "launcher.nodes=0"),
    (["launcher.gpus_per_node=8", "launcher.tasks_per_node=2"], "launcher.tasks_per_node=2"),
    (["launcher.env_file=launchers/env/nope.env"], "launcher.env_file"),
    (["launcher=local"], "launcher.name='local'"),
])
def test_layouts_that_cannot_run_fail_before_submission(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        render(overrides, tmp_path)


def test_sweep_parsing_and_expansion():
    axes = parse_sweep("optim.lr=1e-5,3e-5 optim.betas=[0.9,0.95],[0.9,0.999] trainer.max_steps=100")
    assert axes == {"optim.lr": ["1e-5", "3e-5"], "optim.betas": ["[0.9,0.95]", "[0.9,0.999]"],
                    "trainer.max_steps": ["100"]}
    combos = expand(axes)
    assert len(combos) == 4
    assert combos[1] == ["optim.lr=1e-5", "optim.betas=[0.9,0.999]", "trainer.max_steps=100"]  # last axis fastest
    for bad, message in [("model=dit_7b,dit_14b", "cannot be swept"), ("launcher.nodes=1,2", "cannot be swept"),
                         ("optim.lr", "expected key=value"), ("optim.lr=1,1", "repeated"), ("", "empty sweep"),
                         ("optim.lr=1 optim.lr=2", "twice")]:
        with pytest.raises(ConfigError, match=message):
            parse_sweep(bad)


def test_sweep_checks_every_task_and_writes_nothing_on_error(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"sweep task 1 \(parallel=tp2\).*world size 1"):
        submit_sweep("general", "diffusion", [f"runs_dir={runs}", "launcher.gpus_per_node=1"],
                     "parallel=single,tp2", name="s")
    with pytest.raises(ConfigError, match="both swept and set"):
        submit_sweep("general", "diffusion", [f"runs_dir={runs}", "optim.lr=1e-3"], "optim.lr=1e-4,1e-5", name="s")
    assert not runs.exists()
    lines = []
    submit_sweep("general", "diffusion", [f"runs_dir={runs}", "launcher.max_parallel=2", "launcher.gpus_per_node=1"], "optim.lr=1e-4,1e-5,3e-5",
                 name="s", dry_run=True, out=lines.append)
    text = "\n".join(lines)
    assert "#SBATCH --array=0-2%2" in text and "%A_%a.out" in text and "task --sweep" in text
    assert "# task 2: optim.lr=3e-5" in text


def test_rank_mapping_and_task_overrides(tmp_path):
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert slurm_rank_environment(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert slurm_rank_environment({**env, "RANK": "0"}) == {"LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert slurm_rank_environment({}) == {}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"name": "lrs", "tasks": [{"id": 0, "overrides": ["optim.lr=1"]},
                                                          {"id": 1, "overrides": ["optim.lr=2"]}]}))
    assert task_overrides(sweep, 1) == ["optim.lr=2", "run_name=lrs/1"]
    with pytest.raises(ConfigError, match="outside sweep"):
        task_overrides(sweep, 2)


def test_sweep_report_ranks_by_best_validation_loss_across_restarts(tmp_path, capsys):
    sweep_dir = tmp_path / "lrs"
    tasks = [{"id": i, "overrides": [f"optim.lr={lr}"]} for i, lr in enumerate(["1e-4", "1e-3", "1e-2"])]
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "lrs", "recipe": "general", "family": "diffusion",
                                                      "model": "dit_tiny", "axes": {"optim.lr": ["1e-4", "1e-3", "1e-2"]},
                                                      "tasks": tasks, "jobs": ["7"]}))

    def write(task, rows, sub=""):
        d = sweep_dir / str(task) / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(0, [{"step": 1, "loss": 1.0}, {"step": 2, "val_loss": 0.9}])
    # task 1 was preempted at step 2 and resumed: the earlier segment lives in run_0/
    write(1, [{"step": 1, "loss": 1.0}, {"step": 2, "val_loss": 0.5}, {"step": 3, "loss": 0.8}], sub="run_0")
    write(1, [{"step": 3, "loss": 0.7}, {"step": 4, "loss": 0.6}, {"step": 4, "val_loss": 0.6}])
    (sweep_dir / "1" / "status.json").write_text(json.dumps({"state": "completed", "step": 4, "max_steps": 4, "restarts": 1}))
    report = sweep_report(sweep_dir)
    assert [t["task"] for t in report["tasks"]] == [1, 0, 2]
    t1 = report["tasks"][0]
    assert (t1["best_val_loss"], t1["best_val_step"], t1["final_val_loss"], t1["final_train_loss"]) == (0.5, 2, 0.6, 0.6)
    assert [r["step"] for r in run_metrics(sweep_dir / "1") if "loss" in r] == [1, 3, 4]
    assert report["tasks"][2]["state"] == "pending"
    out = capsys.readouterr().out
    assert "completed (1 restarts)" in out and "0.5000 (2)" in out
    assert json.loads((sweep_dir / "report.json").read_text())["tasks"][0]["task"] == 1
    assert launch_main(["sweep-report", str(tmp_path / "nope")]) == 1


def test_local_launcher_script():
    help_text = subprocess.run([str(REPO / "launchers" / "local.sh"), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "torchrun" in help_text.stdout
    bad = subprocess.run([str(REPO / "launchers" / "local.sh"), "-n", "two"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NGPU=two" in bad.stderr
    # make's train target goes through it: torchrun for NGPU > 1, one process otherwise
    dry = subprocess.run(["make", "-n", "--no-print-directory", "train", "NGPU=4"], cwd=REPO, capture_output=True, text=True)
    assert "NGPU=4" in dry.stdout and "launchers/local.sh" in dry.stdout
