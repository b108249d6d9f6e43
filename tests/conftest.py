"""Shared test fixtures.

* ``gpu`` / ``multigpu`` tests skip cleanly without CUDA GPUs.
* ``train_cli`` runs the real training CLI in a subprocess (see ``support.run_cli``).
* ``sample_world`` generates one small procedural dataset per session, shared by the runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import run_cli


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def pytest_collection_modifyitems(config, items):
    n = _cuda_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs (found {n})")
    for item in items:
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and n < 1:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world():
    """A one-process gloo group with megatron's TP1/PP1 state in the test process (the CPU layer
    is enabled when no GPU is visible, as the trainer does)."""
    import types

    import torch

    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)
    init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    init_model_parallel(types.SimpleNamespace(tp=1, pp=1, cp=1), seed=0)
    yield


@pytest.fixture(scope="session")
def sample_world(tmp_path_factory) -> Path:
    """A 16-video sample world at the dit_tiny recipe's clip size (64x64, 33 frames)."""
    from nemo_ext.worlds import generate

    out = tmp_path_factory.mktemp("sample_world") / "general"
    generate(out_dir=out, variant="general", num_videos=16, num_frames=33, height=64, width=64, seed=0, progress=False)
    return out


@pytest.fixture
def train_cli(tmp_path):
    def run(overrides, **kwargs):
        kwargs.setdefault("runs_dir", tmp_path / "runs")
        return run_cli(overrides, **kwargs)

    return run
