"""The task contract, over the registry: every task x family composes, has a world and an evaluation,
its new conditioning paths start at zero (at step 0 the model's output does not depend on the task's
signals), its world generates, 3 training steps run through the CLI, and its evaluation writes a
report that matches the schema. A new task gets these tests by registering itself."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from nemo_ext.eval.core import EVALUATIONS
from nemo_ext.tasks import all_tasks, get_task
from support import REPO, cli_env, train_concurrently

CASES = [(t.name, family) for t in all_tasks() for family in t.families]
IDS = [f"{task}-{family}" for task, family in CASES]
TINY = ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=0", "data.num_workers=0", "data.backend=pyav", "data.global_batch_size=1",
        "data.micro_batch_size=1", "data.sample_num_videos=4", "data.sample_val_num_videos=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 steps of every task x family, concurrently, each on its own small copy of its world."""
    from nemo_ext.config.compose import compose

    root = tmp_path_factory.mktemp("contract")
    return train_concurrently({
        f"{task}-{family}": dict(overrides=[*TINY, f"model={compose(task, family).model.name}",
                                            f"data.sample_dir={root / ('world_' + task + '_' + family)}"],
                                 runs_dir=root / "runs", recipe=task, family=family)
        for task, family in CASES})


@pytest.mark.parametrize("task,family", CASES, ids=IDS)
def test_composes_with_its_world_and_evaluation(task, family):
    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.config.plan import make_plan
    from nemo_ext.worlds import get_world

    spec = get_task(task)
    cfg = to_typed(compose(task, family, ["trainer.device=cpu"]))
    assert cfg.task.name == task and cfg.family == family
    make_plan(cfg, world_size=1, cuda_available=False)
    world = get_world(cfg.data.sample_variant)
    assert world.name == spec.world, "the recipe's default data is its task's world"
    assert {s.ext: s.align for s in spec.signals}.items() <= world.sidecars.items(), "the world writes the signals"
    assert task in EVALUATIONS


@pytest.mark.parametrize("task,family", CASES, ids=IDS)
def test_step_zero_does_not_depend_on_the_tasks_signals(megatron_world, task, family, tmp_path):
    """New conditioning paths start at zero: the teacher-forced loss of the freshly built post-training
    model (same noise) is exactly the same with the true and with permuted signals."""
    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.config.plan import make_plan
    from nemo_ext.eval.episodes import read_episodes
    from nemo_ext.eval.rollout import permute, teacher_forced_losses
    from nemo_ext.training.run import family_module
    from nemo_ext.worlds import generate

    spec = get_task(task)
    if not spec.signals:
        return  # conditioned on the base model's own inputs only (text, frames): nothing new to start at zero
    if family not in spec.zero_init:
        pytest.xfail(f"{task} ({family}) declares that its new paths do not start at zero (see its conditioner)")
    cfg = to_typed(compose(task, family, ["trainer.device=cpu", f"data.sample_dir={tmp_path / 'w'}"]))
    generate(tmp_path / "w", variant=cfg.data.sample_variant, num_videos=2, num_frames=cfg.data.sample_num_frames,
             height=cfg.data.height, width=cfg.data.width, progress=False)
    module = family_module(family)(cfg, make_plan(cfg, world_size=1, cuda_available=False))
    module.configure_model()
    module.world_model.eval()
    episodes = read_episodes([str(tmp_path / "w")], cfg.data.height, cfg.data.width, signals=spec.signals)
    chunk = cfg.data.num_frames - 1
    aligns = {s.batch_key: s.align for s in spec.signals}
    for sig in spec.signals:
        rows = chunk if sig.align == "transitions" else chunk + 1 if sig.align == "frames" else None
        values = torch.stack([ep.signals[sig.batch_key][:rows] for ep in episodes])
        tf = teacher_forced_losses(types.SimpleNamespace(module=module), episodes, chunk, aligns, sig.batch_key,
                                   permute(values, "episodes") + 1.0, chunks=1)
        assert tf["loss_true"] == tf["loss_control"] > 0, (task, family, sig.ext, tf)


@pytest.mark.parametrize("task,family", CASES, ids=IDS)
def test_world_generates_three_steps_train_and_the_eval_reports(runs, task, family):
    from nemo_ext.data.shards import read_manifest
    from nemo_ext.eval.report import check_report

    run_dir = runs[f"{task}-{family}"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    _zero_paths_trained(task, family, run_dir)
    _console_is_readable((run_dir.parent / f"{run_dir.name}.console.log").read_text())
    world = run_dir.parents[3] / f"world_{task}_{family}"
    manifest = read_manifest(world)
    assert manifest["num_samples"] == 4
    for sig in get_task(task).signals:
        stats = manifest["extra"]["sidecars"][sig.ext]
        assert stats["kind"] == sig.align and (not sig.normalised or stats["count"] > 0)
    spec = EVALUATIONS.get(task)
    out_dir = run_dir / "eval" / "contract"
    proc = subprocess.run([sys.executable, "-m", "nemo_ext.cli.eval", "--ckpt", str(run_dir), *spec.quick_args,
                           "--out", str(out_dir), "--no-progress"], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out_dir / "report.json").read_text())
    assert check_report(report, rollout=spec.run is None) == []
    assert report["task"] == task and report["family"] == family
    assert (out_dir / report["outputs"]["metrics_png"]).is_file()
    assert report["outputs"]["videos"] and all((out_dir / v).is_file() for v in report["outputs"]["videos"])


def _zero_paths_trained(task, family, run_dir):
    """The conditioner's zero-initialised tensors (a fresh build's all-zero ones) moved in 3 steps: the new
    paths get gradients (LoRA + recompute once silently did not)."""
    from nemo_ext.checkpoint import read_tensors
    from nemo_ext.config.compose import compose, to_typed

    if family not in get_task(task).zero_init:
        return
    cfg = to_typed(compose(task, family))
    spec = get_task(task)
    extra = spec.extra_channels(cfg.task, cfg.model)
    if extra:  # the patch embedding's columns of the task's channels start at zero and must train
        weight = next(v for name, v in read_tensors(run_dir / "checkpoints" / "step_3", ["model.net.patch_embed."]).items()
                      if name.endswith("patch_embed.weight"))
        vol = int(np.prod(cfg.model.patch_size))
        assert weight[:, -extra * vol:].abs().max() > 0, (task, family, "the extra channels' columns did not train")
    torch.manual_seed(0)
    fresh = spec.build_conditioner(cfg.task, cfg.model, cfg.data).state_dict()
    zero = [k for k, v in fresh.items() if v.is_floating_point() and v.numel() and not v.any()
            and not k.endswith(("mean", "std"))]
    if not zero:
        return
    trained = read_tensors(run_dir / "checkpoints" / "step_3", ["model.conditioner."])
    moved = [k for k in zero if any(name.endswith(k) and v.abs().max() > 0 for name, v in trained.items())]
    assert moved == zero, (task, family, sorted(set(zero) - set(moved)))


def _console_is_readable(log):
    """The known third-party notices of a CPU run are one line each (nemo_ext/utils/console.py)."""
    assert log.count("notice] transformer-engine and apex are not installed") == 1, log[:3000]
    for raw in ("Transformer Engine and Apex are not installed", "No CUDA runtime is found", "OneLogger:",
                "No exporters were provided", "dataloader_iter"):
        assert raw not in log, (raw, log[:3000])
