"""Source formats of the action_control task: robot episodes -> clip shards with action sidecars.

Every format lists episodes (one video + per-step numbers + maybe an instruction); the clips are
made by :func:`data_prep.clips.prepare` (the same validated path as ``prep videos``: one full
decode per video, H.264/VP9 re-encode, 1+8k-frame clips, DALI index files, resumable units).

**The convention (DESIGN.md section 0).** An episode of T frames has T - 1 actions, one per
transition: ``actions[t]`` takes frame t to frame t + 1. Every clip stores

* ``<key>.actions.npy``: float32 ``[n - 1, action_dim]`` for a clip of n frames (sidecar kind
  ``"transitions"``): the actions between the clip's frames;
* ``<key>.states.npy``: float32 ``[n, state_dim]`` (kind ``"frames"``), when the format has states;
* ``<key>.json``: the usual clip fields plus ``episode``, ``action_dim``, ``state_dim`` and, when
  the dataset has instructions, ``caption`` = the first and ``instructions`` = all of them.

An episode whose action count is not frames - 1 (after the format's own convention, below; checked
against the metadata up front and against the decoded video frame count) is rejected with a report
line naming the episode and both counts; so is one with NaN/inf, ragged or non-numeric rows, a
missing or corrupt video. Episodes of one dataset must share one ``action_dim`` (and
``state_dim``): the first episode that differs is an error (:class:`~data_prep.clips.PrepError`)
naming it. Clips keep the source frame rate (actions are per recorded transition; a clip
resampled in time would need invented actions), so these sources take no ``fps``.

**Normalisation statistics.** Per-dimension ``count``, ``mean``, ``std`` (population), ``min``,
``max`` over every action row written to the shards (the transitions the trainer can see), and the
same for states, are merged from the work units into ``manifest.json`` (``extra.sidecars
["actions.npy"]`` / ``["states.npy"]``, the one place and format of signal statistics:
:mod:`nemo_ext.data.signals`; ``extra.info.action_control`` has ``action_dim``, ``state_dim`` and
the action semantics). :func:`read_action_stats` gathers them, :func:`check_action_dim` checks them.

Formats (``SOURCES``):

``bridge`` -- the IRASim release of Bridge (``bridge_train_data.tar.gz``, used by the Cosmos-1
NeMo, cosmos-predict1/2/2.5 action-conditioned recipes): RAW holds ``annotation/<split>/<id>.json``
and the videos at the JSON's ``videos[<camera>].video_path`` relative to RAW
(``videos/<split>/<id>/rgb.mp4``). Per JSON: ``state`` ``[T, 6]`` end-effector pose
``[x, y, z, roll, pitch, yaw]`` per frame, ``continuous_gripper_state`` ``[T]`` (0 open .. 1
closed), ``action`` ``[T - 1, 7]``: per transition, the end-effector displacement
``[dx, dy, dz, droll, dpitch, dyaw]`` in the gripper frame plus a binary gripper command
(the gripper is the 7th column, not a separate key); ``texts`` (instructions, optional),
``episode_id``. ``actions="json"`` (default) stores ``action`` as it is. ``actions="states"``
recomputes the 7-d actions from the states the way IRASim ``Dataset_3D._get_actions`` (and
cosmos-predict1, which multiplies the first six by 20) do: ``R_t^T (p_{t+1} - p_t)``, the ZYX
Euler angles of ``R_t^T R_{t+1}`` (``R = Rz(yaw) Ry(pitch) Rx(roll)``) and
``continuous_gripper_state[t + 1]``; no scaling (normalise with the statistics instead). States
stored: ``state`` with ``continuous_gripper_state`` as one more column (``[T, 7]``).

``lerobot`` -- LeRobot v2.0/v2.1 datasets (``codebase_version`` v2.x): ``meta/info.json`` (``fps``,
``chunks_size``, ``features`` with shapes and ``dtype: video`` camera keys, ``data_path`` /
``video_path`` templates with ``{episode_chunk}`` = episode_index // chunks_size,
``{episode_index}``, ``{video_key}``), ``data/chunk-XXX/episode_XXXXXX.parquet`` (columns
``action``, ``observation.state``, ``frame_index``, ``task_index``, ...),
``videos/chunk-XXX/<camera key>/episode_XXXXXX.mp4``, optional ``meta/episodes.jsonl``
(``episode_index``, ``tasks``, ``length``) and ``meta/tasks.jsonl`` (``task_index``, ``task``).
LeRobot stores one action per frame (``action[t]`` is the command sent at frame t, which moves
the robot towards frame t + 1); the last frame's action leads to no recorded frame, so it is
dropped: ``actions = action[:T - 1]``. States are ``observation.state`` (all T rows). The camera is
an option (default: the first video key in ``features``). v3.0 datasets (many episodes per file)
are refused with a clear error. Needs pyarrow (present with nemo_toolkit's ``datasets``).

``episodes`` -- a folder (recursive) of ``<name>.mp4`` (any of .mp4 .mov .mkv .webm .avi) with
``<name>.npy`` = actions ``[T - 1, action_dim]`` already in our convention, optional
``<name>.state.npy`` ``[T, state_dim]`` and ``<name>.txt`` (one instruction per non-empty line;
the first is the caption). When some episodes have states, one without is rejected.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.clips import (VIDEO_EXTENSIONS, ClipSpec, PrepError, PrepResult, ShardLayout, Sidecar, SourceVideo,
                             clip_options, prepare, raw_videos, source_video)
from nemo_ext.data.sources import PrepSource, register_source
from nemo_ext.data.shards import MANIFEST_NAME, ShardError, read_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "ACTIONS_EXT",
    "STATES_EXT",
    "SIDECARS",
    "EpisodeError",
    "read_bridge_episode",
    "read_lerobot_info",
    "read_lerobot_episode",
    "read_generic_episode",
    "bridge_actions_from_states",
    "collect_bridge",
    "collect_lerobot",
    "collect_episodes",
    "prepare_actions",
    "read_action_stats",
    "check_action_dim",
]

SOURCES: tuple[str, ...] = ("bridge", "lerobot", "episodes")
ACTIONS_EXT = "actions.npy"
STATES_EXT = "states.npy"
# What the action_control task plugin reads: TaskSpec.sidecars (states only when the data has them).
SIDECARS: dict[str, str] = {ACTIONS_EXT: "transitions", STATES_EXT: "frames"}
BRIDGE_ACTION_MODES = ("json", "states")
CONVENTION = ("actions[t] takes frame t to frame t+1: T-1 action rows for T frames (sidecar kind 'transitions'); "
              "states: one row per frame (kind 'frames')")
_SEMANTICS = {
    ("bridge", "json"): "Bridge/IRASim 'action' as stored: [dx, dy, dz, droll, dpitch, dyaw] of the end effector "
                        "in the gripper frame, then the binary gripper command",
    ("bridge", "states"): "recomputed from 'state' as IRASim Dataset_3D._get_actions: R_t^T (p_t+1 - p_t), ZYX Euler "
                          "angles of R_t^T R_t+1, continuous_gripper_state[t+1] (unscaled)",
    ("lerobot", None): "the LeRobot action column, one per frame; the last frame's action is dropped",
    ("episodes", None): "<name>.npy as given (already one row per transition)",
}
_LEROBOT_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
_LEROBOT_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


class EpisodeError(ValueError):
    """An episode that cannot be used; the message is its report reason (it names the episode)."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _matrix(value: Any, what: str, rows_name: str = "rows") -> np.ndarray:
    """A 2-D float64 array from JSON/parquet/npy data ([T] becomes [T, 1]); EpisodeError if ragged,
    non-numeric or empty."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise EpisodeError(f"{what}: not a numeric array with one row per {rows_name} ({e})") from e
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise EpisodeError(f"{what}: expected a [{rows_name}, dim] array, got shape {list(arr.shape)}")
    if arr.shape[1] == 0:
        raise EpisodeError(f"{what}: rows have no values (shape {list(arr.shape)})")
    return arr


def _texts(obj: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """Non-empty, de-duplicated strings under the first of ``keys`` holding any (str or list)."""
    for key in keys:
        value = obj.get(key)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        out: list[str] = []
        for item in items:
            if isinstance(item, str) and item.strip() and item.strip() not in out:
                out.append(item.strip())
        if out:
            return out
    return []


def _digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha1()
    for arr in arrays:
        if arr is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _rel_video(raw: Path, value: Any, what: str) -> str:
    """A video path from the metadata as a normalized path relative to RAW."""
    if not isinstance(value, str) or not value.strip():
        raise EpisodeError(f"{what}: no video path")
    path = value.strip()
    if os.path.isabs(path):
        try:
            path = Path(path).resolve().relative_to(raw.resolve()).as_posix()
        except ValueError as e:
            raise EpisodeError(f"{what}: the video path {value!r} is not under RAW {raw}") from e
    rel = posixpath.normpath(path.replace("\\", "/"))
    if rel.startswith("../") or rel == "..":
        raise EpisodeError(f"{what}: the video path {value!r} leaves RAW")
    if not (raw / rel).is_file():
        raise EpisodeError(f"{what}: the video {rel} does not exist")
    return rel


@dataclass
class _Episode:
    """One listed episode, before it becomes a SourceVideo."""

    name: str
    ref: str  # the file that names the episode in report lines when its video is unknown
    rel: str | None = None  # the video relative to RAW (None: unknown, the episode is rejected)
    reject: str | None = None
    actions: np.ndarray | None = None  # float32 [T-1, A], already in our convention
    states: np.ndarray | None = None  # float32 [T, S]
    load: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None  # (actions, states) again, in a worker
    actions_what: str = ""
    states_what: str = ""
    instructions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _part(load: Callable[[], tuple[np.ndarray, np.ndarray | None]], index: int) -> np.ndarray:
    """Worker-side loader of one sidecar (0 actions, 1 states): module-level, so it pickles."""
    arr = load()[index]
    if arr is None:
        raise ValueError("the episode has no such array any more")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _to_videos(raw: Path, episodes: list[_Episode], source: str) -> tuple[list[SourceVideo], dict[str, Any]]:
    """SourceVideos with actions/states sidecars, and the dataset's dims (checked consistent)."""
    dims: dict[str, tuple[int, str]] = {}  # "actions"/"states" -> (dim, first episode)
    for ep in episodes:
        for kind, arr, what in (("actions", ep.actions, ep.actions_what), ("states", ep.states, ep.states_what)):
            if arr is None or ep.reject:
                continue
            first = dims.setdefault(kind, (arr.shape[1], ep.name))
            if arr.shape[1] != first[0]:
                key = "action_dim" if kind == "actions" else "state_dim"
                raise PrepError(f"inconsistent {key}: episode {ep.name} ({what}) has {arr.shape[1]}-d {kind}, "
                                f"episode {first[1]} (the first) has {first[0]}-d; every episode of one dataset "
                                f"needs the same {key}")
    has_states = "states" in dims
    action_dim = dims["actions"][0] if "actions" in dims else None
    state_dim = dims["states"][0] if has_states else None
    videos: list[SourceVideo] = []
    owner: dict[str, str] = {}  # video rel -> the accepted episode that uses it
    used: set[str] = set()  # every rel given to prepare (it needs them unique)
    for ep in episodes:
        reject = ep.reject
        for arr, what in ((ep.actions, ep.actions_what), (ep.states, ep.states_what)):
            if reject is None and arr is not None and not np.isfinite(arr).all():
                row = int(np.argwhere(~np.isfinite(arr))[0][0])
                reject = f"episode {ep.name}: {what} holds NaN/inf (first in row {row})"
        if reject is None and ep.rel in owner:
            reject = f"episode {ep.name}: its video {ep.rel} is also the video of episode {owner[ep.rel]}"
        if reject is None and has_states and ep.states is None:
            reject = (f"episode {ep.name}: no states ({ep.states_what}), but other episodes of the dataset have "
                      f"{state_dim}-d states (e.g. {dims['states'][1]})")
        if reject is None and (ep.load is None or ep.actions is None or ep.rel is None):
            reject = f"episode {ep.name}: no actions"
        if reject is not None:
            rel = ep.ref  # the annotation/data file (or the video itself for the episodes source)
            while rel in used:
                rel += "#"
            used.add(rel)
            videos.append(source_video(raw, rel, None, meta={"episode": ep.name}, reject=reject))
            continue
        assert ep.rel is not None and ep.actions is not None and ep.load is not None
        rel = ep.rel
        owner[rel] = ep.name
        used.add(rel)
        digest = _digest(ep.actions, ep.states if has_states else None)
        sidecars = [Sidecar(ACTIONS_EXT, "transitions", functools.partial(_part, ep.load, 0), digest,
                            what=f"episode {ep.name}: actions ({ep.actions_what})")]
        if has_states:
            sidecars.append(Sidecar(STATES_EXT, "frames", functools.partial(_part, ep.load, 1), digest,
                                    what=f"episode {ep.name}: states ({ep.states_what})"))
        meta = {"episode": ep.name, "dataset": source, "action_dim": action_dim, "state_dim": state_dim, **ep.meta}
        if ep.instructions:
            meta["instructions"] = list(ep.instructions)
        videos.append(source_video(raw, rel, ep.instructions[0] if ep.instructions else None, meta=meta,
                                   sidecars=sidecars))
    return videos, {"action_dim": action_dim, "state_dim": state_dim}


# --------------------------------------------------------------------------------------------
# Bridge (IRASim layout)
# --------------------------------------------------------------------------------------------


def _rotations(rpy: np.ndarray) -> np.ndarray:
    """[T, 3, 3] rotation matrices R = Rz(yaw) Ry(pitch) Rx(roll) of [T, 3] (roll, pitch, yaw)."""
    r, p, y = rpy[:, 0], rpy[:, 1], rpy[:, 2]
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.stack([
        np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], axis=-1),
        np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], axis=-1),
        np.stack([-sp, cp * sr, cp * cr], axis=-1),
    ], axis=-2)


def _euler_zyx(rot: np.ndarray) -> np.ndarray:
    """(roll, pitch, yaw) in (-pi, pi] of [T, 3, 3] rotations R = Rz Ry Rx (the gimbal-lock branch
    sets yaw to 0, as IRASim's rotm2euler does)."""
    sy = np.hypot(rot[:, 0, 0], rot[:, 1, 0])
    regular = sy >= 1e-6
    roll = np.where(regular, np.arctan2(rot[:, 2, 1], rot[:, 2, 2]), np.arctan2(-rot[:, 1, 2], rot[:, 1, 1]))
    pitch = np.arctan2(-rot[:, 2, 0], sy)
    yaw = np.where(regular, np.arctan2(rot[:, 1, 0], rot[:, 0, 0]), 0.0)
    out = np.stack([roll, pitch, yaw], axis=-1)
    return np.where(out <= -np.pi, out + 2 * np.pi, out)


def bridge_actions_from_states(state: np.ndarray, gripper: np.ndarray) -> np.ndarray:
    """7-d actions ``[T - 1, 7]`` from end-effector poses ``[T, >=6]`` (x, y, z, roll, pitch, yaw)
    and gripper states ``[T]``: the motion from frame t to t + 1 in the end-effector frame of t
    (translation and ZYX Euler angles) and the gripper state at t + 1 (IRASim's relative actions)."""
    state = np.asarray(state, dtype=np.float64)
    gripper = np.asarray(gripper, dtype=np.float64).reshape(-1)
    rot = _rotations(state[:, 3:6])
    prev_t = np.transpose(rot[:-1], (0, 2, 1))
    rel_xyz = np.einsum("tij,tj->ti", prev_t, state[1:, 0:3] - state[:-1, 0:3])
    rel_rpy = _euler_zyx(prev_t @ rot[1:])
    return np.concatenate([rel_xyz, rel_rpy, gripper[1:, None]], axis=1)


def read_bridge_episode(path: str | os.PathLike, actions: str = "json",
                        name: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(actions [T-1, A], states [T, S] or None, the parsed JSON) of one IRASim/Bridge annotation.

    Raises :class:`EpisodeError` (the report reason) for an unreadable file, missing or malformed
    keys, or counts that break the convention: ``action`` rows != ``state`` rows - 1, or a
    ``continuous_gripper_state`` that is not one value per ``state`` row.
    """
    path = Path(path)
    label = f"episode {name or path.stem}"
    try:
        ann = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise EpisodeError(f"{label}: cannot read {path.name}: {e}") from e
    except json.JSONDecodeError as e:
        raise EpisodeError(f"{label}: {path.name} is not valid JSON: {e}") from e
    if not isinstance(ann, dict):
        raise EpisodeError(f"{label}: {path.name} is not a JSON object")
    state = _matrix(ann["state"], f"{label}: 'state' of {path.name}", "frame") if "state" in ann else None
    gripper = None
    if "continuous_gripper_state" in ann:
        gripper = _matrix(ann["continuous_gripper_state"], f"{label}: 'continuous_gripper_state' of {path.name}",
                          "frame")
        if gripper.shape[1] != 1:
            raise EpisodeError(f"{label}: 'continuous_gripper_state' of {path.name} has {gripper.shape[1]} values per "
                               "frame; expected one")
        if state is not None and len(gripper) != len(state):
            raise EpisodeError(f"count mismatch: {label}: 'continuous_gripper_state' has {len(gripper)} rows and "
                               f"'state' {len(state)} in {path.name}; expected one per frame")
    if actions == "json":
        if "action" not in ann:
            raise EpisodeError(f"{label}: {path.name} has no 'action' key")
        act = _matrix(ann["action"], f"{label}: 'action' of {path.name}", "transition")
        if state is not None and len(act) != len(state) - 1:
            raise EpisodeError(f"count mismatch: {label}: 'action' has {len(act)} rows and 'state' {len(state)} "
                               f"(frames) in {path.name}; expected {len(state) - 1} actions (frames - 1)")
    elif actions == "states":
        if state is None or gripper is None:
            raise EpisodeError(f"{label}: actions='states' needs 'state' and 'continuous_gripper_state' in {path.name}")
        if state.shape[1] < 6:
            raise EpisodeError(f"{label}: 'state' of {path.name} has {state.shape[1]} values per frame; actions='states' "
                               "needs [x, y, z, roll, pitch, yaw]")
        if len(state) < 2:
            raise EpisodeError(f"{label}: 'state' of {path.name} has {len(state)} rows; need >= 2 frames")
        act = bridge_actions_from_states(state, gripper)
    else:
        raise PrepError(f"bridge actions must be one of {BRIDGE_ACTION_MODES}, got {actions!r}")
    states = None
    if state is not None:
        states = np.concatenate([state, gripper], axis=1) if gripper is not None else state
    return act.astype(np.float32), (states.astype(np.float32) if states is not None else None), ann


def _bridge_arrays(path: str, actions: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    act, states, _ = read_bridge_episode(path, actions, name)
    return act, states


def _bridge_splits(raw: Path, split: str | Sequence[str] | None) -> tuple[Path, list[str]]:
    root = next((raw / d for d in ("annotation", "annotations") if (raw / d).is_dir()), None)
    if root is None:
        raise PrepError(f"RAW {raw} has no annotation/ folder (the IRASim Bridge layout: annotation/<split>/<id>.json "
                        "+ videos/<split>/<id>/rgb.mp4)")
    available = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if split is None or split == "all":
        return root, available or [""]
    wanted = [split] if isinstance(split, str) else list(split)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise PrepError(f"{root} has no split {', '.join(missing)} (available: {', '.join(available) or 'none'})")
    return root, wanted


def collect_bridge(raw: str | os.PathLike, split: str | Sequence[str] | None = "train", camera: int = 0,
                   actions: str = "json") -> tuple[list[SourceVideo], dict[str, Any], dict[str, Any]]:
    """IRASim/Bridge episodes of ``split`` (a name, a list, or None/"all" for every split) as
    (videos, source parameters, dataset info). ``camera`` indexes each JSON's ``videos`` list."""
    raw = Path(raw)
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    if actions not in BRIDGE_ACTION_MODES:
        raise PrepError(f"bridge actions must be one of {', '.join(BRIDGE_ACTION_MODES)}, got {actions!r}")
    if camera < 0:
        raise PrepError(f"camera must be >= 0, got {camera}")
    root, splits = _bridge_splits(raw, split)
    episodes: list[_Episode] = []
    for sp in splits:
        files = sorted((root / sp).glob("*.json"), key=lambda p: (len(p.stem), p.stem) if p.stem.isdigit() else
                       (math.inf, p.stem))
        for path in files:
            name = f"{sp}/{path.stem}" if sp else path.stem
            ann_rel = path.relative_to(raw).as_posix()
            ep = _Episode(name=name, ref=ann_rel, actions_what=f"{"'action'" if actions == 'json' else "from 'state'"} of "
                          f"{ann_rel}", states_what=f"'state' + 'continuous_gripper_state' of {ann_rel}")
            try:
                act, states, ann = read_bridge_episode(path, actions, name)
                vids = ann.get("videos")
                if not isinstance(vids, list) or not vids:
                    raise EpisodeError(f"episode {name}: {ann_rel} has no 'videos' list")
                if camera >= len(vids) or not isinstance(vids[camera], dict):
                    raise EpisodeError(f"episode {name}: {ann_rel} lists {len(vids)} videos; camera {camera} is not one")
                ep.rel = _rel_video(raw, vids[camera].get("video_path"), f"episode {name} ({ann_rel} videos[{camera}])")
            except EpisodeError as e:
                ep.reject = str(e)
                episodes.append(ep)
                continue
            ep.actions, ep.states = act, states
            ep.load = functools.partial(_bridge_arrays, str(path.resolve()), actions, name)
            ep.instructions = _texts(ann, ("texts", "language_instruction", "instruction", "task"))
            ep.meta = {"split": sp, "annotation": ann_rel, "camera": camera,
                       **({"episode_id": ann["episode_id"]} if isinstance(ann.get("episode_id"), (str, int)) else {})}
            episodes.append(ep)
    if not episodes:
        raise PrepError(f"{root} holds no annotation JSON files in {', '.join(splits)}")
    videos, dims = _to_videos(raw, episodes, "bridge")
    params = {"raw": str(raw.resolve()), "split": splits, "camera": camera, "actions": actions}
    return videos, params, {**dims, "action_semantics": _SEMANTICS[("bridge", actions)]}


# --------------------------------------------------------------------------------------------
# LeRobot v2.x
# --------------------------------------------------------------------------------------------


def _import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415  (only the lerobot source needs it)
    except ImportError as e:  # pragma: no cover - pyarrow comes with nemo_toolkit's datasets
        raise PrepError("the lerobot source reads parquet files and needs pyarrow: pip install pyarrow") from e
    return pq


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepError(f"{path} line {n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise PrepError(f"{path} line {n}: expected a JSON object")
        rows.append(obj)
    return rows


def read_lerobot_info(raw: str | os.PathLike, camera: str | None = None, action_key: str = "action",
                      state_key: str | None = "observation.state") -> dict[str, Any]:
    """The parts of ``meta/info.json`` (+ episodes/tasks jsonl) the converter uses, validated.

    Returns ``fps``, ``chunks_size``, ``data_path``, ``video_path``, ``camera`` (the chosen video
    key), ``video_keys``, ``action_key``, ``state_key`` (None when the dataset has none),
    ``episodes`` (list of dicts with ``episode_index`` and maybe ``tasks``/``length``) and
    ``tasks`` (task_index -> text). Raises :class:`PrepError` for what makes the dataset unusable.
    """
    raw = Path(raw)
    info_path = raw / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PrepError(f"RAW {raw} has no meta/info.json (the LeRobot v2 layout: meta/info.json, "
                        "data/chunk-XXX/episode_XXXXXX.parquet, videos/chunk-XXX/<camera>/episode_XXXXXX.mp4)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise PrepError(f"cannot read {info_path}: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise PrepError(f"{info_path} has no 'features' object")
    version = str(info.get("codebase_version", ""))
    if version and not version.startswith("v2"):
        raise PrepError(f"{info_path}: codebase_version {version}; this converter reads LeRobot v2.0/v2.1 (one parquet and "
                        "one mp4 per episode). Convert the dataset to v2.1 with LeRobot's tools, or use the "
                        "'episodes' source")
    features = info["features"]
    video_keys = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") == "video"]
    if not video_keys:
        raise PrepError(f"{info_path}: no feature has dtype 'video' (image datasets that keep frames in the parquet "
                        "files are not supported)")
    chosen = camera if camera is not None else video_keys[0]
    if chosen not in video_keys:
        raise PrepError(f"camera {chosen!r} is not a video key of {info_path}; choose one of: {', '.join(video_keys)}")
    if action_key not in features:
        raise PrepError(f"{info_path} has no feature {action_key!r} (features: {', '.join(features)})")
    if state_key is not None and state_key not in features:
        logger.info("%s has no %r feature: no states are written", info_path, state_key)
        state_key = None
    fps = info.get("fps")
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise PrepError(f"{info_path}: 'fps' must be a positive number, got {fps!r}")
    chunks_size = info.get("chunks_size", 1000)
    if not isinstance(chunks_size, int) or chunks_size < 1:
        raise PrepError(f"{info_path}: 'chunks_size' must be a positive integer, got {chunks_size!r}")
    episodes_path = raw / "meta" / "episodes.jsonl"
    if episodes_path.is_file():
        episodes = _read_jsonl(episodes_path)
        for n, ep in enumerate(episodes, start=1):
            if not isinstance(ep.get("episode_index"), int):
                raise PrepError(f"{episodes_path} line {n}: no integer 'episode_index'")
    else:
        total = info.get("total_episodes")
        if not isinstance(total, int) or total < 0:
            raise PrepError(f"RAW {raw} has no meta/episodes.jsonl and {info_path} no 'total_episodes'")
        episodes = [{"episode_index": i} for i in range(total)]
    tasks: dict[int, str] = {}
    tasks_path = raw / "meta" / "tasks.jsonl"
    if tasks_path.is_file():
        for row in _read_jsonl(tasks_path):
            if isinstance(row.get("task_index"), int) and isinstance(row.get("task"), str):
                tasks[row["task_index"]] = row["task"]
    return {"fps": float(fps), "chunks_size": chunks_size, "version": version or None,
            "data_path": info.get("data_path") or _LEROBOT_DATA_PATH,
            "video_path": info.get("video_path") or _LEROBOT_VIDEO_PATH, "camera": chosen, "video_keys": video_keys,
            "action_key": action_key, "state_key": state_key, "episodes": episodes, "tasks": tasks}


def _column(table: Any, name: str, what: str) -> np.ndarray:
    if name not in table.column_names:
        raise EpisodeError(f"{what}: the parquet file has no column {name!r}")
    return _matrix(table.column(name).to_pylist(), f"{what}: column {name!r}", "frame")


def read_lerobot_episode(parquet: str | os.PathLike, action_key: str = "action", state_key: str | None = None,
                         name: str | None = None, length: int | None = None,
                         ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """(actions [T-1, A], states [T, S] or None, task indices) of one LeRobot v2 episode parquet.

    LeRobot stores one action per frame; the last one (after the last frame) is dropped. Raises
    :class:`EpisodeError` for a missing/unreadable file, missing columns, ``frame_index`` that is
    not 0..T-1, fewer than 2 frames, or a row count that differs from ``length``
    (meta/episodes.jsonl).
    """
    pq = _import_pyarrow()
    parquet = Path(parquet)
    label = f"episode {name or parquet.stem}"
    if not parquet.is_file():
        raise EpisodeError(f"{label}: no data file {parquet.name}")
    wanted = [action_key] + ([state_key] if state_key else []) + ["frame_index", "task_index"]
    try:
        present = set(pq.read_schema(parquet).names)
        table = pq.read_table(parquet, columns=[c for c in wanted if c in present])
    except Exception as e:  # pyarrow raises several error types for damaged files
        raise EpisodeError(f"{label}: cannot read {parquet.name}: {type(e).__name__}: {e}") from e
    rows = table.num_rows
    if length is not None and length != rows:
        raise EpisodeError(f"count mismatch: {label}: meta/episodes.jsonl gives length {length}, {parquet.name} has "
                           f"{rows} frames")
    if rows < 2:
        raise EpisodeError(f"{label}: {parquet.name} has {rows} frames; need >= 2 (one transition)")
    if "frame_index" in table.column_names:
        idx = np.asarray(table.column("frame_index").to_pylist())
        if idx.shape != (rows,) or not np.array_equal(idx, np.arange(rows)):
            raise EpisodeError(f"{label}: frame_index of {parquet.name} is not 0..{rows - 1} in order")
    action = _column(table, action_key, label)
    states = _column(table, state_key, label) if state_key else None
    task_ids: list[int] = []
    if "task_index" in table.column_names:
        for t in table.column("task_index").to_pylist():
            if isinstance(t, int) and t not in task_ids:
                task_ids.append(t)
    return (action[:-1].astype(np.float32), states.astype(np.float32) if states is not None else None, task_ids)


def _lerobot_arrays(parquet: str, action_key: str, state_key: str | None, name: str,
                    length: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    act, states, _ = read_lerobot_episode(parquet, action_key, state_key, name, length)
    return act, states


def collect_lerobot(raw: str | os.PathLike, camera: str | None = None, action_key: str = "action",
                    state_key: str | None = "observation.state",
                    ) -> tuple[list[SourceVideo], dict[str, Any], dict[str, Any]]:
    """LeRobot v2.x episodes (one camera) as (videos, source parameters, dataset info)."""
    raw = Path(raw)
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    meta = read_lerobot_info(raw, camera, action_key, state_key)
    _import_pyarrow()
    episodes: list[_Episode] = []
    for row in sorted(meta["episodes"], key=lambda r: r["episode_index"]):
        index = row["episode_index"]
        name = f"episode_{index:06d}"
        fmt = {"episode_chunk": index // meta["chunks_size"], "episode_index": index, "video_key": meta["camera"]}
        try:
            data_rel = meta["data_path"].format(**fmt)
            video_rel = meta["video_path"].format(**fmt)
        except (KeyError, IndexError, ValueError) as e:
            raise PrepError(f"meta/info.json: cannot fill the data_path/video_path templates ({e})") from e
        ep = _Episode(name=name, ref=data_rel, actions_what=f"'{meta['action_key']}' of {data_rel}, the last frame's dropped",
                      states_what=f"'{meta['state_key']}' of {data_rel}")
        length = row.get("length") if isinstance(row.get("length"), int) else None
        try:
            act, states, task_ids = read_lerobot_episode(raw / data_rel, meta["action_key"], meta["state_key"], name,
                                                         length)
            ep.rel = _rel_video(raw, video_rel, f"episode {name} ({meta['camera']})")
        except EpisodeError as e:
            ep.reject = str(e)
            episodes.append(ep)
            continue
        ep.actions, ep.states = act, states
        ep.load = functools.partial(_lerobot_arrays, str((raw / data_rel).resolve()), meta["action_key"],
                                    meta["state_key"], name, length)
        texts = _texts(row, ("tasks",)) or _texts({"t": [meta["tasks"].get(t) for t in task_ids]}, ("t",))
        ep.instructions = texts
        ep.meta = {"episode_index": index, "camera": meta["camera"], "data_file": data_rel}
        episodes.append(ep)
    if not episodes:
        raise PrepError(f"RAW {raw}: meta lists no episodes")
    videos, dims = _to_videos(raw, episodes, "lerobot")
    params = {"raw": str(raw.resolve()), "camera": meta["camera"], "action_key": meta["action_key"],
              "state_key": meta["state_key"]}
    info = {**dims, "action_semantics": _SEMANTICS[("lerobot", None)], "lerobot_version": meta["version"],
            "lerobot_fps": meta["fps"], "video_keys": meta["video_keys"]}
    return videos, params, info


# --------------------------------------------------------------------------------------------
# Generic: <name>.mp4 + <name>.npy (+ <name>.state.npy, <name>.txt)
# --------------------------------------------------------------------------------------------


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise EpisodeError(f"{what}: no file {path.name}") from e
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{what}: {path.name} is not a readable .npy array ({e})") from e


def read_generic_episode(video: str | os.PathLike, name: str | None = None,
                         ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(actions [T-1, A], states [T, S] or None, instructions) of ``<name>.<video ext>``'s siblings."""
    video = Path(video)
    base = video.with_suffix("")
    label = f"episode {name or base.name}"
    npy = base.with_name(base.name + ".npy")
    if not npy.is_file():
        raise EpisodeError(f"{label}: no actions file {npy.name} next to the video")
    raw_actions = _load_npy(npy, label)
    if raw_actions.ndim != 2:
        raise EpisodeError(f"{label}: {npy.name} has shape {list(raw_actions.shape)}; expected [T-1, action_dim]")
    actions = _matrix(raw_actions, f"{label}: {npy.name}", "transition")
    states = None
    state_path = base.with_name(base.name + ".state.npy")
    if state_path.is_file():
        raw_states = _load_npy(state_path, label)
        if raw_states.ndim != 2:
            raise EpisodeError(f"{label}: {state_path.name} has shape {list(raw_states.shape)}; expected [T, state_dim]")
        states = _matrix(raw_states, f"{label}: {state_path.name}", "frame")
        if len(actions) != len(states) - 1:
            raise EpisodeError(f"count mismatch: {label}: {npy.name} has {len(actions)} actions and {state_path.name} "
                               f"{len(states)} states (frames); expected {len(states) - 1} actions (frames - 1)")
    instructions: list[str] = []
    txt = base.with_name(base.name + ".txt")
    if txt.is_file():
        try:
            lines = txt.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise EpisodeError(f"{label}: cannot read {txt.name}: {e}") from e
        instructions = _texts({"t": lines}, ("t",))
    return actions.astype(np.float32), (states.astype(np.float32) if states is not None else None), instructions


def _generic_arrays(video: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    act, states, _ = read_generic_episode(video, name)
    return act, states


def collect_episodes(raw: str | os.PathLike, exclude: str | os.PathLike | None = None,
                     ) -> tuple[list[SourceVideo], dict[str, Any], dict[str, Any]]:
    """Videos under RAW (recursive) with their ``.npy`` actions as (videos, parameters, info)."""
    raw = Path(raw)
    rels = raw_videos(raw, exclude=exclude)
    episodes: list[_Episode] = []
    for rel in rels:
        name = posixpath.splitext(rel)[0]
        stem = posixpath.basename(name)
        ep = _Episode(name=name, ref=rel, rel=rel, actions_what=f"{stem}.npy", states_what=f"{stem}.state.npy")
        try:
            act, states, instructions = read_generic_episode(raw / rel, name)
        except EpisodeError as e:
            ep.reject = str(e)
            episodes.append(ep)
            continue
        ep.actions, ep.states, ep.instructions = act, states, instructions
        ep.load = functools.partial(_generic_arrays, str((raw / rel).resolve()), name)
        episodes.append(ep)
    videos, dims = _to_videos(raw, episodes, "episodes")
    return videos, {"raw": str(raw.resolve())}, {**dims, "action_semantics": _SEMANTICS[("episodes", None)]}


# --------------------------------------------------------------------------------------------
# The run and the statistics
# --------------------------------------------------------------------------------------------


def prepare_actions(source: str, raw: str | os.PathLike, out: str | os.PathLike, spec: ClipSpec,
                    layout: ShardLayout = ShardLayout(), *, workers: int = 1, progress: bool = True,
                    info: Mapping[str, Any] | None = None, **options: Any) -> PrepResult:
    """Robot episodes of format ``source`` (``bridge``, ``lerobot``, ``episodes``) under ``raw`` ->
    clip shards with ``actions.npy`` (+ ``states.npy``) sidecars in ``out`` (statistics in the manifest).

    ``options`` go to the format's collector: bridge ``split`` (default "train"; None/"all" = every
    split), ``camera`` (index, default 0), ``actions`` ("json" | "states"); lerobot ``camera``
    (video key, default the first), ``action_key``, ``state_key``. ``spec.fps`` must be None.
    """
    if spec.fps is not None:
        raise PrepError(f"fps={spec.fps:g}: action sources keep each video's own frame rate (an action is one recorded "
                        "transition; a clip resampled in time would need invented actions). Use fps=None (--fps "
                        "source), or resample the raw episodes and their actions yourself")
    if source == "bridge":
        videos, params, dataset = collect_bridge(raw, **options)
    elif source == "lerobot":
        videos, params, dataset = collect_lerobot(raw, **options)
    elif source == "episodes":
        if options:
            raise PrepError(f"the episodes source takes no options, got {sorted(options)}")
        videos, params, dataset = collect_episodes(raw, exclude=out)
    else:
        raise PrepError(f"unknown action source {source!r}; one of {', '.join(SOURCES)}")
    summary = {**dataset, "convention": CONVENTION,
               "sidecars": {ACTIONS_EXT: "transitions", **({STATES_EXT: "frames"} if dataset["state_dim"] else {})}}
    return prepare(source, videos, out, spec, layout, workers=workers, source_params=params, progress=progress,
                   info={**dict(info or {}), "action_control": summary})


def read_action_stats(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The action statistics of a shard directory made by an action source, from its manifest:
    ``action_dim`` and the actions' ``count``, ``mean``, ``std``, ``min``, ``max`` (per dimension,
    population std, over every action row in the shards; None when no clip was written),
    ``state_dim`` and ``states`` = ``{"kind", "shape", "count", "mean", "std", "min", "max"}`` (None
    without states), plus ``source``, ``convention``, ``action_semantics``, ``num_clips``,
    ``num_episodes``, ``num_episodes_ok``."""
    data_dir = Path(data_dir)
    where = str(data_dir / MANIFEST_NAME)
    try:
        manifest = read_manifest(data_dir)
    except ShardError as e:
        raise PrepError(f"{data_dir} has no readable manifest ({e}); prepare the data with `prep "
                        f"{'|'.join(SOURCES)}`") from e
    extra = manifest.get("extra") or {}
    summary = (extra.get("info") or {}).get("action_control")
    if not isinstance(summary, dict):
        raise PrepError(f"{where} was not made by an action source (no extra.info.action_control); prepare it with "
                        f"`prep {'|'.join(SOURCES)}`")
    sidecars = extra.get("sidecars") or {}
    actions = sidecars.get(ACTIONS_EXT) or {}
    return {
        "source": extra.get("source"),
        "action_dim": summary.get("action_dim"),
        "count": int(actions.get("count", 0)),
        **{k: actions.get(k) for k in ("mean", "std", "min", "max")},
        "state_dim": summary.get("state_dim"),
        "states": sidecars.get(STATES_EXT) if summary.get("state_dim") else None,
        "convention": summary.get("convention"),
        "action_semantics": summary.get("action_semantics"),
        "num_clips": extra.get("num_clips"),
        "num_episodes": extra.get("num_videos"),
        "num_episodes_ok": extra.get("num_videos_ok"),
    }


def check_action_dim(data_dir: str | os.PathLike, action_dim: int, key: str = "task.action_dim") -> dict[str, Any]:
    """The statistics of ``data_dir``, after checking that its actions are ``action_dim``-d."""
    stats = read_action_stats(data_dir)
    if stats.get("action_dim") != action_dim:
        raise PrepError(f"{key}={action_dim}, but the actions in {data_dir} are {stats.get('action_dim')}-d "
                        f"({stats.get('source')} data, see {Path(data_dir) / MANIFEST_NAME}); set "
                        f"{key}={stats.get('action_dim')} or prepare data with {action_dim}-d actions")
    return stats


# ------------------------------------------------------------------------------------------------
# The prep sources (python -m nemo_ext.cli.prep bridge|lerobot|episodes; make data SOURCE=...)
# ------------------------------------------------------------------------------------------------


def _run(source: str, options: Callable[[Any], dict[str, Any]]) -> Callable[[Any, Any], PrepResult]:
    def run(args: Any, cfg: Any) -> PrepResult:
        spec, layout, common = clip_options(args, cfg, keeps_source_fps=True)
        return prepare_actions(source, Path(args.raw), Path(args.out), spec, layout, **common, **options(args))

    return run


def _summary(out_dir: Path) -> list[str]:
    stats = read_action_stats(out_dir)
    return [f"actions: {stats['action_dim']}-d, {stats['count']} transitions"
            + (f"; states: {stats['state_dim']}-d" if stats.get("state_dim") else "; no states")
            + f" (statistics in {Path(out_dir) / MANIFEST_NAME})"]


def _bridge_options(p: Any) -> None:
    p.add_argument("--split", default="train", help="annotation/<split> to convert, or 'all' (default train)")
    p.add_argument("--camera", type=int, default=0, help="index into each JSON's videos list (default 0)")
    p.add_argument("--bridge-actions", choices=list(BRIDGE_ACTION_MODES), default="json",
                   help="json: the 'action' key as stored (default); states: recomputed from 'state' + "
                   "'continuous_gripper_state' (IRASim / cosmos-predict1 relative actions, unscaled)")


def _lerobot_options(p: Any) -> None:
    p.add_argument("--camera", default=None, help="video key, e.g. observation.images.top (default: the first)")
    p.add_argument("--action-key", default="action", help="parquet column of the actions (default action)")
    p.add_argument("--state-key", default="observation.state",
                   help="parquet column of the states; 'none' for no states (default observation.state)")


_COMMON = dict(recipe="action_control", keeps_source_fps=True, all_clips=True, unit="episodes", summary=_summary)
_TAIL = (". Clips keep the source frame rate (no --fps); the manifest holds the action_dim and per-dimension "
         "statistics. See data_prep/action_control.py.")
for _source in (
    PrepSource(name="bridge", help="IRASim/Bridge robot episodes (annotation/<split>/<id>.json + videos) -> clip shards "
               "with actions", add_arguments=_bridge_options,
               run=_run("bridge", lambda a: {"split": None if a.split == "all" else a.split, "camera": int(a.camera),
                                             "actions": a.bridge_actions}), **_COMMON),
    PrepSource(name="lerobot", help="LeRobot v2.0/v2.1 episodes (meta/info.json, parquet, per-camera mp4) -> clip "
               "shards with actions", add_arguments=_lerobot_options,
               run=_run("lerobot", lambda a: {"camera": a.camera, "action_key": a.action_key,
                                              "state_key": None if a.state_key in ("", "none") else a.state_key}),
               **_COMMON),
    PrepSource(name="episodes", help="a folder of <name>.mp4 + <name>.npy actions [T-1, dim] (+ <name>.state.npy, "
               "<name>.txt) -> clip shards with actions", run=_run("episodes", lambda a: {}), **_COMMON),
):
    register_source(dataclasses.replace(_source, description=_source.help + _TAIL))
