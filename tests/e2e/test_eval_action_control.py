"""`make recipe=action_control eval` (``python -m nemo_ext.cli.eval``, the evaluation core with
action_control's spec) on tiny action_control runs of both families, trained here for two steps on a
small action world: the report's schema and shapes, metrics.png and the side-by-side rollout mp4, the
clear errors (a run of another task, no held-out data, an action dimension that differs), and the
before/after check of the task-folder move: the same runs score what the code before it reported
(tests/e2e/data/eval_reference_pre_move.json). The numbers of two-step runs mean nothing;
``tests/unit/test_eval_core.py`` checks the metrics and the verdict rule."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from support import REPO, cli_env, train_concurrently

TRAIN = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
         "trainer.val_every_n_steps=0", "data.num_workers=0", "data.global_batch_size=1", "data.micro_batch_size=1",
         "data.sample_num_videos=8", "data.sample_val_num_videos=2", "data.backend=pyav"]
SIZE, CHUNK = 64, 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Video2World DiT over the space-to-depth tokenizer and an AR Video2World model, trained
    concurrently (each on its own copy of the action world: no two writers of one directory)."""
    root = tmp_path_factory.mktemp("eval_runs")
    # "base": the same DiT trained on the action world's videos without actions (general task,
    # text-conditioned): what "dit" would be post-trained from (the --weights-from check)
    specs = {"dit": ("model=dit_tiny_v2w_s2d", "diffusion", "action_control", []),
             "ar": ("model=ar_tiny_v2w", "ar", "action_control", []),
             "base": ("model=dit_tiny_v2w_s2d", "diffusion", "general", ["data.sample_variant=action", "data.num_frames=9"])}

    return train_concurrently({
        name: dict(overrides=[*TRAIN, f"data.sample_dir={root / ('world_' + name)}", model, *extra],
                   runs_dir=root / "runs", recipe=recipe, family=family)
        for name, (model, family, recipe, extra) in specs.items()})


def eval_cli(*args, expect=0, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "nemo_ext.cli.eval", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"eval: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def decode(path):
    with av.open(io.BytesIO(path.read_bytes())) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def check_outputs(out_dir, episodes, chunks, code):
    from nemo_ext.eval.metrics import VERDICTS
    from nemo_ext.eval.report import check_report

    report = json.loads((out_dir / "report.json").read_text())
    assert check_report(report) == [], check_report(report)
    frames = chunks * CHUNK
    steps = report["per_step"]
    assert steps["frame"] == list(range(1, frames + 1))
    for key in ("psnr", "ssim", "psnr_control", "ssim_control", "psnr_simulator_control"):
        assert len(steps[key]) == frames, key
    assert len(report["per_chunk"][code]) == len(report["per_chunk"][code + "_control"]) == chunks
    assert report["config"]["episodes"] == len(report["episodes"]) == episodes
    assert report["config"]["signal"] == "actions"
    sens = report["sensitivity"]
    assert isinstance(sens["psnr_gap_db"], float) and len(sens["psnr_gap_db_per_episode"]) == episodes
    assert report["verdict"]["verdict"] in VERDICTS
    assert report["verdict"]["verdict"] == "inconclusive"  # 2 episodes, no base model: never "learned"
    control = report["ground_truth_control"]  # the action world's simulator under the permuted actions
    assert control["psnr_true"] > control["psnr_control"]
    with Image.open(out_dir / "metrics.png") as img:
        assert img.format == "PNG"
    videos = report["outputs"]["videos"]
    assert videos and all((out_dir / v).is_file() for v in videos)
    video = decode(out_dir / videos[0])
    assert video.shape == (frames + 1, SIZE, 3 * SIZE, 3)  # ground truth | prediction | permuted actions
    return report


def test_diffusion_eval_cli(runs):
    proc = eval_cli("--ckpt", runs["dit"], "--episodes", 2, "--steps", 2, "--sampler-steps", 2, "--videos", 1,
                    "--name", "smoke")
    out_dir = runs["dit"] / "eval" / "smoke"
    assert f"wrote {out_dir.resolve()}/report.json" in proc.stdout and "sensitivity to the actions" in proc.stdout
    report = check_outputs(out_dir, episodes=2, chunks=2, code="latent_l2")
    assert report["family"] == "diffusion" and report["config"]["split"] == "val"
    assert "space_to_depth" in report["tokenizer"]
    ceiling = report["tokenizer_ceiling"]  # space-to-depth is exactly invertible: a perfect model is perfect
    assert ceiling["psnr_true"] == report["config"]["psnr_cap_db"]
    assert ceiling["psnr_control"] == pytest.approx(report["ground_truth_control"]["psnr_control"], abs=1e-3)
    assert report["timings"]["model_calls"] == 2 * 2 * (2 * 2 - 1)  # (true, control) x chunks x Heun calls
    teacher = report["sensitivity"]["teacher_forced"]
    assert teacher["clips"] == 4 and len(teacher["per_episode_gap"]) == 2
    assert teacher["loss_true"] > 0 and teacher["loss_control"] > 0 and teacher["loss_true"] != teacher["loss_control"]
    root = runs["dit"].parents[3]  # <root>/runs/action_control/<family>_<model>/<name>
    assert (root / "world_dit").is_dir() and (root / "world_dit_val").is_dir()  # the held-out world, made here


def test_base_model_weights_ignore_the_actions(runs, tmp_path):
    """--weights-from: the run's model with the base model's weights (the action conditioner keeps its
    zero init) rolls out identically under true and shuffled actions: an exact zero gap."""
    out_dir = tmp_path / "base_eval"
    eval_cli("--ckpt", runs["dit"], "--weights-from", runs["base"], "--episodes", 2, "--steps", 1,
             "--sampler-steps", 2, "--videos", 0, "--no-control", "--out", out_dir, "--no-progress",
             "task.instruction=true")
    report = json.loads((out_dir / "report.json").read_text())
    assert report["weights_from"] == str(runs["base"]) and report["checkpoint"].startswith(str(runs["base"]))
    assert report["means"]["psnr"] == report["means"]["psnr_control"]
    assert report["sensitivity"]["psnr_gap_db"] == 0.0
    assert report["verdict"]["verdict"] == "inconclusive"  # 2 episodes: the rule needs 32
    teacher = report["sensitivity"]["teacher_forced"]  # the same noise, actions unused: equal losses
    assert teacher["loss_true"] == teacher["loss_control"] > 0 and teacher["clips"] == 2


def test_base_model_rollouts_are_the_second_reference(runs, tmp_path):
    """--base: the base model's rollouts (its weights in the run's model) give the verdict's second gap;
    the run's own weights as the base give an exact zero gap."""
    out_dir = tmp_path / "with_base"
    eval_cli("--ckpt", runs["dit"], "--base", runs["dit"], "--episodes", 2, "--steps", 1, "--sampler-steps", 2,
             "--videos", 0, "--no-control", "--no-ceiling", "--out", out_dir, "--no-progress")
    report = json.loads((out_dir / "report.json").read_text())
    assert report["base"] == str(runs["dit"]) and report["vs_base"]["psnr_gap_db"] == 0.0
    assert report["per_step"]["psnr_base"] == report["per_step"]["psnr"]
    assert report["verdict"]["compared_with"] == ["base model", "control"]


def test_reports_match_the_code_before_the_task_folder_move(runs, tmp_path):
    """The before/after check: the evaluation core reproduces the pre-move reports of these runs
    (PSNR within 1e-3 dB, SSIM within 1e-4; the action world's simulator too)."""
    ref = json.loads((REPO / "tests" / "e2e" / "data" / "eval_reference_pre_move.json").read_text())
    for name, family, args in (("dit", "diffusion", ["--steps", 2, "--sampler-steps", 2]),
                               ("ar", "ar", ["--steps", 1, "--control", "episodes"])):
        out_dir = tmp_path / name
        eval_cli("--ckpt", runs[name], "--episodes", 2, *args, "--videos", 0, "--out", out_dir, "--no-progress")
        report = json.loads((out_dir / "report.json").read_text())
        expected = ref[family]
        for got, want in zip(report["episodes"], expected["episodes"]):
            assert got["key"] == want["key"]
            assert got["psnr"] == pytest.approx(want["psnr"], abs=1e-3), (family, got, want)
            assert got["psnr_control"] == pytest.approx(want["psnr_shuffled"], abs=1e-3), (family, got, want)
            assert got["ssim"] == pytest.approx(want["ssim"], abs=1e-4), (family, got, want)
            assert got["ssim_control"] == pytest.approx(want["ssim_shuffled"], abs=1e-4), (family, got, want)
        for key, old in (("psnr", "psnr"), ("psnr_control", "psnr_shuffled"),
                         ("psnr_simulator_control", "psnr_ground_truth_shuffled")):
            assert report["per_step"][key] == pytest.approx(expected["per_step"][old], abs=1e-3), (family, key)
        control, before = report["ground_truth_control"], expected["ground_truth_control"]
        assert control["psnr_true"] == pytest.approx(before["psnr_true_actions"], abs=1e-3)
        assert control["psnr_control"] == pytest.approx(before["psnr_shuffled_actions"], abs=1e-3)
        assert control["ssim_control"] == pytest.approx(before["ssim_shuffled_actions"], abs=1e-4)


def test_sample_cli_on_an_action_run(runs, tmp_path):
    """`make sample` on an action_control run: no text context (task.instruction=false), the clip's
    actions from the data drive the conditioner."""
    out = tmp_path / "sample.mp4"
    proc = subprocess.run([sys.executable, "-m", "nemo_ext.cli.sample", "--ckpt", str(runs["dit"]), "--from-data", "val",
                           "--steps", "2", "--out", str(out)], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert decode(out).shape == (CHUNK + 1, SIZE, SIZE, 3)


def test_ar_eval_cli_and_make_target(runs, tmp_path):
    out_dir = tmp_path / "ar_eval"
    eval_cli("--ckpt", runs["ar"] / "checkpoints" / "last", "--episodes", 2, "--steps", 1, "--shuffle", "episodes",
             "--out", out_dir, "--no-progress")
    report = check_outputs(out_dir, episodes=2, chunks=1, code="token_accuracy")
    assert report["family"] == "ar" and report["config"]["control"] == "episodes"
    assert 0 <= report["means"]["token_accuracy"] <= 1 and "untrained" in report["tokenizer"]
    make = subprocess.run(["make", "-n", "recipe=action_control", "eval", "CKPT=last", "FAMILY=ar", "ARGS=--episodes 2"],
                          cwd=REPO, capture_output=True, text=True)
    assert "-m nemo_ext.cli.eval --ckpt last --recipe action_control --family ar" in make.stdout


def test_clear_errors(runs, tmp_path):
    from nemo_ext.eval.episodes import EvalError, episodes_of_run, read_episodes
    from nemo_ext.eval.generation import load_run_config
    from nemo_ext.tasks import get_task

    actions = get_task("action_control").signals
    # a run of a task without an evaluation
    fake = tmp_path / "other_run"
    (fake / "checkpoints" / "step_1").mkdir(parents=True)
    (fake / "checkpoints" / "step_1" / "metadata.json").write_text("{}")
    (fake / "checkpoints" / "last").symlink_to("step_1")
    text = (runs["dit"] / "config.yaml").read_text().replace("name: action_control", "name: no_such_task")
    (fake / "config.yaml").write_text(text)
    proc = eval_cli("--ckpt", fake, expect=2)
    assert "is a 'no_such_task' task run" in proc.stderr and "action_control" in proc.stderr

    cfg = load_run_config(runs["dit"] / "config.yaml")
    # no held-out data: a run on its own data without data.val_path
    world = runs["dit"].parents[3] / "world_dit"
    other = load_run_config(runs["dit"] / "config.yaml", [f"data.path={world}"])
    with pytest.raises(EvalError, match="no held-out episodes"):
        episodes_of_run(other, actions, split="val")
    assert len(episodes_of_run(other, actions, split="train", num=3)[0]) == 3
    with pytest.raises(EvalError, match="no held-out episodes"):
        episodes_of_run(cfg, actions, split="val", start=50)
    # actions of another dimension than the run's task.action_dim
    with pytest.raises(EvalError, match="has 7 dims per row but the run's task.action_dim=6"):
        read_episodes([str(world)], SIZE, SIZE, signals=actions, dims={"actions": (6, "task.action_dim")}, num=1)
    eps = read_episodes([str(world)], SIZE, SIZE, signals=actions, num=1)
    assert eps[0].frames.shape[1] == eps[0].signals["actions"].shape[0] + 1 == 33  # whole episodes, not training clips
    shutil.rmtree(fake)
