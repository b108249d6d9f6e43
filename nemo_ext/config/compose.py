"""Recipe discovery and Hydra composition.

A recipe is a folder ``recipes/<name>/`` holding ``recipe.yaml`` (diffusion family) and/or
``recipe_ar.yaml`` (autoregressive family). Its defaults pick presets from the shared groups in
``recipes/_base/<group>/``; command-line overrides (``model=dit_7b``, ``trainer.max_steps=10``) are
applied on top. Every failure is a :class:`ConfigError` whose message names the bad key or file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

FAMILY_FILES = {"diffusion": "recipe.yaml", "ar": "recipe_ar.yaml"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key (or file) and what was expected."""


def recipes_dir() -> Path:
    """``$COSMOS_RECIPES_DIR``, else the source tree's ``recipes/``, else the installed copy."""
    env = os.environ.get("COSMOS_RECIPES_DIR")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2] / "recipes"
    if (here / "_base").is_dir():
        return here
    import importlib.util

    spec = importlib.util.find_spec("recipes")
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise ConfigError("cannot find the recipes/ directory; set COSMOS_RECIPES_DIR")


def available_recipes(family: Optional[str] = None) -> list[str]:
    root = recipes_dir()
    files = [FAMILY_FILES[family]] if family else list(FAMILY_FILES.values())
    return sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_") and any((d / f).is_file() for f in files)
    )


def recipe_file(recipe: str, family: str) -> Path:
    if family not in FAMILY_FILES:
        raise ConfigError(f"family={family!r}: expected one of {sorted(FAMILY_FILES)} (FAMILY=diffusion|ar)")
    folder = recipes_dir() / recipe
    if not folder.is_dir():
        raise ConfigError(f"unknown recipe {recipe!r}: available recipes are {available_recipes()}")
    path = folder / FAMILY_FILES[family]
    if not path.is_file():
        raise ConfigError(
            f"recipe {recipe!r} has no {FAMILY_FILES[family]} (family={family}); "
            f"recipes for that family: {available_recipes(family)}"
        )
    return path


def _hydra_message(exc: Exception) -> str:
    """Hydra's message and its causes, without the search-path dump and the '+key' hint (a
    schema-typed config rejects appended keys too)."""
    parts = []
    while exc is not None:
        text = str(exc).split("Config search path:")[0]
        lines = [ln for ln in text.strip().splitlines() if not ln.startswith("To append to your config use")]
        parts.append("\n".join(lines).strip())
        exc = exc.__cause__
    return "\n  caused by: ".join(p for p in parts if p)


def compose(recipe: str, family: str = "diffusion", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose ``recipes/<recipe>/recipe[_ar].yaml`` with ``overrides``; raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nemo_ext.config.schema import register_schemas

    path = recipe_file(recipe, family)
    register_schemas()
    root = recipes_dir()
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = hydra_compose(
                config_name=f"{recipe}/{path.stem}",
                overrides=[f"hydra.searchpath=[file://{root / '_base'}]", *overrides],
            )
    except Exception as exc:  # hydra / omegaconf errors: keep their key-naming message
        raise ConfigError(f"recipe {recipe!r}: {_hydra_message(exc)}") from exc
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.recipe = recipe
        cfg.family = family
    model_family = OmegaConf.select(cfg, "model.family")
    if model_family != family:
        raise ConfigError(
            f"model={OmegaConf.select(cfg, 'model.name')} belongs to the {model_family!r} family but the run "
            f"uses family={family!r}; pick a {family} model preset or set FAMILY={model_family}"
        )
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"recipe {recipe!r}: {_hydra_message(exc)}") from exc
    return cfg


def to_typed(cfg: DictConfig):
    """The composed DictConfig as schema objects (RecipeConfig with typed groups)."""
    try:
        return OmegaConf.to_object(cfg)
    except Exception as exc:
        raise ConfigError(_hydra_message(exc)) from exc
