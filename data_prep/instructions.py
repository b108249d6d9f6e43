"""Source format: videos with a per-video instruction JSON -> clip shards (the instruction task).

Each video under RAW (recursive; ``.mp4 .mov .mkv .webm .avi``) has a JSON file of the same stem
next to it (``ep1.mp4`` + ``ep1.json``) holding its language instructions in any of the forms
robot datasets use:

* ``language_instruction_0``, ``language_instruction_1``, ... (Bridge-style variants),
* ``language_instruction``: a string or a list of strings,
* ``instructions``: a list of strings.

All non-empty variants (stripped, duplicates removed, in that key order, numbered keys by
number) go into each clip's json as ``instructions``; the caption is the first of them. A video
whose JSON is missing, invalid, or holds no non-empty instruction is rejected with a report line.
Other keys of the JSON are ignored. The clips are made by :func:`data_prep.clips.prepare`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.clips import (ClipSpec, PrepError, PrepResult, ShardLayout, SourceVideo, find_videos, prepare,
                             source_video)

logger = logging.getLogger(__name__)

__all__ = ["SOURCE", "InstructionError", "read_instructions", "collect_instructions", "prepare_instructions"]

SOURCE = "instructions"
_NUMBERED = re.compile(r"^language_instruction_(\d+)$")


class InstructionError(ValueError):
    """An instruction JSON that gives no usable instruction; the message is the report reason."""


def _strings(value: Any, key: str) -> list[str]:
    """A key's value as a list of strings (None counts as empty); anything else is an error."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
        return [v for v in value if v is not None]
    raise InstructionError(f"key {key!r}: expected a string or a list of strings, got {value!r:.80}")


def read_instructions(path: str | os.PathLike) -> list[str]:
    """The instruction variants of one JSON file, first = the caption.

    Raises :class:`InstructionError` (message names the file and the problem) when the file is
    missing, not a JSON object, has a wrongly typed instruction key, or gives no non-empty text.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InstructionError(f"no instruction file: expected {path.name} next to the video") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InstructionError(f"cannot read the instruction file {path.name}: {e}") from e
    except json.JSONDecodeError as e:
        raise InstructionError(f"instruction file {path.name} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise InstructionError(f"instruction file {path.name}: expected a JSON object, got {type(obj).__name__}")
    numbered = sorted((int(m.group(1)), k) for k in obj if (m := _NUMBERED.match(k)))
    keys = (["language_instruction"] if "language_instruction" in obj else []) + [k for _, k in numbered] + (
        ["instructions"] if "instructions" in obj else [])
    if not keys:
        raise InstructionError(f"instruction file {path.name} has no language_instruction, "
                               "language_instruction_<n> or instructions key")
    variants: list[str] = []
    for key in keys:
        for text in _strings(obj[key], key):
            text = text.strip()
            if text and text not in variants:
                variants.append(text)
    if not variants:
        raise InstructionError(f"instruction file {path.name}: every instruction is empty ({', '.join(keys)})")
    return variants


def collect_instructions(raw: str | os.PathLike, exclude: str | os.PathLike | None = None,
                         ) -> tuple[list[SourceVideo], dict[str, Any]]:
    """RAW's videos with their instructions (or reject reasons) and the source parameters."""
    raw = Path(raw)
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    rels = find_videos(raw, exclude=exclude)
    if not rels:
        raise PrepError(f"RAW {raw} holds no videos (looked for .mp4 .mov .mkv .webm .avi, recursively)")
    videos = []
    for rel in rels:
        try:
            variants = read_instructions((raw / rel).with_suffix(".json"))
        except InstructionError as e:
            videos.append(source_video(raw, rel, None, reject=str(e)))
            continue
        videos.append(source_video(raw, rel, variants[0], meta={"instructions": variants}))
    return videos, {"raw": str(raw.resolve())}


def prepare_instructions(raw: str | os.PathLike, out: str | os.PathLike, spec: ClipSpec,
                         layout: ShardLayout = ShardLayout(), *, workers: int = 1, progress: bool = True,
                         info: Mapping[str, Any] | None = None) -> PrepResult:
    """Videos + instruction JSON under ``raw`` -> clip shards in ``out``."""
    videos, params = collect_instructions(raw, exclude=out)
    return prepare(SOURCE, videos, out, spec, layout, workers=workers, source_params=params, info=info,
                   progress=progress)
