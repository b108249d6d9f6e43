"""Task signals: the numeric arrays a task reads next to each video, declared once, and their
statistics in one place and one format.

A :class:`Signal` says what a shard member is (``<key>.actions.npy``), how its rows line up with the
frames (``frames``: a row per frame; ``transitions``: a row per frame-to-frame step, T - 1 rows for T
frames; ``static``: one array for the whole video), the batch key the loaders put it under, and
whether the task normalises it by the data's statistics. Loaders cut every signal to the clip the
way its alignment says.

Statistics: whoever writes shards (the converters in ``data_prep/``, the procedural worlds) writes,
per signal, ``manifest.json`` ``extra.sidecars[<ext>] = {kind, shape, count, mean, std, min, max}``
(per dimension of the flattened row, population std, over every row written), with the mergeable
partial form (``m2`` instead of ``std``) while units are in flight. :func:`signal_stats` reads it
back for a shard set (the trainer's normalisation, the prep summary, the evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ALIGNMENTS = ("frames", "transitions", "static")


@dataclass(frozen=True)
class Signal:
    ext: str  # shard member extension, e.g. "actions.npy"
    align: str  # "frames" | "transitions" | "static"
    batch_key: str  # the loader batch's key, e.g. "actions"
    normalised: bool = False  # the task normalises it with the data's statistics (signal_stats)
    description: str = ""

    def __post_init__(self) -> None:
        if self.align not in ALIGNMENTS:
            raise ValueError(f"signal {self.ext!r}: align {self.align!r} is not one of {ALIGNMENTS}")
        if not self.ext.endswith(".npy") or "/" in self.ext or self.ext.startswith("."):
            raise ValueError(f"signal extension must look like '<name>.npy', got {self.ext!r}")


# ------------------------------------------------------------------ statistics (Chan et al. merging)
def rows_stats(rows: np.ndarray) -> dict[str, Any]:
    """Partial statistics of ``rows`` [N, ...] (per dimension of the flattened row)."""
    flat = rows.reshape(rows.shape[0], -1).astype(np.float64)
    mean = flat.mean(axis=0)
    return {"shape": list(rows.shape[1:]), "count": int(flat.shape[0]), "mean": mean,
            "m2": ((flat - mean) ** 2).sum(axis=0), "min": flat.min(axis=0), "max": flat.max(axis=0)}


def merge_stats(a: Optional[dict[str, Any]], b: dict[str, Any], ext: str) -> dict[str, Any]:
    """Combine two partial statistics (arrays or JSON lists) of the same signal."""
    if a is None or not a.get("count"):
        return {k: (np.asarray(v, dtype=np.float64) if k in ("mean", "m2", "min", "max") else v)
                for k, v in b.items()}
    if not b.get("count"):
        return a
    if list(a["shape"]) != list(b["shape"]):
        raise ValueError(f"sidecar {ext!r} has rows of shape {list(a['shape'])} and {list(b['shape'])} in the same "
                         "dataset; every video's rows must have one shape")
    na, nb = a["count"], b["count"]
    n = na + nb
    ma, mb = np.asarray(a["mean"], dtype=np.float64), np.asarray(b["mean"], dtype=np.float64)
    delta = mb - ma
    return {"shape": list(a["shape"]), "count": n, "mean": ma + delta * (nb / n),
            "m2": np.asarray(a["m2"], dtype=np.float64) + np.asarray(b["m2"], dtype=np.float64)
            + delta ** 2 * (na * nb / n),
            "min": np.minimum(a["min"], np.asarray(b["min"], dtype=np.float64)),
            "max": np.maximum(a["max"], np.asarray(b["max"], dtype=np.float64))}


def stats_json(kind: str, st: Optional[dict[str, Any]], final: bool) -> dict[str, Any]:
    """A signal's entry in a work unit's done record (``final=False``: mergeable, with M2) or in the
    manifest (``final=True``: count, mean, population std, min, max per dimension)."""
    out: dict[str, Any] = {"kind": kind}
    if st is None or not st.get("count"):
        return {**out, "count": 0} if kind != "static" else out
    out.update(shape=list(st["shape"]), count=int(st["count"]), mean=[float(x) for x in st["mean"]],
               min=[float(x) for x in st["min"]], max=[float(x) for x in st["max"]])
    if final:
        out["std"] = [float(x) for x in np.sqrt(np.maximum(np.asarray(st["m2"]) / st["count"], 0.0))]
    else:
        out["m2"] = [float(x) for x in st["m2"]]
    return out


def manifest_stats(arrays: dict[str, tuple[str, list[np.ndarray]]]) -> dict[str, Any]:
    """``extra.sidecars`` of a manifest from whole arrays: ``{ext: (kind, [rows per video])}``."""
    return {ext: stats_json(kind, rows_stats(np.concatenate([np.asarray(r) for r in parts])) if parts else None,
                            final=True)
            for ext, (kind, parts) in sorted(arrays.items())}


def signal_stats(path: str | os.PathLike, ext: str) -> Optional[dict[str, Any]]:
    """The statistics of signal ``ext`` in the shard set at ``path`` (a directory, a glob, or a shard:
    the manifest of its directory), or None when no manifest there records it."""
    from nemo_ext.data.shards import ShardError, expand_paths, read_manifest

    p = Path(path)
    if p.is_dir():
        dirs = [p]
    else:
        try:
            dirs = sorted({s.parent for s in expand_paths(path)})
        except ShardError:
            return None
    for d in dirs:
        try:
            manifest = read_manifest(d)
        except ShardError:
            continue
        entry = ((manifest.get("extra") or {}).get("sidecars") or {}).get(ext)
        if entry and entry.get("count"):
            return entry
    return None
