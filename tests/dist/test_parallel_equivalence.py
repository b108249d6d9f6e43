"""Every parallel layout gives the single-process result on the same weights.

A single-process reference run writes checkpoints after steps 1, 2 and 3. Each layout resumes
from the reference's step-1 checkpoint (resharding model *and* optimizer state from one process to
its layout) and must reproduce the reference's step-2 loss and grad norm, and its step-2 weights:
the whole model after the update, which equal weights only if the gradients were equal. The
TP2xPP2 run's own step-2 checkpoint is then resumed in one process and must reproduce step 3
(resharding back); the autoregressive family goes through the same checks (TP2xPP2 with sequence
parallelism in CI). Runs are real multi-process worlds started with torchrun through the training
CLI: gloo on CPU (CI) and NCCL on GPUs (marked multigpu). The same runs check the validation loss:
the reference validates after steps 2 and 3, every layout after its last step (2), on the held-out
sample world split over its data-parallel ranks, and must match.
"""

from __future__ import annotations

import shutil

import pytest
from support import run_cli

from nemo_ext.checkpoint import read_tensors

# PyAV loader: its global batch does not depend on the data-parallel size (DALI's reader shards
# the data by DP rank, so a DP layout would read other samples than the one-process reference).
COMMON = ["data.backend=pyav", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_n_checkpoints=5",
          "data.num_workers=0", "data.sample_num_videos=16", "trainer.val_every_n_steps=2"]
# layout name -> (processes, overrides). CI runs these on CPU ...
LAYOUTS = {
    "tp2": (2, ["parallel=tp2"]),
    "pp2": (2, ["parallel=pp2"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2"]),
    "cp2": (2, ["parallel=cp2"]),
    "dp2_distopt": (2, ["parallel=dp_distopt"]),
    "recompute_full": (1, ["parallel.recompute=full", "parallel.recompute_num_layers=2"]),
    "recompute_selective": (1, ["parallel.recompute=selective"]),
}
# ... and make test-full adds the rest of the matrix.
SLOW_LAYOUTS = {
    "tp2_sp": (2, ["parallel=tp2_sp"]),
    "tp2_cp2_sp": (4, ["parallel=tp2_cp2_sp"]),
    "pp2_recompute_block": (2, ["parallel=pp2", "parallel.recompute=full", "parallel.recompute_method=block"]),
}
# The autoregressive family through the same trainer: one TP2xPP2 world with sequence parallelism
# in CI (TP, SP, PP and their interaction in one spawn), DP with the distributed optimizer in test-full.
AR_LAYOUTS = {
    "ar_tp2_pp2_sp": (4, ["parallel=tp2_pp2", "parallel.sequence_parallel=true"]),
}
AR_SLOW_LAYOUTS = {
    "ar_dp2_distopt": (2, ["parallel=dp_distopt"]),
    "ar_pp2": (2, ["parallel=pp2"]),
    # LoRA through the trainer (frozen base, adapter-only checkpoints with their optimizer state
    # resharded); the AR family because a fresh DiT's AdaLN-Zero gates give its adapters no
    # gradient (CI covers both families' LoRA at TP2xPP2+SP in test_lora_parallel.py).
    "ar_lora_tp2_pp2_sp": (4, ["parallel=tp2_pp2", "parallel.sequence_parallel=true", "strategy=lora"]),
}
SLOW_LAYOUTS = {**SLOW_LAYOUTS, **AR_SLOW_LAYOUTS}
ALL = {**LAYOUTS, **AR_LAYOUTS, **SLOW_LAYOUTS}


def _family(name: str) -> str:
    return "ar" if name.startswith("ar_") else "diffusion"


def _strategy_overrides(overrides) -> list:
    return [o for o in overrides if o.startswith("strategy")]


def _uses_distopt(overrides, family: str = "diffusion") -> bool:
    from nemo_ext.config.compose import compose

    return bool(compose("general", family, overrides).parallel.distributed_optimizer)


@pytest.fixture(scope="module")
def references(tmp_path_factory, sample_world):
    """Single-process reference runs, one per (optimizer kind, device): the optimizer-state format
    depends on the optimizer kind and precision, so a distributed-optimizer layout resumes from a
    reference that used the distributed optimizer too, and GPU layouts from a GPU reference."""
    runs = tmp_path_factory.mktemp("ref_runs")
    cache = {}

    def get(distopt: bool, device: str, family: str = "diffusion", strategy: tuple = ()):
        key = (distopt, device, family, strategy)
        if key not in cache:
            extra = ["parallel.distributed_optimizer=true"] if distopt else []
            name = f"ref_{device}_{'distopt' if distopt else 'plain'}" + ("_lora" if strategy else "")
            cache[key] = run_cli([*COMMON, f"data.sample_dir={sample_world}", "trainer.max_steps=3", *extra, *strategy],
                                 runs_dir=runs, run_name=name, device=device, family=family)
        return cache[key]

    return get


def _fork_at_step(reference, runs_dir, step: int, name: str):
    """A copy of the reference run holding only its checkpoint of `step` (as last)."""
    dst = runs_dir / reference.run_dir.relative_to(reference.run_dir.parents[2]).parent / name
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference.run_dir / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    (dst / "checkpoints" / "last").symlink_to(f"step_{step}")
    if (reference.run_dir / "base").is_dir():  # a LoRA run's random base
        shutil.copytree(reference.run_dir / "base", dst / "base")
    return dst


def _assert_same_weights(a_dir, b_dir, label):
    a, b = read_tensors(a_dir, prefixes=["model."]), read_tensors(b_dir, prefixes=["model."])
    assert sorted(a) == sorted(b), label
    for key in a:
        assert a[key].shape == b[key].shape, (label, key)
        diff = (a[key].float() - b[key].float()).abs().max().item()
        assert diff <= 1e-5 + 1e-4 * a[key].float().abs().max().item(), (label, key, diff)


def _params(layouts, device):
    out = []
    for name, (nproc, overrides) in layouts.items():
        marks = [pytest.mark.slow] if name in SLOW_LAYOUTS else []
        if device == "gpu":
            marks.append(pytest.mark.multigpu if nproc > 1 else pytest.mark.gpu)
        out.append(pytest.param(name, nproc, overrides, device, marks=marks, id=f"{name}-{device}"))
    return out


@pytest.mark.parametrize("name,nproc,overrides,device", _params(ALL, "cpu") + _params(ALL, "gpu"))
def test_layout_reproduces_single_process_step(references, sample_world, tmp_path, name, nproc, overrides, device):
    if device == "gpu":
        import torch

        if torch.cuda.device_count() < nproc:
            pytest.skip(f"needs {nproc} GPUs")
    family = _family(name)
    reference = references(_uses_distopt(overrides, family), device, family, tuple(_strategy_overrides(overrides)))
    ref = reference.metrics()
    runs = tmp_path / "runs"
    _fork_at_step(reference, runs, 1, name)
    run = run_cli([*COMMON, f"data.sample_dir={sample_world}", "trainer.max_steps=2", *overrides],
                  nproc=nproc, runs_dir=runs, run_name=name, device=device, family=family)
    rows = run.metrics()
    tol = 1e-5 if device == "cpu" else 2e-2  # bf16 on GPU
    assert rows[2]["loss"] == pytest.approx(ref[2]["loss"], rel=tol), (name, rows[2], ref[2])
    assert rows[2]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=10 * tol), (name, rows[2], ref[2])
    assert rows[2]["val_samples"] == ref[2]["val_samples"] == 8
    assert rows[2]["val_loss"] == pytest.approx(ref[2]["val_loss"], rel=tol), (name, rows[2], ref[2])
    if device == "cpu":
        _assert_same_weights(reference.run_dir / "checkpoints" / "step_2", run.run_dir / "checkpoints" / "step_2", name)

    if name in ("tp2_pp2", "ar_tp2_pp2_sp", "ar_lora_tp2_pp2_sp"):  # reshard back: its step-2 checkpoint in one process reproduces step 3
        back = run_cli([*COMMON, f"data.sample_dir={sample_world}", "trainer.max_steps=3", *_strategy_overrides(overrides)],
                       runs_dir=runs, run_name=name, device=device, family=family)
        rows = back.metrics()
        assert rows[3]["loss"] == pytest.approx(ref[3]["loss"], rel=tol)
        assert rows[3]["grad_norm"] == pytest.approx(ref[3]["grad_norm"], rel=10 * tol)
        assert rows[3]["val_loss"] == pytest.approx(ref[3]["val_loss"], rel=tol)
