"""``strategy=lora`` end to end through the training CLI on CPU, for every recipe of both families
(discovered from the recipe folders): a LoRA run on a base checkpoint trains its adapters (and the
task conditioner), writes adapter-only checkpoints that name their base, resumes to exactly the
steps it would have taken, and ``convert merge`` folds the adapters into a normal checkpoint that
computes the adapted function and exports like any other."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from support import run_cli

from nemo_ext.config.compose import FAMILY_FILES, available_recipes

RECIPES = [(recipe, family) for family in FAMILY_FILES for recipe in available_recipes(family)]
COMMON = ["strategy=lora", "data.backend=pyav", "data.num_workers=0", "data.sample_num_videos=4",
          "data.sample_val_num_videos=1", "trainer.val_every_n_steps=0", "trainer.log_every_n_steps=1",
          "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_n_checkpoints=5"]
ADAPTER = "_lora.lora_"


def _write_base(recipe: str, family: str, out):
    """A pretrained-like base for the recipe's model (every matrix non-zero: the DiT's AdaLN gates
    are open), network weights only, as ``convert import`` writes them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.config.plan import make_plan
    from nemo_ext.training.run import family_module

    cfg = to_typed(compose(recipe, family, ["trainer.device=cpu"]))
    module = family_module(family)(cfg, make_plan(cfg, world_size=1, cuda_available=False))
    (out.parent / f"{out.name}.model").parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.model").write_text(cfg.model.name)
    module.world_model = module.build_world_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.world_model.net.named_parameters():
            base, std = (1.0, 0.05) if "norm" in name else (0.0, 0.05)
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    sd = {k: v for k, v in module.full_sharded_state_dict().items()
          if k.startswith("model.net.") and isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    out.mkdir(parents=True)
    dist_checkpointing.save({"state_dict": sd}, str(out), content_metadata={"model": dataclasses.asdict(cfg.model)})
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, megatron_world):
    """One two-step LoRA run per (recipe, family) on its base, run on first use."""
    root = tmp_path_factory.mktemp("lora")
    cache = {}

    def get(recipe: str, family: str):
        if (recipe, family) not in cache:
            base = _write_base(recipe, family, root / "bases" / f"{recipe}_{family}")
            model = (base.parent / f"{base.name}.model").read_text()  # the recipe's default model
            run = run_cli([*COMMON, f"model={model}", f"data.sample_dir={root / 'data' / recipe}", "trainer.max_steps=2",
                           f"trainer.init_from={base}"], runs_dir=root / "runs", run_name="lora", recipe=recipe,
                          family=family)
            cache[recipe, family] = (run, base)
        return cache[recipe, family]

    return get


@pytest.mark.parametrize("recipe,family", RECIPES, ids=[f"{r}-{f}" for r, f in RECIPES])
def test_lora_trains_every_recipe_and_merges(lora_runs, tmp_path, recipe, family):
    from megatron.core import dist_checkpointing

    from nemo_ext.checkpoint import ConversionError, export_diffusers, read_tensors
    from nemo_ext.checkpoint.cosmos_ar import export_cosmos_ar
    from nemo_ext.checkpoint.lora import merge_lora_checkpoint

    run, base = lora_runs(recipe, family)
    assert "strategy=lora: trainable parameters:" in run.output
    rows = run.metrics()
    assert sorted(rows) == [1, 2] and all(rows[s]["grad_norm"] > 0 for s in (1, 2)), rows

    # adapter-only checkpoints that name their base
    ckpt = run.run_dir / "checkpoints" / "step_2"
    trained = read_tensors(ckpt, ["model."])
    adapters = {k: v for k, v in trained.items() if ADAPTER in k}
    assert adapters and all(ADAPTER in k or k.startswith("model.conditioner.") for k in trained), sorted(trained)
    assert any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))  # B moved off zero
    if recipe == "action_control":
        cond = [k for k in trained if k.startswith("model.conditioner.")]
        assert cond and any(k.endswith("mean") for k in cond)  # the new task module trains fully, stats included
    base_tensors = read_tensors(base, ["model."])
    assert sum(v.numel() for v in trained.values()) < sum(v.numel() for v in base_tensors.values())
    meta = dist_checkpointing.load_content_metadata(str(ckpt))
    assert meta["strategy"]["name"] == "lora" and meta["base"] == str(base.resolve())
    assert 0 < meta["parameters"]["trainable"] < meta["parameters"]["total"]
    assert not (run.run_dir / "base").exists()  # trainer.init_from is the base

    # merge -> a normal checkpoint: the base's tensors (adapted ones changed) + the trained task modules
    summary = merge_lora_checkpoint(run.run_dir, tmp_path / "merged")
    assert summary["merged_weights"] == len(adapters) // 2
    merged = read_tensors(tmp_path / "merged", ["model."])
    assert set(merged) == set(base_tensors) | {k for k in trained if ADAPTER not in k}
    changed = {k for k in base_tensors if not torch.equal(merged[k], base_tensors[k])}
    # (every adapted weight that got a non-zero B; action_control's zero text context leaves cross-attention's at 0)
    assert changed and changed <= {k.split("_lora.")[0] + ".weight" for k in adapters}
    with pytest.raises(ConversionError, match="merge them into their base first"):
        (export_diffusers if family == "diffusion" else export_cosmos_ar)(ckpt, tmp_path / "direct")
    if family == "diffusion":
        assert export_diffusers(tmp_path / "merged", tmp_path / "diffusers") == "raw"
    else:
        assert export_cosmos_ar(tmp_path / "merged", tmp_path / "model.pt") == "raw"


def test_lora_run_resumes_from_its_adapter_checkpoint(lora_runs, tmp_path):
    """A run cut after step 1 resumes (base from trainer.init_from + adapters and their optimizer
    state from the checkpoint) to exactly the step 2 of the uninterrupted run."""
    straight, base = lora_runs("general", "diffusion")
    fork = tmp_path / "runs" / straight.run_dir.relative_to(straight.run_dir.parents[2]).parent / "resumed"
    (fork / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.run_dir / "checkpoints" / "step_1", fork / "checkpoints" / "step_1")
    (fork / "checkpoints" / "last").symlink_to("step_1")
    sample_dir = straight.run_dir.parents[3] / "data" / "general"
    run = run_cli([*COMMON, f"data.sample_dir={sample_dir}", "trainer.max_steps=2", f"trainer.init_from={base}"],
                  runs_dir=tmp_path / "runs", run_name="resumed")
    assert "resuming from" in run.output
    got, ref = run.metrics(), straight.metrics()
    assert sorted(got) == [2]
    assert got[2]["loss"] == pytest.approx(ref[2]["loss"], rel=1e-6, abs=1e-7)
    assert got[2]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("family", ["diffusion", "ar"])
def test_merged_checkpoint_computes_the_adapted_function(lora_runs, megatron_world, tmp_path, family):
    """The run loaded for generation (its base + adapters, as `make sample CKPT=<lora run>` does)
    and the merged checkpoint loaded as a plain model give the same outputs."""
    from nemo_ext.checkpoint.lora import merge_lora_checkpoint
    from nemo_ext.eval import generation as g

    run, _ = lora_runs("general", family)
    merge_lora_checkpoint(run.run_dir, tmp_path / "merged")
    adapted = g.load_run(str(run.run_dir))
    plain = g.load_run(str(tmp_path / "merged"), recipe="general", family=family)
    assert adapted.cfg.strategy.name == "lora" and plain.cfg.strategy.name == "full"
    gen = torch.Generator().manual_seed(0)
    outs = []
    for loaded in (adapted, plain):
        model = loaded.module.world_model
        with torch.no_grad():
            if family == "diffusion":
                c, t, h, w = loaded.plan.latent_shape
                x = torch.randn(1, c, t, h, w, generator=gen.manual_seed(0))
                ctx = torch.randn(1, loaded.plan.context_len, loaded.cfg.model.context_dim, generator=gen)
                outs.append(model(x, torch.rand(1, generator=gen), {"context": ctx}))
            else:
                tokens = torch.randint(0, loaded.cfg.model.vocab_size, (1, loaded.plan.num_tokens), generator=gen.manual_seed(0))
                outs.append(model(tokens, None, {"context": None}, grid=tuple(loaded.plan.latent_shape)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_vs_full_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/lora_vs_full.py on the tiny preset: both strategies run, the result file has their
    step times, memory and parameter counts (the GPU numbers come from the same script)."""
    import json
    import subprocess
    import sys

    from support import REPO

    cmd = [sys.executable, "benchmarks/lora_vs_full.py", "--model", "dit_tiny", "--steps", "2", "--warmup", "1",
           "--device", "cpu", "--out", str(tmp_path), "--name", "smoke", "--", "data.backend=pyav",
           "data.num_workers=0", f"data.sample_dir={tmp_path / 'world'}", "data.sample_num_videos=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())["results"]
    full, lora = result["full"], result["lora"]
    assert full["status"] == lora["status"] == "ok"
    assert full["trainable_params"] == full["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert 0 < lora["trainable_params"] < full["total_params"] and lora["step_time_s_median"] > 0
