"""`make recipe=action_control eval` (``python -m nemo_ext.cli.eval``) on tiny action_control runs of
both families, trained here for two steps on a small action world: the report's keys and shapes,
metrics.png and the side-by-side rollout mp4, and the clear errors (a run of another task, no
held-out data, an action dimension that differs). The numbers of two-step runs mean nothing;
``tests/unit/test_eval_action_control.py`` checks the metrics and the sensitivity verdicts."""

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
    report = json.loads((out_dir / "report.json").read_text())
    for key in ("task", "family", "model", "checkpoint", "step", "config", "per_step", "per_chunk", "means",
                "action_sensitivity", "ground_truth_control", "tokenizer_ceiling", "episodes", "timings", "outputs"):
        assert key in report, key
    frames = chunks * CHUNK
    steps = report["per_step"]
    assert steps["frame"] == list(range(1, frames + 1))
    for key in ("psnr", "ssim", "psnr_shuffled", "ssim_shuffled", "psnr_ground_truth_shuffled"):
        assert len(steps[key]) == frames, key
    assert len(report["per_chunk"][code]) == len(report["per_chunk"][code + "_shuffled"]) == chunks
    assert report["config"]["episodes"] == len(report["episodes"]) == episodes
    sens = report["action_sensitivity"]
    assert sens["verdict"] in ("learned", "not_learned", "inconclusive") and isinstance(sens["psnr_gap_db"], float)
    control = report["ground_truth_control"]  # the sample world's simulator under the shuffled actions
    assert control["psnr_true_actions"] > control["psnr_shuffled_actions"]
    with Image.open(out_dir / "metrics.png") as img:
        assert img.format == "PNG"
    videos = report["outputs"]["videos"]
    assert videos and all((out_dir / v).is_file() for v in videos)
    video = decode(out_dir / videos[0])
    assert video.shape == (frames + 1, SIZE, 3 * SIZE, 3)  # ground truth | prediction | shuffled actions
    return report


def test_diffusion_eval_cli(runs):
    proc = eval_cli("--ckpt", runs["dit"], "--episodes", 2, "--steps", 2, "--sampler-steps", 2, "--videos", 1,
                    "--name", "smoke")
    out_dir = runs["dit"] / "eval" / "smoke"
    assert f"wrote {out_dir.resolve()}/report.json" in proc.stdout and "action sensitivity" in proc.stdout
    report = check_outputs(out_dir, episodes=2, chunks=2, code="latent_l2")
    assert report["family"] == "diffusion" and report["config"]["split"] == "val"
    assert "space_to_depth" in report["tokenizer"]
    ceiling = report["tokenizer_ceiling"]  # space-to-depth is exactly invertible: a perfect model is perfect
    assert ceiling["psnr_true_actions"] == report["config"]["psnr_cap_db"]
    assert ceiling["psnr_shuffled_actions"] == pytest.approx(report["ground_truth_control"]["psnr_shuffled_actions"], abs=1e-3)
    assert report["timings"]["model_calls"] == 2 * 2 * (2 * 2 - 1)  # (true, shuffled) x chunks x Heun calls
    teacher = report["action_sensitivity"]["teacher_forced"]
    assert teacher["clips"] == 4 and len(teacher["per_episode_gap"]) == 2
    assert teacher["loss_true"] > 0 and teacher["loss_shuffled"] > 0 and teacher["loss_true"] != teacher["loss_shuffled"]
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
    assert report["means"]["psnr"] == report["means"]["psnr_shuffled"]
    assert report["action_sensitivity"]["psnr_gap_db"] == 0.0
    assert report["action_sensitivity"]["verdict"] == "not_learned"
    teacher = report["action_sensitivity"]["teacher_forced"]  # the same noise, actions unused: equal losses
    assert teacher["loss_true"] == teacher["loss_shuffled"] > 0 and teacher["clips"] == 2


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
    assert report["family"] == "ar" and report["config"]["shuffle"] == "episodes"
    assert 0 <= report["means"]["token_accuracy"] <= 1 and "untrained" in report["tokenizer"]
    make = subprocess.run(["make", "-n", "recipe=action_control", "eval", "CKPT=last", "FAMILY=ar", "ARGS=--episodes 2"],
                          cwd=REPO, capture_output=True, text=True)
    assert "-m nemo_ext.cli.eval --ckpt last --recipe action_control --family ar" in make.stdout


def test_clear_errors(runs, tmp_path):
    from nemo_ext.eval import action_control as ac
    from nemo_ext.eval.generation import load_run_config

    # a run of another task
    fake = tmp_path / "general_run"
    (fake / "checkpoints" / "step_1").mkdir(parents=True)
    (fake / "checkpoints" / "step_1" / "metadata.json").write_text("{}")
    (fake / "checkpoints" / "last").symlink_to("step_1")
    text = (runs["dit"] / "config.yaml").read_text().replace("name: action_control", "name: general")
    (fake / "config.yaml").write_text(text)
    proc = eval_cli("--ckpt", fake, expect=2)
    assert "is a 'general' task run" in proc.stderr and "action_control" in proc.stderr

    cfg = load_run_config(runs["dit"] / "config.yaml")
    # no held-out data: a run on its own data without data.val_path
    world = runs["dit"].parents[3] / "world_dit"
    other = load_run_config(runs["dit"] / "config.yaml", [f"data.path={world}"])
    with pytest.raises(ac.EvalError, match="no held-out episodes"):
        ac.episodes_of_run(other, "val")
    assert len(ac.episodes_of_run(other, "train", num=3)[0]) == 3
    with pytest.raises(ac.EvalError, match="no held-out episodes"):
        ac.episodes_of_run(cfg, "val", start=50)
    # actions of another dimension than the run's task.action_dim
    with pytest.raises(ac.EvalError, match="7 action dims but the run's task.action_dim=6"):
        ac.read_episodes([str(world)], SIZE, SIZE, num=1, action_dim=6)
    eps = ac.read_episodes([str(world)], SIZE, SIZE, num=1)
    assert eps[0].frames.shape[1] == eps[0].actions.shape[0] + 1 == 33  # whole episodes, not training clips
    shutil.rmtree(fake)
