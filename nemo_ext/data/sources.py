"""Prep sources: the converters from the formats users have to clip shards, found by registry.

A converter module in ``data_prep/`` (one per task: ``data_prep/<task>.py``, plus the generic
``videos``) registers a :class:`PrepSource` per format when imported; pyproject.toml's
``cosmos_recipes.prep_sources`` entry points name those modules, and :data:`SOURCES` imports them
the first time it is asked. ``python -m nemo_ext.cli.prep <source>`` (``make data SOURCE=<source>``)
builds its subcommands from the registry: the shared clip and sharding options, the source's own,
and one runner. The library below the CLIs never imports ``data_prep``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from nemo_ext.registry import Registry, load_entry_points

ENTRY_POINT_GROUP = "cosmos_recipes.prep_sources"


@dataclass(frozen=True)
class PrepSource:
    name: str  # the subcommand: prep <name>, make data SOURCE=<name>
    help: str  # one line for `prep --help`
    # (args, cfg) -> the converter's result (``data_prep.clips.PrepResult``): args holds the shared
    # options (--raw, --out, clip and sharding options) and the source's own; cfg the composed recipe
    run: Callable
    recipe: str = "general"  # the recipe whose data.* values are the clip defaults
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    keeps_source_fps: bool = False  # clips keep each input's frame rate (--fps refused): a row per recorded step
    all_clips: bool = False  # every clip of each input by default (--clips-per-video 0): short episodes
    unit: str = "videos"  # what the inputs are called in the summary ("episodes")
    # (out_dir) -> extra summary lines (e.g. the actions' dimension and statistics)
    summary: Callable = lambda out_dir: []
    description: str = ""


SOURCES: Registry[PrepSource] = Registry("prep source", load_entry_points(ENTRY_POINT_GROUP))


def register_source(source: PrepSource) -> PrepSource:
    return SOURCES.register(source.name, source)
