"""Weights imported from a diffusers checkpoint train identically at any TP/PP layout
(``trainer.init_from`` reshards the imported checkpoint)."""

from __future__ import annotations

import pytest
import torch
from support import run_cli

COMMON = ["trainer.log_every_n_steps=1", "trainer.max_steps=1", "trainer.checkpoint_every_n_steps=1",
          "data.num_workers=0", "data.sample_num_videos=16"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, megatron_world):
    from diffusers import CosmosTransformer3DModel

    from nemo_ext.checkpoint import import_diffusers

    root = tmp_path_factory.mktemp("imported")
    torch.manual_seed(0)
    model = CosmosTransformer3DModel(  # the dit_tiny architecture
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=16, num_layers=4,
        text_embed_dim=32, adaln_lora_dim=16, max_size=(16, 32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    model.save_pretrained(root / "diffusers")
    import_diffusers(root / "diffusers", root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def single_process_loss(imported, sample_world, tmp_path_factory):
    run = run_cli([*COMMON, f"data.sample_dir={sample_world}", f"trainer.init_from={imported}"],
                  runs_dir=tmp_path_factory.mktemp("runs"), run_name="tp1")
    return run.metrics()[1]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_imported_weights_train_identically_at_any_layout(imported, single_process_loss, sample_world, tmp_path, layout):
    run = run_cli([*COMMON, f"data.sample_dir={sample_world}", f"trainer.init_from={imported}", f"parallel={layout}"],
                  nproc=2, runs_dir=tmp_path, run_name=layout)
    row = run.metrics()[1]
    assert row["loss"] == pytest.approx(single_process_loss["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(single_process_loss["grad_norm"], rel=1e-4)
