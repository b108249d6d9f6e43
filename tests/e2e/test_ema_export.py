"""EMA of the weights: kept exactly (ema_k = d * ema_{k-1} + (1 - d) * w_k), restored on resume, and
what `convert export` writes by default."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from nemo_ext.checkpoint import export_diffusers, read_tensors

D = 0.5
ARGS = ["trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_n_checkpoints=5",
        "data.num_workers=0", "data.sample_num_videos=16", f"trainer.ema_decay={D}"]


def test_ema_recurrence_resume_and_export(train_cli, sample_world, tmp_path):
    run = train_cli([*ARGS, f"data.sample_dir={sample_world}", "trainer.max_steps=3"], run_name="ema")
    ckpt = run.run_dir / "checkpoints"
    w3 = read_tensors(ckpt / "step_3", ["model."])
    ema2, ema3 = read_tensors(ckpt / "step_2", ["ema."]), read_tensors(ckpt / "step_3", ["ema."])
    assert sorted(ema3) == sorted("ema." + k for k in w3)
    for key, value in w3.items():
        expected = D * ema2["ema." + key] + (1 - D) * value.float()
        assert torch.allclose(ema3["ema." + key], expected, rtol=1e-6, atol=1e-7), key

    # resume from step 2: the average continues exactly
    resumed_dir = run.run_dir.with_name("ema_resumed")
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt / "step_2", resumed_dir / "checkpoints" / "step_2")
    (resumed_dir / "checkpoints" / "last").symlink_to("step_2")
    train_cli([*ARGS, f"data.sample_dir={sample_world}", "trainer.max_steps=3"], run_name="ema_resumed")
    again = read_tensors(resumed_dir / "checkpoints" / "step_3", ["ema."])
    for key, value in ema3.items():
        assert torch.allclose(again[key], value, rtol=1e-6, atol=1e-7), key

    # export: EMA by default, raw on request
    assert export_diffusers(run.run_dir, tmp_path / "ema_out") == "ema"
    assert export_diffusers(run.run_dir, tmp_path / "raw_out", weights="raw") == "raw"
    ema_w = load_file(str(tmp_path / "ema_out" / "diffusion_pytorch_model.safetensors"))["patch_embed.proj.weight"]
    raw_w = load_file(str(tmp_path / "raw_out" / "diffusion_pytorch_model.safetensors"))["patch_embed.proj.weight"]
    assert torch.equal(ema_w, ema3["ema.model.net.patch_embed.weight"])
    assert torch.equal(raw_w, w3["model.net.patch_embed.weight"])
    assert not torch.equal(ema_w.float(), raw_w.float())
