"""Config composition for every recipe folder and preset (discovered, not listed), and the errors
a user gets for a bad config - each must name the offending key."""

from __future__ import annotations

import pytest

from nemo_ext.config.compose import FAMILY_FILES, ConfigError, available_recipes, compose, recipes_dir, to_typed
from nemo_ext.config.plan import make_plan
from nemo_ext.config.schema import RecipeConfig


def _recipe_files():
    out = []
    for recipe in available_recipes():
        for family, fname in FAMILY_FILES.items():
            if (recipes_dir() / recipe / fname).is_file():
                out.append((recipe, family))
    return out


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / "_base" / group).glob("*.yaml"))


@pytest.mark.parametrize("recipe,family", _recipe_files())
def test_every_recipe_composes_typed_and_plans(recipe, family):
    cfg = to_typed(compose(recipe, family))
    assert isinstance(cfg, RecipeConfig)
    assert cfg.recipe == recipe and cfg.family == family and cfg.model.family == family
    plan = make_plan(cfg, world_size=1, cuda_available=False)
    assert plan.num_tokens > 0 and plan.num_microbatches >= 1 and plan.flops_per_sample > 0
    assert str(plan.run_dir) == f"runs/{recipe}/{family}_{cfg.model.name}/default"


def _preset_family(model: str) -> str:
    """The family a model preset belongs to (its ``defaults`` name the family schema)."""
    import yaml

    node = yaml.safe_load((recipes_dir() / "_base" / "model" / f"{model}.yaml").read_text())
    for parent in node.get("defaults", []):
        if parent in ("ar_schema", "dit_schema"):
            return "ar" if parent == "ar_schema" else "diffusion"
        if parent != "_self_":
            return _preset_family(parent)
    raise AssertionError(f"model preset {model} extends no family schema")


@pytest.mark.parametrize("model", _presets("model"))
def test_every_model_preset_composes(model):
    family = _preset_family(model)
    cfg = to_typed(compose("general", family, [f"model={model}"]))
    assert cfg.model.name == model and cfg.model.family == family
    assert cfg.optim.lr == cfg.model.post_training_lr  # derived from the preset, in one place
    other = "diffusion" if family == "ar" else "ar"
    with pytest.raises(ConfigError, match="family"):  # a preset of the other family is refused, by name
        compose("general", other, [f"model={model}"])


@pytest.mark.parametrize("model, layout, world", [("ar_4b", "tp2_sp", 2), ("ar_4b", "tp8_sp", 8), ("ar_13b", "tp4_sp", 4)])
def test_ar_presets_plan_at_their_layouts(model, layout, world):
    """The released AR shapes: 33 frames at 640x1024 -> 5x40x64 = 12,800 tokens (+<bov> for Video2World)."""
    cfg = to_typed(compose("general", "ar", [f"model={model}", f"parallel={layout}", "data.num_frames=33",
                                             "data.height=640", "data.width=1024", "data.path=/x",
                                             "data.micro_batch_size=1", "data.global_batch_size=1",
                                             "model.text_encoder.max_length=512"]))
    plan = make_plan(cfg, world_size=world, cuda_available=True)
    assert plan.latent_shape == (5, 40, 64)
    # + <bov> for Video2World, padded to a multiple of the TP size under sequence parallelism
    assert plan.num_tokens == (12804 if cfg.model.bov_token else 12800)
    assert plan.flops_per_sample > 0


def test_gqa_with_more_tp_ranks_than_kv_groups_is_rejected():
    cfg = to_typed(compose("general", "ar", ["model=ar_tiny", "parallel=tp4_sp", "data.global_batch_size=4"]))
    with pytest.raises(ConfigError, match=r"parallel\.tp=4.*num_query_groups=2"):
        make_plan(cfg, world_size=4, cuda_available=True)


@pytest.mark.parametrize("layout", _presets("parallel"))
def test_every_parallel_preset_plans_on_its_world_size(layout):
    cfg = to_typed(compose("general", "diffusion", [f"parallel={layout}", "model=dit_7b", "data.global_batch_size=8",
                                                   "data.micro_batch_size=1", "model.text_encoder.max_length=512"]))
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp * 2
    plan = make_plan(cfg, world_size=world, cuda_available=True)
    assert plan.dp == 2 and plan.tp == cfg.parallel.tp


def test_dit_7b_general_shape_is_56320_tokens():
    cfg = to_typed(compose("general", "diffusion", ["model=dit_7b", "data=webdataset_video", "data.path=/x"]))
    plan = make_plan(cfg, world_size=1, cuda_available=True)
    assert plan.latent_shape == (16, 16, 88, 160)
    assert plan.num_tokens == 56320
    assert plan.dtype.is_floating_point and str(plan.dtype) == "torch.bfloat16"


@pytest.mark.parametrize(
    "overrides,world,needle",
    [
        (["trainer.max_stepz=3"], 1, "trainer.max_stepz"),
        (["model=dit_7x"], 1, "dit_7x"),
        (["parallel.tp=2", "parallel.pp=2"], 2, "does not divide the world size 2"),
        (["parallel.tp=3"], 3, "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.pp=3"], 3, "model.num_layers=4 is not divisible by parallel.pp=3"),
        (["data.num_frames=20"], 1, "data.num_frames=20"),
        (["data.height=72"], 1, "data.height=72"),
        (["data.global_batch_size=3"], 1, "data.global_batch_size=3"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
        (["parallel.recompute=sometimes"], 1, "parallel.recompute"),
        (["trainer.device=gpu"], 1, "trainer.device=gpu"),
        (["optim.decay=exp"], 1, "optim.decay"),
        (["data.path=???"], 1, "data.path"),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "model.text_encoder.max_length=33"], 2, "max_length=33"),
        (["parallel.cp=5"], 5, "cannot be split over parallel.cp=5"),
        (["model=dit_tiny_v2w", "model.condition_latent_frames=3"], 1, "model.condition_latent_frames=3"),
        (["trainer.val_every_n_steps=-1"], 1, "trainer.val_every_n_steps=-1"),
        (["trainer.val_batches=0"], 1, "trainer.val_batches=0"),
        (["data.sample_val_num_videos=0"], 1, "data.sample_val_num_videos=0"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, world, needle):
    with pytest.raises(ConfigError) as err:
        make_plan(to_typed(compose("general", "diffusion", overrides)), world_size=world, cuda_available=False)
    assert needle in str(err.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        compose("generl")
    assert "unknown recipe 'generl'" in str(err.value) and "general" in str(err.value)


def test_family_mismatch_is_an_error():
    with pytest.raises(ConfigError) as err:
        compose("general", "diffusion", ["model.family=ar"])
    assert "family" in str(err.value)
