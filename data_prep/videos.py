"""Source format: a folder of videos plus captions -> clip shards.

Inputs: every ``.mp4 .mov .mkv .webm .avi`` under RAW (recursive), captioned by EITHER

* a captions file: ``.csv`` with a header naming the columns ``video`` and ``caption`` (other
  columns are ignored), or ``.jsonl`` with one ``{"video": ..., "caption": ...}`` object per line.
  ``video`` is the path relative to RAW (``clips/a.mp4``) or, when unique, the bare file name;
* or one caption for every video (``--caption "text"``).

Nothing is dropped silently: a video the captions file does not caption (or captions twice with
different texts, or with an empty text) is rejected with a report line, and so is a caption row
naming no video under RAW. A malformed captions file (bad JSON, missing column) is an error.
The clips themselves are made by :func:`data_prep.clips.prepare`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.clips import (ClipSpec, PrepError, PrepResult, ShardLayout, SourceVideo, clip_options, prepare,
                             raw_videos, source_video)
from nemo_ext.data.sources import PrepSource, register_source

logger = logging.getLogger(__name__)

__all__ = ["SOURCE", "CaptionRow", "read_captions", "match_captions", "collect_videos", "prepare_videos"]

SOURCE = "videos"


@dataclass(frozen=True)
class CaptionRow:
    """One row of a captions file; ``line`` is its 1-based line number, for report lines."""

    line: int
    video: str
    caption: str


def _read_csv(path: Path, text: str = "caption") -> list[CaptionRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = [c.strip().lower() for c in header or []]
        if "video" not in columns or text not in columns:
            raise PrepError(f"{text}s file {path}: the first line must be a header naming the columns "
                            f"'video' and '{text}', got {header!r}")
        iv, ic = columns.index("video"), columns.index(text)
        rows = []
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            if len(record) <= max(iv, ic):
                raise PrepError(f"{text}s file {path} line {reader.line_num}: expected {len(columns)} "
                                f"columns ({', '.join(columns)}), got {len(record)}: {record!r}")
            rows.append(CaptionRow(reader.line_num, record[iv].strip(), record[ic].strip()))
    return rows


def _read_jsonl(path: Path, text: str = "caption") -> list[CaptionRow]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepError(f"{text}s file {path} line {line_no}: not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise PrepError(f"{text}s file {path} line {line_no}: expected an object "
                                f'{{"video": ..., "{text}": ...}}, got {type(obj).__name__}')
            for k in ("video", text):
                if not isinstance(obj.get(k), str):
                    raise PrepError(f"{text}s file {path} line {line_no}: field {k!r} must be a string, "
                                    f"got {obj.get(k)!r}")
            rows.append(CaptionRow(line_no, obj["video"].strip(), obj[text].strip()))
    return rows


def read_captions(path: str | os.PathLike, text: str = "caption") -> list[CaptionRow]:
    """Rows of a ``.csv`` or ``.jsonl`` file of ``video`` and ``text`` (caption, or instruction for the
    instruction task's table source); raises :class:`PrepError` if malformed."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{text}s file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    raise PrepError(f"{text}s file {path}: expected a .csv (columns video, {text}) or a .jsonl "
                    f'({{"video": ..., "{text}": ...}} per line), got {suffix or "no extension"}')


def resolve_video_row(video: str, raw: Path, rels: set[str], by_name: Mapping[str, list[str]]) -> tuple[str | None, str]:
    """(relative path, "") of the video a row names, or (None, why not)."""
    value = video.strip()
    if not value:
        return None, "the video field is empty"
    if os.path.isabs(value):
        try:
            value = Path(value).resolve().relative_to(raw.resolve()).as_posix()
        except ValueError:
            return None, f"absolute path {video!r} is not under RAW {raw}"
    norm = posixpath.normpath(value)
    if norm in rels:
        return norm, ""
    if "/" not in norm:
        matches = by_name.get(norm, [])
        if len(matches) == 1:
            return matches[0], ""
        if len(matches) > 1:
            return None, (f"the file name {norm!r} is ambiguous ({', '.join(matches)}); give the path "
                          "relative to RAW")
    return None, "no such video under RAW"


def match_captions(raw: Path, rels: list[str], rows: list[CaptionRow],
                   captions_name: str) -> tuple[dict[str, str], dict[str, str], list[dict[str, str]]]:
    """Assign caption rows to videos.

    Returns ``(captions, rejects, issues)``: the caption of each captioned video, the reject reason
    of each video that cannot be captioned (none, empty, or conflicting rows), and report lines for
    rows that name no video.
    """
    rel_set = set(rels)
    by_name: dict[str, list[str]] = {}
    for rel in rels:
        by_name.setdefault(posixpath.basename(rel), []).append(rel)
    per_video: dict[str, list[CaptionRow]] = {}
    issues: list[dict[str, str]] = []
    for row in rows:
        rel, why = resolve_video_row(row.video, raw, rel_set, by_name)
        if rel is None:
            issues.append({"video": row.video, "reason": f"{captions_name} line {row.line}: {why}"})
        else:
            per_video.setdefault(rel, []).append(row)
    captions: dict[str, str] = {}
    rejects: dict[str, str] = {}
    for rel in rels:
        found = per_video.get(rel, [])
        texts = {r.caption for r in found}
        lines = ", ".join(str(r.line) for r in found)
        if not found:
            rejects[rel] = f"no caption: {captions_name} has no row for this video"
        elif len(texts) > 1:
            rejects[rel] = f"conflicting captions: {captions_name} lines {lines} give different texts"
        elif not next(iter(texts)):
            rejects[rel] = f"empty caption in {captions_name} line {lines}"
        else:
            captions[rel] = found[0].caption
    return captions, rejects, issues


def collect_videos(raw: str | os.PathLike, captions: str | os.PathLike | None = None,
                   caption: str | None = None, exclude: str | os.PathLike | None = None,
                   ) -> tuple[list[SourceVideo], list[dict[str, str]], dict[str, Any]]:
    """List RAW's videos with their captions: ``(videos, report lines for unmatched caption rows,
    source parameters)``. Raises :class:`PrepError` for a missing RAW, no videos, a bad captions
    file, or not exactly one of ``captions`` / ``caption``."""
    raw = Path(raw)
    if (captions is None) == (caption is None):
        raise PrepError("give exactly one of a captions file (--captions FILE) or one caption for all "
                        "videos (--caption TEXT)")
    if caption is not None and not caption.strip():
        raise PrepError("--caption is empty; give a caption text or a captions file")
    rels = raw_videos(raw, exclude=exclude)
    issues: list[dict[str, str]] = []
    if captions is not None:
        rows = read_captions(captions)
        texts, rejects, issues = match_captions(raw, rels, rows, Path(captions).name)
    else:
        texts, rejects = {rel: caption.strip() for rel in rels}, {}  # type: ignore[union-attr]
    videos = [source_video(raw, rel, texts.get(rel), reject=rejects.get(rel)) for rel in rels]
    params = {"raw": str(raw.resolve()),
              "captions": str(Path(captions).resolve()) if captions is not None else None,
              "caption": caption.strip() if caption is not None else None}
    return videos, issues, params


def prepare_videos(raw: str | os.PathLike, out: str | os.PathLike, spec: ClipSpec,
                   layout: ShardLayout = ShardLayout(), *, captions: str | os.PathLike | None = None,
                   caption: str | None = None, workers: int = 1, progress: bool = True,
                   info: Mapping[str, Any] | None = None) -> PrepResult:
    """Captioned videos under ``raw`` -> clip shards in ``out`` (see :func:`data_prep.clips.prepare`)."""
    videos, issues, params = collect_videos(raw, captions=captions, caption=caption, exclude=out)
    for issue in issues:
        logger.info("%s: %s", issue["video"], issue["reason"])
    return prepare(SOURCE, videos, out, spec, layout, workers=workers, source_params=params,
                   source_issues=issues, info=info, progress=progress)


def _run(args: Any, cfg: Any) -> PrepResult:
    if (args.captions is None) == (args.caption is None):
        raise PrepError("videos needs exactly one of --captions FILE (csv/jsonl with video,caption) or --caption TEXT "
                        "(one caption for all videos)")
    spec, layout, common = clip_options(args, cfg)
    return prepare_videos(Path(args.raw), Path(args.out), spec, layout, captions=args.captions, caption=args.caption,
                          **common)


def _options(p: Any) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--captions", default=None, help="csv (columns video,caption) or jsonl captions file")
    group.add_argument("--caption", default=None, help="one caption for every video")


register_source(PrepSource(name="videos", help="a folder of videos + captions -> clip shards", run=_run,
                           add_arguments=_options))
