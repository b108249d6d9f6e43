"""Robot-episode data prep (data_prep/action_control.py): Bridge/IRASim, LeRobot v2 and generic
episodes -> clip shards with actions/states sidecars and action statistics.

Fixture videos are written by the tests. Frame i of every episode is a uniform gray of value
``20 + 5 * i`` (so the source frame behind a clip frame can be read back), action row t is
``[t, 100 + t, ...]`` and state row t is ``[t, 1000 + t, ...]``: after clip cutting, row j of a
clip's actions must be the transition out of the clip's frame j.
"""

from __future__ import annotations

import io
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from data_prep import action_control as ac
from data_prep.clips import ClipSpec, PrepError, ShardLayout
from nemo_ext.cli import prep as prep_cli
from nemo_ext.data.dataset import VideoClipDataset
from nemo_ext.data.shards import ShardIndex, read_manifest
from nemo_ext.data.video import decode_frames, encode_video, probe_video

SPEC = ClipSpec(clip_frames=9, height=32, width=32, codec="vp9", clips_per_video=0)
LAYOUT = ShardLayout(videos_per_unit=2)
SIDECARS = {"actions.npy": "transitions", "states.npy": "frames"}


def marked(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    values = (20 + 5 * np.arange(n)).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(values[:, None, None, None], (n, h, w, 3)))


def markers(frames: np.ndarray) -> list[int]:
    h, w = frames.shape[1:3]
    center = frames[:, h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].reshape(len(frames), -1).mean(axis=1)
    return [int(round((v + 1 - 20) / 5)) for v in center]


def mp4_markers(mp4: bytes) -> list[int]:
    return markers(decode_frames(mp4, 0, probe_video(mp4).num_frames))


def actions_for(n_frames: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_frames - 1, dim))
    a[:, 0] = np.arange(n_frames - 1)
    if dim > 1:
        a[:, 1] = 100 + np.arange(n_frames - 1)
    return a


def states_for(n_frames: int, dim: int, seed: int) -> np.ndarray:
    s = np.random.default_rng(seed + 1000).normal(size=(n_frames, dim))
    s[:, 0] = np.arange(n_frames)
    s[:, 1] = 1000 + np.arange(n_frames)
    return s


def read_clips(out: Path) -> list[dict]:
    """Every clip as {json, actions, states, markers} in index order."""
    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "nframes.npy", "actions.npy"))
    clips = []
    for i in range(len(index)):
        clip = {"json": json.loads(index.read(i, "json")), "markers": mp4_markers(index.read(i, "mp4")),
                "actions": np.load(io.BytesIO(index.read(i, "actions.npy")))}
        if index.has(i, "states.npy"):
            clip["states"] = np.load(io.BytesIO(index.read(i, "states.npy")))
        clips.append(clip)
    return clips


def report(out: Path) -> dict[str, str]:
    return {r["video"]: r["reason"] for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}


def expected_stats(rows: list[np.ndarray]) -> dict[str, list[float]]:
    cat = np.concatenate(rows).astype(np.float64)
    return {"mean": cat.mean(0), "std": cat.std(0), "min": cat.min(0), "max": cat.max(0), "count": len(cat)}


def assert_stats(got: dict, rows: list[np.ndarray]) -> None:
    exp = expected_stats(rows)
    assert got["count"] == exp["count"]
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(got[k], exp[k], rtol=1e-6, atol=1e-9, err_msg=k)


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------------------------
# Bridge / IRASim
# ------------------------------------------------------------------------------------------------

# id -> (video frames, state rows, action rows, texts); None video frames = corrupt video
BRIDGE = {
    "0": (20, 20, 19, ["put the spoon in the pot"]),
    "1": (18, 18, 17, None),
    "2": (18, 18, 15, None),  # metadata count mismatch: rejected before decoding
    "3": (22, 19, 18, None),  # the video has more frames than the annotation: rejected after decoding
    "4": (None, 18, 17, None),  # corrupt video
    "10": (20, 20, 19, ["open the drawer", "pull the drawer open"]),
}


@pytest.fixture(scope="module")
def bridge_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bridge")
    for split, items in (("train", BRIDGE), ("val", {"7": (18, 18, 17, None)})):
        (root / "annotation" / split).mkdir(parents=True)
        for eid, (frames, n_state, n_action, texts) in items.items():
            vdir = root / "videos" / split / eid
            vdir.mkdir(parents=True)
            video = encode_video(marked(frames), 5, codec="h264") if frames else bytes(range(256)) * 8
            (vdir / "rgb.mp4").write_bytes(video)
            seed = int(eid)
            state = states_for(n_state, 6, seed)
            ann = {"episode_id": eid, "state": state.tolist(),
                   "continuous_gripper_state": (np.arange(n_state) % 2).astype(float).tolist(),
                   "action": actions_for(n_action + 1, 7, seed).tolist(),
                   "videos": [{"video_path": f"videos/{split}/{eid}/rgb.mp4"}],
                   "latent_videos": [{"latent_video_path": f"latent_videos/{split}/{eid}/0.pt"}]}
            if texts:
                ann["texts"] = texts
            (root / "annotation" / split / f"{eid}.json").write_text(json.dumps(ann))
    return root


@pytest.fixture(scope="module")
def bridge_out(bridge_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bridge_out")
    result = ac.prepare_actions("bridge", bridge_raw, out, SPEC, LAYOUT, progress=False)
    assert (result.num_videos, result.num_videos_ok, result.num_rejected) == (6, 3, 3)
    return out


def test_bridge_clips_carry_their_transitions(bridge_out: Path) -> None:
    clips = read_clips(bridge_out)
    by_episode: dict[str, list[int]] = {}
    for c in clips:
        meta, start = c["json"], c["json"]["start_frame"]
        by_episode.setdefault(meta["episode"], []).append(start)
        assert c["markers"] == list(range(start, start + 9))  # the video frames of the clip
        assert c["actions"].shape == (8, 7) and c["actions"].dtype == np.float32
        assert c["states"].shape == (9, 7) and c["states"].dtype == np.float32
        # action row j = transition out of clip frame j; state row j = clip frame j
        np.testing.assert_array_equal(c["actions"][:, 0], np.arange(start, start + 8))
        np.testing.assert_array_equal(c["states"][:, 0], np.arange(start, start + 9))
        np.testing.assert_array_equal(c["states"][:, 6], np.arange(start, start + 9) % 2)  # gripper column
        eid = meta["episode"].split("/")[1]
        np.testing.assert_allclose(c["actions"], actions_for(BRIDGE[eid][2] + 1, 7, int(eid))[start:start + 8],
                                   rtol=1e-6)
        assert meta["action_dim"] == 7 and meta["state_dim"] == 7 and meta["split"] == "train"
        assert meta["source"] == f"videos/train/{eid}/rgb.mp4" and meta["episode_id"] == eid
        texts = BRIDGE[eid][3]
        assert meta["caption"] == (texts[0] if texts else "") and meta.get("instructions") == texts
    assert by_episode == {"train/0": [0, 9], "train/1": [0, 9], "train/10": [0, 9]}  # val/7 not converted


def test_bridge_rejects_are_reported_with_both_counts(bridge_out: Path) -> None:
    rep = report(bridge_out)
    assert set(rep) == {"annotation/train/2.json", "videos/train/3/rgb.mp4", "videos/train/4/rgb.mp4"}
    assert rep["annotation/train/2.json"] == ("count mismatch: episode train/2: 'action' has 15 rows and 'state' 18 "
                                              "(frames) in 2.json; expected 17 actions (frames - 1)")
    assert rep["videos/train/3/rgb.mp4"].startswith("count mismatch: episode train/3: actions ('action' of "
                                                    "annotation/train/3.json): 18 rows for a video of 22 frames; "
                                                    "expected 21 (one per transition: frames - 1)")
    assert "corrupt" in rep["videos/train/4/rgb.mp4"] or "cannot" in rep["videos/train/4/rgb.mp4"]


def test_bridge_statistics_in_the_manifest(bridge_out: Path) -> None:
    """One place, one format: the manifest's extra.sidecars (no second statistics file)."""
    clips = read_clips(bridge_out)
    extra = read_manifest(bridge_out)["extra"]
    assert_stats(extra["sidecars"]["actions.npy"], [c["actions"] for c in clips])
    assert_stats(extra["sidecars"]["states.npy"], [c["states"] for c in clips])
    assert extra["sidecars"]["actions.npy"]["kind"] == "transitions" and extra["sidecars"]["actions.npy"]["shape"] == [7]
    summary = extra["info"]["action_control"]
    assert (summary["action_dim"], summary["state_dim"]) == (7, 7)
    assert summary["sidecars"] == {"actions.npy": "transitions", "states.npy": "frames"}
    assert not (bridge_out / "action_stats.json").exists()
    stats = ac.read_action_stats(bridge_out)
    assert (stats["action_dim"], stats["state_dim"], stats["source"]) == (7, 7, "bridge")
    side = extra["sidecars"]["actions.npy"]
    assert {k: stats[k] for k in ("count", "mean", "std", "min", "max")} == {k: side[k] for k in
                                                                           ("count", "mean", "std", "min", "max")}
    assert stats["count"] == 6 * 8 and stats["states"] == extra["sidecars"]["states.npy"]
    assert stats["num_episodes"] == 6 and stats["num_episodes_ok"] == 3 and stats["num_clips"] == 6
    assert ac.check_action_dim(bridge_out, 7)["action_dim"] == 7
    with pytest.raises(PrepError, match=r"task.action_dim=6, but the actions in .* are 7-d"):
        ac.check_action_dim(bridge_out, 6)
    # what the trainer's action_control conditioner normalises with: the same numbers
    from nemo_ext.tasks.action_control import find_action_stats

    found = find_action_stats(types.SimpleNamespace(path=str(bridge_out), sources=None, sample_dir=None))
    assert found["action_dim"] == 7 and found["mean"] == side["mean"] and found["std"] == side["std"]


def test_dataset_cuts_actions_to_the_training_clip(bridge_out: Path) -> None:
    index = ShardIndex.from_paths(bridge_out, required_exts=("mp4", "json", "actions.npy", "states.npy"))
    ds = VideoClipDataset(index, num_frames=5, height=32, width=32, sidecars=SIDECARS)
    for i in range(len(index)):
        item = ds[(i, 1234 + i)]
        video = ((item["video"].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        frames = markers(video)
        assert item["actions"].shape == (4, 7) and item["states"].shape == (5, 7)
        assert item["states"][:, 0].tolist() == frames  # state rows = the decoded frames
        assert item["actions"][:, 0].tolist() == frames[:-1]  # action j leaves frame j


def test_bridge_resume_is_a_noop_and_workers_do_not_change_bytes(bridge_raw: Path, bridge_out: Path,
                                                                 tmp_path: Path) -> None:
    before = snapshot(bridge_out)
    result = ac.prepare_actions("bridge", bridge_raw, bridge_out, SPEC, LAYOUT, progress=False)
    assert result.units_skipped == result.num_units == 3 and snapshot(bridge_out) == before
    other = tmp_path / "w2"
    ac.prepare_actions("bridge", bridge_raw, other, SPEC, LAYOUT, workers=2, progress=False)
    assert {k: v[0] for k, v in snapshot(other).items()} == {k: v[0] for k, v in before.items()}
    # edited actions of one episode: its unit (and only it) is redone, the statistics follow
    changed = tmp_path / "raw"
    shutil.copytree(bridge_raw, changed)
    out = tmp_path / "out"
    ac.prepare_actions("bridge", changed, out, SPEC, LAYOUT, progress=False)
    ann_path = changed / "annotation/train/1.json"
    ann = json.loads(ann_path.read_text())
    ann["action"][0][2] = 50.0
    ann_path.write_text(json.dumps(ann))
    result = ac.prepare_actions("bridge", changed, out, SPEC, LAYOUT, progress=False)
    assert result.units_skipped == 2
    stats = ac.read_action_stats(out)
    assert stats["max"][2] == 50.0
    with pytest.raises(PrepError, match="camera"):
        ac.prepare_actions("bridge", bridge_raw, bridge_out, SPEC, LAYOUT, progress=False, camera=1)


def test_bridge_options_and_state_derived_actions(bridge_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "states"
    ac.prepare_actions("bridge", bridge_raw, out, SPEC, ShardLayout(videos_per_unit=8), progress=False,
                       split="all", actions="states")
    clips = read_clips(out)
    # train/2's 'action' rows do not matter when the actions come from its (consistent) states
    assert {c["json"]["episode"] for c in clips} == {"train/0", "train/1", "train/2", "train/10", "val/7"}
    assert set(report(out)) == {"videos/train/3/rgb.mp4", "videos/train/4/rgb.mp4"}
    for c in clips:
        eid, start = c["json"]["episode"].split("/")[1], c["json"]["start_frame"]
        n = {"7": 18}.get(eid, BRIDGE.get(eid, (0, 18))[1])
        state = states_for(n, 6, int(eid))
        full = ac.bridge_actions_from_states(state, np.arange(n) % 2)
        np.testing.assert_allclose(c["actions"], full[start:start + 8], rtol=1e-5, atol=1e-6)
    assert ac.read_action_stats(out)["action_semantics"].startswith("recomputed from 'state'")
    with pytest.raises(PrepError, match="no split test"):
        ac.prepare_actions("bridge", bridge_raw, tmp_path / "x", SPEC, split="test")
    with pytest.raises(PrepError, match="keep each video's own frame rate"):
        ac.prepare_actions("bridge", bridge_raw, tmp_path / "x", ClipSpec(clip_frames=9, height=32, width=32, fps=4))


def _rot(r: float, p: float, y: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_state_derived_actions_are_motions_in_the_gripper_frame() -> None:
    # yaw 90 degrees, then a move along world +y: in the gripper frame that is +x
    state = np.array([[0, 0, 0, 0, 0, np.pi / 2], [0, 0.1, 0, 0, 0, np.pi / 2], [0, 0.1, 0.2, 0.1, -0.2, 0.3]])
    act = ac.bridge_actions_from_states(state, [0.0, 1.0, 0.5])
    np.testing.assert_allclose(act[0], [0.1, 0, 0, 0, 0, 0, 1.0], atol=1e-12)
    # the second step: composing the previous pose with the relative motion gives the next pose
    r0, r1 = _rot(*state[1, 3:]), _rot(*state[2, 3:])
    np.testing.assert_allclose(r0 @ act[1, :3] + state[1, :3], state[2, :3], atol=1e-12)
    np.testing.assert_allclose(r0 @ _rot(*act[1, 3:6]), r1, atol=1e-12)
    assert act[1, 6] == 0.5


# ------------------------------------------------------------------------------------------------
# LeRobot v2
# ------------------------------------------------------------------------------------------------

TOP, WRIST = "observation.images.top", "observation.images.wrist"
# episode -> (parquet rows, video frames, episodes.jsonl length)
LEROBOT = {0: (18, 18, 18), 1: (20, 20, 20), 2: (18, 18, 19), 3: (18, 17, 18)}


def write_lerobot(root: Path, version: str = "v2.1") -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (root / "meta").mkdir(parents=True)
    features = {
        "action": {"dtype": "float32", "shape": [4], "names": None},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        TOP: {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channel"],
              "info": {"video.fps": 10.0, "video.codec": "av1"}},
        WRIST: {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channel"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": version, "robot_type": "test", "total_episodes": len(LEROBOT), "total_frames": 74,
            "total_tasks": 2, "total_videos": 8, "total_chunks": 2, "chunks_size": 2, "fps": 10,
            "splits": {"train": "0:4"}, "features": features,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    tasks = ["stack the red block on the blue block", "push the cup to the left"]
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                       for i, t in enumerate(tasks)))
    episodes = []
    for ep, (rows, frames, length) in LEROBOT.items():
        chunk = f"chunk-{ep // 2:03d}"
        action = actions_for(rows + 1, 4, ep)  # one per frame (the last one goes nowhere)
        state = states_for(rows, 3, ep)
        table = pa.table({
            "action": pa.array(action.astype(np.float32).tolist(), type=pa.list_(pa.float32())),
            # fixed-size lists, as HF datasets writes Sequence(length=n) features
            "observation.state": pa.array(state.astype(np.float32).tolist(), type=pa.list_(pa.float32(), 3)),
            "timestamp": pa.array((np.arange(rows) / 10).astype(np.float32)),
            "frame_index": pa.array(np.arange(rows)), "episode_index": pa.array(np.full(rows, ep)),
            "index": pa.array(np.arange(rows)), "task_index": pa.array(np.full(rows, ep % 2)),
        })
        (root / "data" / chunk).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / chunk / f"episode_{ep:06d}.parquet")
        for key, codec in ((TOP, "av1" if ep == 0 else "h264"), (WRIST, "vp9")):
            (root / "videos" / chunk / key).mkdir(parents=True, exist_ok=True)
            if codec == "av1":
                data = av1_mp4(marked(frames), 10)
            else:
                data = encode_video(marked(frames), 10, codec=codec)
            (root / "videos" / chunk / key / f"episode_{ep:06d}.mp4").write_bytes(data)
        episodes.append({"episode_index": ep, "tasks": [tasks[ep % 2]], "length": length})
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    return root


def av1_mp4(frames: np.ndarray, fps: int) -> bytes:
    """LeRobot's default video codec (libsvtav1), when this FFmpeg build has it; else H.264."""
    import av

    if "libsvtav1" not in av.codecs_available:
        return encode_video(frames, fps, codec="h264")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libsvtav1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


@pytest.fixture(scope="module")
def lerobot_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lerobot(tmp_path_factory.mktemp("lerobot"))


def test_lerobot_drops_the_last_frames_action(lerobot_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = ac.prepare_actions("lerobot", lerobot_raw, out, SPEC, LAYOUT, progress=False)
    assert (result.num_videos, result.num_videos_ok, result.num_clips) == (4, 2, 4)
    for c in read_clips(out):
        meta, start = c["json"], c["json"]["start_frame"]
        ep = meta["episode_index"]
        assert meta["episode"] == f"episode_{ep:06d}" and meta["camera"] == TOP
        assert meta["source"] == f"videos/chunk-000/{TOP}/episode_{ep:06d}.mp4"
        assert c["markers"] == list(range(start, start + 9))
        rows = LEROBOT[ep][0]
        np.testing.assert_allclose(c["actions"], actions_for(rows + 1, 4, ep)[start:start + 8].astype(np.float32))
        np.testing.assert_allclose(c["states"], states_for(rows, 3, ep)[start:start + 9].astype(np.float32))
        assert meta["caption"] == ["stack the red block on the blue block", "push the cup to the left"][ep % 2]
    rep = report(out)
    assert rep == {
        "data/chunk-001/episode_000002.parquet": "count mismatch: episode episode_000002: meta/episodes.jsonl gives "
                                                 "length 19, episode_000002.parquet has 18 frames",
        f"videos/chunk-001/{TOP}/episode_000003.mp4": (
            "count mismatch: episode episode_000003: actions ('action' of data/chunk-001/episode_000003.parquet, the "
            "last frame's dropped): 17 rows for a video of 17 frames; expected 16 (one per transition: frames - 1)"),
    }
    stats = ac.read_action_stats(out)
    assert (stats["action_dim"], stats["state_dim"]) == (4, 3) and stats["count"] == 4 * 8
    # every transition stored: the rows of the clips' actions
    assert_stats(stats, [c["actions"] for c in read_clips(out)])
    assert ac.read_action_stats(out)["action_semantics"].startswith("the LeRobot action column")


def test_lerobot_camera_keys_and_versions(lerobot_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "wrist"
    ac.prepare_actions("lerobot", lerobot_raw, out, SPEC, LAYOUT, progress=False, camera=WRIST, state_key=None)
    clips = read_clips(out)
    assert {c["json"]["camera"] for c in clips} == {WRIST} and all("states" not in c for c in clips)
    assert ac.read_action_stats(out)["state_dim"] is None and ac.read_action_stats(out)["states"] is None
    with pytest.raises(PrepError, match=f"choose one of: {TOP}, {WRIST}"):
        ac.prepare_actions("lerobot", lerobot_raw, tmp_path / "x", SPEC, camera="observation.images.side")
    with pytest.raises(PrepError, match="no feature 'act'"):
        ac.prepare_actions("lerobot", lerobot_raw, tmp_path / "x", SPEC, action_key="act")
    v3 = tmp_path / "v3"
    (v3 / "meta").mkdir(parents=True)
    info = json.loads((lerobot_raw / "meta" / "info.json").read_text())
    (v3 / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v3.0"}))
    with pytest.raises(PrepError, match="codebase_version v3.0; this converter reads LeRobot v2.0/v2.1"):
        ac.prepare_actions("lerobot", v3, tmp_path / "x", SPEC)


# ------------------------------------------------------------------------------------------------
# Generic episodes
# ------------------------------------------------------------------------------------------------


def write_episode(root: Path, name: str, frames: int, n_actions: int | None, dim: int = 5,
                  state: int | None = None, text: str | None = None, seed: int = 0) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.mp4").write_bytes(encode_video(marked(frames), 8, codec="vp9") if frames else b"\0" * 100)
    if n_actions is not None:
        np.save(root / f"{name}.npy", actions_for(n_actions + 1, dim, seed))
    if state is not None:
        np.save(root / f"{name}.state.npy", states_for(state, 2, seed))
    if text is not None:
        (root / f"{name}.txt").write_text(text)


def test_generic_episodes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_episode(raw, "a", 20, 19, state=20, text="\n  fold the towel \nfold it twice\n", seed=1)
    write_episode(raw, "sub/b", 18, 17, state=18, seed=2)
    write_episode(raw, "c", 18, 17, seed=3)  # no states while the others have them
    write_episode(raw, "d", 18, None)  # no actions
    write_episode(raw, "e", 18, 18, state=18, seed=5)  # 18 actions for 18 states
    write_episode(raw, "f", 0, 17, state=18, seed=6)  # corrupt video
    write_episode(raw, "g", 20, 18, state=19, seed=7)  # consistent files, the video has one frame more
    write_episode(raw, "n", 18, 17, state=18, seed=8)
    nan = np.load(raw / "n.npy")
    nan[4, 2] = np.nan
    np.save(raw / "n.npy", nan)
    out = tmp_path / "out"
    result = ac.prepare_actions("episodes", raw, out, SPEC, LAYOUT, progress=False)
    assert (result.num_videos, result.num_videos_ok, result.num_clips) == (8, 2, 4)
    for c in read_clips(out):
        meta, start = c["json"], c["json"]["start_frame"]
        assert c["markers"] == list(range(start, start + 9))
        np.testing.assert_array_equal(c["actions"][:, 0], np.arange(start, start + 8))
        np.testing.assert_array_equal(c["states"][:, 0], np.arange(start, start + 9))
        assert meta["episode"] in ("a", "sub/b") and meta["action_dim"] == 5 and meta["state_dim"] == 2
        if meta["episode"] == "a":
            assert meta["caption"] == "fold the towel" and meta["instructions"] == ["fold the towel", "fold it twice"]
    rep = report(out)
    assert rep["c.mp4"] == "episode c: no states (c.state.npy), but other episodes of the dataset have 2-d states (e.g. a)"
    assert rep["d.mp4"] == "episode d: no actions file d.npy next to the video"
    assert rep["e.mp4"] == ("count mismatch: episode e: e.npy has 18 actions and e.state.npy 18 states (frames); "
                            "expected 17 actions (frames - 1)")
    assert rep["n.mp4"] == "episode n: n.npy holds NaN/inf (first in row 4)"
    assert "f.mp4" in rep and rep["g.mp4"].startswith("count mismatch: episode g: actions (g.npy): 18 rows for a "
                                                      "video of 20 frames; expected 19")
    # inconsistent action_dim across episodes: an error naming the first offender
    write_episode(raw, "h", 18, 17, dim=6, state=18, seed=8)
    write_episode(raw, "i", 18, 17, dim=6, state=18, seed=9)
    with pytest.raises(PrepError, match=r"inconsistent action_dim: episode h \(h.npy\) has 6-d actions, episode a "
                                        r"\(the first\) has 5-d"):
        ac.prepare_actions("episodes", raw, out, SPEC, LAYOUT, progress=False)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_cli(bridge_raw: Path, lerobot_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        code = prep_cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    common = ("--codec", "vp9", "--workers", "1", "--no-progress", "--height", "32", "--width", "32")
    out = tmp_path / "b"
    # no --recipe: the robot sources default to the action_control recipe's clips (9 frames; the general
    # recipe's 17 would reject these short episodes as too short)
    code, stdout, err = cli("bridge", "--raw", str(bridge_raw), "--out", str(out), *common)
    assert code == 0, err
    assert "clips written: 6 (from 3 of 6 episodes; 9 frames at 32x32, vp9)" in stdout
    assert "actions: 7-d, 48 transitions; states: 7-d" in stdout and "manifest.json" in stdout
    assert read_manifest(out)["extra"]["info"]["recipe"] == "action_control"
    code, stdout, err = cli("lerobot", "--raw", str(lerobot_raw), "--out", str(tmp_path / "l"), *common,
                            "--camera", WRIST, "--state-key", "none", "--clip-frames", "17")
    assert code == 0, err
    assert "clips written: 2 (from 2 of 4 episodes; 17 frames" in stdout and "actions: 4-d, 32 transitions; no states" in stdout
    cases = [
        (("bridge", "--raw", str(bridge_raw), "--out", str(tmp_path / "x"), "--fps", "4"), "keeps each episode's own"),
        (("bridge", "--raw", str(bridge_raw), "--out", str(tmp_path / "x"), "--split", "nope"), "no split nope"),
        (("lerobot", "--raw", str(bridge_raw), "--out", str(tmp_path / "x")), "no meta/info.json"),
        (("episodes", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "x")), "is not a directory"),
        (("bridge", "--raw", str(bridge_raw), "--out", str(out), *common, "data.num_frames=17"),
         "clip_frames (has 9, asked 17)"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2 and message in err, (args, err)


# ------------------------------------------------------------------------------------------------
# The sidecar mechanism of data_prep.clips itself
# ------------------------------------------------------------------------------------------------


def _array(value: np.ndarray) -> np.ndarray:
    return value


def test_clip_sidecars_follow_resampling_and_refuse_resampled_transitions(tmp_path: Path) -> None:
    import functools

    from data_prep import clips as cl

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a", "b"):
        (raw / f"{name}.mp4").write_bytes(encode_video(marked(40), 10, codec="vp9"))
    per_frame = states_for(40, 2, 0)
    static = np.arange(6, dtype=np.int64).reshape(2, 3)
    sc_frames = cl.Sidecar("pose.npy", "frames", functools.partial(_array, per_frame), "f")
    sc_static = cl.Sidecar("k.npy", "static", functools.partial(_array, static), "s")
    sc_trans = cl.Sidecar("act.npy", "transitions", functools.partial(_array, actions_for(40, 3, 0)), "t",
                          what="episode b: act")
    videos = [cl.source_video(raw, "a.mp4", "x", sidecars=[sc_frames, sc_static]),
              cl.source_video(raw, "b.mp4", "y", sidecars=[sc_frames, sc_trans])]
    spec = ClipSpec(clip_frames=9, height=32, width=32, fps=5, codec="vp9", clips_per_video=0)
    out = tmp_path / "out"
    result = cl.prepare("test", videos, out, spec, progress=False)
    assert result.num_clips == 2 and result.num_rejected == 1  # 40 frames at 10 fps -> 20 at 5 fps: 2 clips
    assert "episode b: act: holds one row per transition, but the clip is resampled" in report(out)["b.mp4"]
    index = ShardIndex.from_paths(out, required_exts=("pose.npy", "k.npy"))
    for i in range(len(index)):
        start = json.loads(index.read(i, "json"))["start_frame"]
        pose = np.load(io.BytesIO(index.read(i, "pose.npy")))
        np.testing.assert_array_equal(pose[:, 0], np.arange(start, start + 18, 2))  # every other source frame
        np.testing.assert_array_equal(np.load(io.BytesIO(index.read(i, "k.npy"))), static)
    side = read_manifest(out)["extra"]["sidecars"]
    assert side["k.npy"] == {"kind": "static"} and side["act.npy"] == {"kind": "transitions", "count": 0}
    assert side["pose.npy"]["count"] == 18 and side["pose.npy"]["shape"] == [2]
    with pytest.raises(PrepError, match="kind 'rows' is not one of"):
        cl.Sidecar("x.npy", "rows", functools.partial(_array, static), "")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_data_passes_the_action_sources() -> None:
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RAW", "SOURCE", "MAKEFLAGS")}
    for source in ac.SOURCES:
        proc = subprocess.run(["make", "-n", "recipe=general", "data", f"SOURCE={source}", "RAW=/r", "OUT=/o",
                               "ARGS=--codec vp9"], cwd=repo, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"-m nemo_ext.cli.prep {source} --recipe general --raw /r --out /o --codec vp9" in proc.stdout
