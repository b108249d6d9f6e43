"""The instruction task's converters: videos with language instructions -> clip shards.

Every source lists each video with its instruction variants (stripped, de-duplicated, in the source's
order); they go into each clip's json as ``instructions``, the first is the caption. A video without a
usable instruction (no file, unreadable JSON, no non-empty text, an empty or missing video) is a report
line, never a silent drop. ``--instructions first`` (default) writes one sample per clip (train with
``data.caption_choice=random`` to draw one of its instructions each time a sample is seen); ``each``
writes one sample per instruction (the clip repeated, key suffix ``i<k>``).

Formats (prep sources):

``instructions`` -- each video under RAW (recursive; ``.mp4 .mov .mkv .webm .avi``) with a same-stem
JSON next to it (``ep1.mp4`` + ``ep1.json``) holding ``language_instruction_0``, ``_1``, ... (Bridge
variants), ``language_instruction`` (a string or a list) or ``instructions`` (a list).

``cosmos_instructions`` -- the Cosmos / NeMo post-training layout: ``<RAW>/videos/<id>.mp4`` and
``<RAW>/instructions/<id>.json`` (the same keys).

``bridge_instructions`` -- the IRASim release of Bridge: ``annotation/<split>/<id>.json`` with
``texts`` (the instructions) and the video at ``videos[<camera>].video_path`` relative to RAW.

``lerobot_instructions`` -- LeRobot v2.0/v2.1: ``meta/tasks.jsonl`` (``task_index`` -> ``task``); an
episode's instructions are the tasks of the per-frame ``task_index`` column of its parquet file, in
order of appearance, or ``meta/episodes.jsonl``'s ``tasks`` list (several per episode) when the
parquet has no such column; the camera video per the ``video_path`` template.

``instruction_table`` -- a ``.csv`` (header ``video,instruction``) or ``.jsonl`` (``{"video": ...,
"instruction": ...}``) file (``--table``): one row per instruction, several rows per video for
several instructions; ``video`` relative to RAW or a unique file name. A row naming no video is a
report line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.clips import (ClipSpec, PrepError, PrepResult, ShardLayout, SourceVideo, clip_options, find_videos,
                             prepare, raw_videos, source_video)
from nemo_ext.data.sources import PrepSource, register_source

logger = logging.getLogger(__name__)

__all__ = ["SOURCE", "InstructionError", "read_instructions", "collect_instructions", "prepare_instructions",
           "collect_cosmos", "collect_bridge_texts", "collect_lerobot_tasks", "collect_table", "per_instruction"]

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
    rels = raw_videos(raw, exclude=exclude)
    videos = []
    for rel in rels:
        try:
            variants = read_instructions((raw / rel).with_suffix(".json"))
        except InstructionError as e:
            videos.append(source_video(raw, rel, None, reject=str(e)))
            continue
        videos.append(source_video(raw, rel, variants[0], meta={"instructions": variants}))
    return videos, {"raw": str(raw.resolve())}


def collect_cosmos(raw: str | os.PathLike, exclude=None) -> tuple[list[SourceVideo], dict[str, Any]]:
    """The Cosmos / NeMo layout: videos/<id>.mp4 + instructions/<id>.json."""
    raw = Path(raw)
    if not (raw / "videos").is_dir():
        raise PrepError(f"RAW {raw} has no videos/ folder (the Cosmos layout: videos/<id>.mp4 + instructions/<id>.json)")
    rels = [f"videos/{r}" for r in find_videos(raw / "videos", exclude=exclude)]
    if not rels:
        raise PrepError(f"RAW {raw}/videos holds no videos")
    videos = []
    for rel in rels:
        stem = Path(rel).relative_to("videos").with_suffix(".json")
        try:
            variants = read_instructions(raw / "instructions" / stem)
        except InstructionError as e:
            videos.append(source_video(raw, rel, None, reject=str(e).replace("next to the video",
                                                                               f"at instructions/{stem}")))
            continue
        videos.append(source_video(raw, rel, variants[0], meta={"instructions": variants}))
    return videos, {"raw": str(raw.resolve()), "layout": "cosmos"}


def collect_bridge_texts(raw: str | os.PathLike, split: str | None = "train", camera: int = 0
                         ) -> tuple[list[SourceVideo], dict[str, Any]]:
    """IRASim/Bridge: annotation/<split>/<id>.json ``texts`` + videos[camera].video_path."""
    from data_prep.action_control import EpisodeError, _bridge_splits, _rel_video, _texts

    raw = Path(raw)
    root, splits = _bridge_splits(raw, split)
    videos = []
    for name in splits:
        for path in sorted((root / name).glob("*.json")):
            what = f"{path.relative_to(raw).as_posix()}"
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(obj, dict):
                    raise EpisodeError(f"{what}: expected a JSON object")
                entries = obj.get("videos")
                if not isinstance(entries, list) or len(entries) <= camera or not isinstance(entries[camera], dict):
                    raise EpisodeError(f"{what}: no videos[{camera}] entry")
                rel = _rel_video(raw, entries[camera].get("video_path"), what)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                videos.append(SourceVideo(rel=what, path=str(path), size=-1, caption=None,
                                          reject=f"{what}: cannot read the annotation ({e})"))
                continue
            except EpisodeError as e:
                videos.append(SourceVideo(rel=what, path=str(path), size=-1, caption=None, reject=str(e)))
                continue
            texts = _texts(obj, ("texts", "language_instruction", "instructions"))
            if not texts:
                videos.append(source_video(raw, rel, None, reject=f"{what}: no instruction ('texts' is missing or empty)"))
                continue
            videos.append(source_video(raw, rel, texts[0], meta={"instructions": texts, "annotation": what}))
    if not videos:
        raise PrepError(f"{root}: no annotation JSON in split(s) {', '.join(splits)}")
    return videos, {"raw": str(raw.resolve()), "split": split, "camera": camera}


def _parquet_task_ids(path: Path) -> list[int] | None:
    """The per-frame ``task_index`` values of an episode's parquet, in order of appearance (None: no such
    column)."""
    from data_prep.action_control import _import_pyarrow

    pq = _import_pyarrow()
    table = pq.read_table(path, columns=None)
    if "task_index" not in table.column_names:
        return None
    seen: list[int] = []
    for t in table.column("task_index").to_pylist():
        if t is not None and int(t) not in seen:
            seen.append(int(t))
    return seen


def collect_lerobot_tasks(raw: str | os.PathLike, camera: str | None = None) -> tuple[list[SourceVideo], dict[str, Any]]:
    """LeRobot v2.x: per episode the tasks of its frames (parquet ``task_index`` -> meta/tasks.jsonl), or
    meta/episodes.jsonl's ``tasks``."""
    from data_prep.action_control import EpisodeError, _rel_video, read_lerobot_info

    raw = Path(raw)
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    meta = read_lerobot_info(raw, camera, action_key=_any_feature(raw), state_key=None)
    videos = []
    for row in sorted(meta["episodes"], key=lambda r: r["episode_index"]):
        index = row["episode_index"]
        name = f"episode_{index:06d}"
        fmt = {"episode_chunk": index // meta["chunks_size"], "episode_index": index, "video_key": meta["camera"]}
        data_rel, video_rel = meta["data_path"].format(**fmt), meta["video_path"].format(**fmt)
        try:
            rel = _rel_video(raw, video_rel, f"episode {name} ({meta['camera']})")
        except EpisodeError as e:
            videos.append(SourceVideo(rel=video_rel, path=str(raw / video_rel), size=-1, caption=None, reject=str(e)))
            continue
        texts: list[str] = []
        ids = _parquet_task_ids(raw / data_rel) if (raw / data_rel).is_file() else None
        if ids:
            missing = [t for t in ids if t not in meta["tasks"]]
            if missing:
                videos.append(source_video(raw, rel, None, reject=f"episode {name}: task_index {missing} not in "
                                                                  "meta/tasks.jsonl"))
                continue
            texts = [meta["tasks"][t].strip() for t in ids if meta["tasks"][t].strip()]
        if not texts:
            texts = [t.strip() for t in row.get("tasks") or [] if isinstance(t, str) and t.strip()]
        if not texts:
            videos.append(source_video(raw, rel, None, reject=f"episode {name}: no task (no task_index column in "
                                                              f"{data_rel} and no tasks in meta/episodes.jsonl)"))
            continue
        texts = list(dict.fromkeys(texts))
        videos.append(source_video(raw, rel, texts[0], meta={"instructions": texts, "episode_index": index,
                                                             "camera": meta["camera"]}))
    if not videos:
        raise PrepError(f"RAW {raw}: meta lists no episodes")
    return videos, {"raw": str(raw.resolve()), "camera": meta["camera"]}


def _any_feature(raw: Path) -> str:
    """A feature read_lerobot_info can validate against (this source needs no action column)."""
    try:
        features = json.loads((raw / "meta" / "info.json").read_text(encoding="utf-8")).get("features") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return "action"  # read_lerobot_info reports the problem
    return "action" if "action" in features else next(iter(features), "action")


def collect_table(raw: str | os.PathLike, table: str | os.PathLike, exclude=None
                  ) -> tuple[list[SourceVideo], list[dict[str, str]], dict[str, Any]]:
    """A csv/jsonl of video,instruction rows (several rows per video: several instructions)."""
    import posixpath

    from data_prep.videos import read_captions, resolve_video_row

    raw = Path(raw)
    rels = raw_videos(raw, exclude=exclude)
    rows = read_captions(table, text="instruction")
    by_name: dict[str, list[str]] = {}
    for rel in rels:
        by_name.setdefault(posixpath.basename(rel), []).append(rel)
    texts: dict[str, list[str]] = {}
    issues = []
    for row in rows:
        rel, why = resolve_video_row(row.video, raw, set(rels), by_name)
        if rel is None:
            issues.append({"video": row.video, "reason": f"{Path(table).name} line {row.line}: {why}"})
        elif row.caption and row.caption not in texts.setdefault(rel, []):
            texts[rel].append(row.caption)
    videos = [source_video(raw, rel, texts[rel][0], meta={"instructions": texts[rel]}) if texts.get(rel)
              else source_video(raw, rel, None, reject=f"no instruction: {Path(table).name} has no non-empty row for it")
              for rel in rels]
    return videos, issues, {"raw": str(raw.resolve()), "table": str(Path(table).resolve())}


def per_instruction(videos: list[SourceVideo], mode: str) -> list[SourceVideo]:
    """``first``: as listed; ``each``: one source video per instruction (the same file, its own caption
    and key: rel ``<rel>#i<k>``)."""
    if mode == "first":
        return videos
    if mode != "each":
        raise PrepError(f"--instructions {mode!r}: expected first or each")
    out = []
    for v in videos:
        variants = v.meta.get("instructions") or []
        if v.reject or len(variants) < 2:
            out.append(v)
            continue
        for k, text in enumerate(variants):
            out.append(dataclasses.replace(v, rel=f"{v.rel}#i{k}", caption=text,
                                           meta={**v.meta, "instruction_index": k}))
    return out


def prepare_instructions(raw: str | os.PathLike, out: str | os.PathLike, spec: ClipSpec,
                         layout: ShardLayout = ShardLayout(), *, workers: int = 1, progress: bool = True,
                         info: Mapping[str, Any] | None = None, layout_name: str = "instructions",
                         mode: str = "first", **options: Any) -> PrepResult:
    """Videos + instructions of a source layout under ``raw`` -> clip shards in ``out``."""
    issues: list[dict[str, str]] = []
    if layout_name == "instructions":
        videos, params = collect_instructions(raw, exclude=out)
    elif layout_name == "cosmos_instructions":
        videos, params = collect_cosmos(raw, exclude=out)
    elif layout_name == "bridge_instructions":
        videos, params = collect_bridge_texts(raw, **options)
    elif layout_name == "lerobot_instructions":
        videos, params = collect_lerobot_tasks(raw, **options)
    elif layout_name == "instruction_table":
        videos, issues, params = collect_table(raw, options["table"], exclude=out)
    else:
        raise PrepError(f"unknown instruction layout {layout_name!r}")
    return prepare(layout_name, per_instruction(videos, mode), out, spec, layout, workers=workers,
                   source_params={**params, "instructions": mode}, source_issues=issues, info=info, progress=progress)


def _run(layout_name: str, options=lambda a: {}):
    def run(args: Any, cfg: Any) -> PrepResult:
        spec, layout, common = clip_options(args, cfg)
        return prepare_instructions(Path(args.raw), Path(args.out), spec, layout, layout_name=layout_name,
                                    mode=args.instructions, **common, **options(args))

    return run


def _mode(p: Any) -> None:
    p.add_argument("--instructions", choices=["first", "each"], default="first",
                   help="first: one sample per clip, every instruction in its json (default; train with "
                   "data.caption_choice=random to draw one per step); each: one sample per instruction")


def _bridge(p: Any) -> None:
    _mode(p)
    p.add_argument("--split", default="train", help="annotation/<split>, or 'all' (default train)")
    p.add_argument("--camera", type=int, default=0, help="index into each JSON's videos list (default 0)")


def _lerobot(p: Any) -> None:
    _mode(p)
    p.add_argument("--camera", default=None, help="video key, e.g. observation.images.top (default: the first)")


def _table(p: Any) -> None:
    _mode(p)
    p.add_argument("--table", required=True, help="csv (columns video,instruction) or jsonl file")


_COMMON = dict(recipe="instruction")
for _source in (
    PrepSource(name="instructions", help="videos + a same-stem instruction JSON each -> clip shards",
               run=_run("instructions"), add_arguments=_mode, **_COMMON),
    PrepSource(name="cosmos_instructions", help="the Cosmos/NeMo layout videos/<id>.mp4 + instructions/<id>.json -> "
               "clip shards", run=_run("cosmos_instructions"), add_arguments=_mode, **_COMMON),
    PrepSource(name="bridge_instructions", help="IRASim/Bridge annotation JSON texts + videos -> instruction clip "
               "shards", add_arguments=_bridge, **_COMMON,
               run=_run("bridge_instructions", lambda a: {"split": None if a.split == "all" else a.split,
                                                         "camera": int(a.camera)})),
    PrepSource(name="lerobot_instructions", help="LeRobot v2.x episodes with their tasks (meta/tasks.jsonl) -> "
               "instruction clip shards", add_arguments=_lerobot, run=_run("lerobot_instructions",
                                                                          lambda a: {"camera": a.camera}), **_COMMON),
    PrepSource(name="instruction_table", help="videos + a csv/jsonl of video,instruction rows -> clip shards",
               add_arguments=_table, run=_run("instruction_table", lambda a: {"table": a.table}), **_COMMON),
):
    register_source(dataclasses.replace(_source, description=_source.help + ". See data_prep/instruction.py."))
