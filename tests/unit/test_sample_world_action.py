"""action_control's sample world (``action``): an agent moved by action vectors pushes static objects.

Checks what the action_control recipe and its evaluation rely on: one action per transition,
frames that are an exact function of (initial state, actions), actions as the only cause of
motion, the documented meaning of every action dimension, and shards that the training loader
cuts to the clip in line with the video.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from nemo_ext import worlds
from nemo_ext.data.dataset import VideoClipDataset
from nemo_ext.tasks.action_control import world as sw
from nemo_ext.data.shards import ShardIndex, read_manifest

SPEC = worlds.WorldSpec(num_frames=17, height=32, width=48, fps=8)
SEED = 5


@pytest.fixture(scope="module")
def episodes() -> list[worlds.Episode]:
    return [worlds.render_episode("action", SEED, i, SPEC) for i in range(24)]


def agent_box_center(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(np.abs(frame.astype(int) - np.array(sw.AGENT_RGB)).sum(-1) < 60)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def agent_pixels(frame: np.ndarray) -> int:
    return int((frame.astype(int) == np.array(sw.AGENT_RGB)).all(-1).sum())


def test_episode_layout_and_determinism(episodes: list[worlds.Episode]) -> None:
    for i, ep in enumerate(episodes[:4]):
        again = worlds.render_episode("action", SEED, i, SPEC)
        assert np.array_equal(again.frames, ep.frames) and again.caption == ep.caption
        for ext in ("actions.npy", "states.npy"):
            assert np.array_equal(again.sidecars[ext], ep.sidecars[ext], equal_nan=True)
    assert not np.array_equal(episodes[0].sidecars["actions.npy"], episodes[1].sidecars["actions.npy"])
    for ep in episodes:
        actions, states = ep.sidecars["actions.npy"], ep.sidecars["states.npy"]
        assert ep.frames.shape == (17, 32, 48, 3) and ep.frames.dtype == np.uint8
        assert actions.shape == (16, sw.ACTION_DIM) and actions.dtype == np.float32  # T-1 rows
        assert states.shape == (17, len(sw.STATE_NAMES)) and states.dtype == np.float32
        n = len(ep.meta["objects"])
        assert 1 <= n <= 3 and np.isnan(states[:, 3 + 2 * n:]).all() and not np.isnan(states[:, :3 + 2 * n]).any()
        assert np.isin(actions[:, 6], [0.0, 1.0]).all() and (np.abs(actions[:, :6]) <= 1).all()
        assert ep.meta["action_names"] == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
        assert ep.meta["action_scale_px"] == pytest.approx(0.06 * 32)
        assert ep.caption.startswith("a magenta robot ") and ep.caption.endswith(" background")
        assert ep.caption.startswith("a magenta robot pushes ") == bool(ep.meta["pushed"])
        pushed_part = ep.caption.split(" past ")[0].split(" on a ")[0] if ep.meta["pushed"] else ""
        for o in ep.meta["objects"]:  # the caption names every object, pushed ones after "pushes"
            assert f"a {o['color']} {o['shape']}" in ep.caption
            assert (f"a {o['color']} {o['shape']}" in pushed_part) == (o["color"] in ep.meta["pushed"])
    assert sum(bool(ep.meta["pushed"]) for ep in episodes) >= 8  # the policy seeks objects out


def test_rerendering_with_the_stored_actions_is_exact(episodes: list[worlds.Episode]) -> None:
    for i, ep in enumerate(episodes[:6]):
        frames, actions, states = sw.render_action_episode(SPEC, SEED, i)
        assert np.array_equal(frames, ep.frames) and np.array_equal(actions, ep.sidecars["actions.npy"])
        assert np.array_equal(states, ep.sidecars["states.npy"], equal_nan=True)
        again = sw.render_action_episode(SPEC, SEED, i, actions=ep.sidecars["actions.npy"].tolist())
        assert np.array_equal(again[0], ep.frames)
        # the json alone (initial scene) + actions.npy is enough to re-simulate
        meta = json.loads(json.dumps(ep.meta))
        sim = sw.simulate_actions(meta, ep.sidecars["actions.npy"], SPEC.height, SPEC.width)
        assert np.array_equal(sim.astype(np.float32), ep.sidecars["states.npy"], equal_nan=True)
        assert np.array_equal(sw.render_action_frames(meta, sim, SPEC.height, SPEC.width), ep.frames)


def test_agent_follows_dx_dy_and_the_frames_show_it(episodes: list[worlds.Episode]) -> None:
    for ep in episodes:
        actions, states = ep.sidecars["actions.npy"], ep.sidecars["states.npy"].astype(np.float64)
        step = np.diff(states[:, :2], axis=0)
        assert np.allclose(step, actions[:, :2] * ep.meta["action_scale_px"], atol=1e-4)  # never clipped
        assert np.array_equal(states[1:, 2], actions[:, 6]) and states[0, 2] == ep.meta["agent"]["gripper"]
        closed = actions.copy()  # a filled diamond: its box center is the agent's position
        closed[:, 6] = 0.0
        scene = {**ep.meta, "agent": {**ep.meta["agent"], "gripper": 0.0}}
        frames = sw.render_action_frames(scene, sw.simulate_actions(scene, closed, SPEC.height, SPEC.width),
                                         SPEC.height, SPEC.width)
        for t in range(SPEC.num_frames):
            cx, cy = agent_box_center(frames[t])
            assert abs(cx - states[t, 0]) <= 1.0 and abs(cy - states[t, 1]) <= 1.0
    # actions past the border: the agent stops at [size, extent - size]
    push_right = np.zeros((8, 7), np.float32)
    push_right[:, 0] = 5.0
    _, _, states = sw.render_action_episode(SPEC, SEED, 0, actions=push_right)
    size = episodes[0].meta["agent"]["size"]
    assert states[-1, 0] == pytest.approx(SPEC.width - size) and (states[:, 1] == states[0, 1]).all()


def test_zero_motion_moves_nothing_and_other_actions_change_the_frames(episodes: list[worlds.Episode]) -> None:
    for i, ep in enumerate(episodes[:6]):
        stored = ep.sidecars["actions.npy"]
        still = np.zeros_like(stored)
        still[:, 6] = ep.meta["agent"]["gripper"]
        frames, _, states = sw.render_action_episode(SPEC, SEED, i, actions=still)
        assert (frames == frames[0]).all() and np.array_equal(frames[0], ep.frames[0])
        assert np.array_equal(states, np.repeat(states[:1], len(states), 0), equal_nan=True)

        nuisance = stored.copy()  # dims 2-5 have no effect at all
        nuisance[:, 2:6] = np.random.default_rng(i).uniform(-1, 1, size=(16, 4))
        assert np.array_equal(sw.render_action_episode(SPEC, SEED, i, actions=nuisance)[0], ep.frames)

        moved = stored.copy()
        moved[:, 0] = -moved[:, 0]
        moved[:, 1] += 0.5
        frames_m, _, states_m = sw.render_action_episode(SPEC, SEED, i, actions=moved)
        assert np.array_equal(frames_m[0], ep.frames[0]) and not np.array_equal(frames_m[1:], ep.frames[1:])

        grip = stored.copy()  # the gripper changes the agent's look only
        grip[:, 6] = 1.0 - grip[:, 6]
        frames_g, _, states_g = sw.render_action_episode(SPEC, SEED, i, actions=grip)
        not_gripper = [0, 1] + list(range(3, 9))
        assert np.array_equal(states_g[:, not_gripper], ep.sidecars["states.npy"][:, not_gripper], equal_nan=True)
        for t in range(1, 17):
            assert (agent_pixels(frames_g[t]) < agent_pixels(ep.frames[t])) == (grip[t - 1, 6] == 1.0)  # open = hollow


def test_objects_move_only_when_the_agent_pushes_them(episodes: list[worlds.Episode]) -> None:
    pushes = 0
    for i, ep in enumerate(episodes):
        meta = ep.meta
        rng = np.random.default_rng(100 + i)  # also arbitrary, larger actions
        for actions in (ep.sidecars["actions.npy"], rng.uniform(-2, 2, size=(16, 7)).astype(np.float32)):
            s = sw.simulate_actions(meta, actions, SPEC.height, SPEC.width)
            sa = meta["agent"]["size"]
            for t in range(len(actions)):
                agent_moved = not np.array_equal(s[t, :2], s[t + 1, :2])
                for k, obj in enumerate(meta["objects"]):
                    before, after = s[t, 3 + 2 * k: 5 + 2 * k], s[t + 1, 3 + 2 * k: 5 + 2 * k]
                    if np.array_equal(before, after):
                        continue
                    assert agent_moved and math.dist(s[t + 1, :2], before) < sa + obj["size"], (i, t, k)
                    pushes += 1
                    d_agent, d_obj = s[t + 1, :2] - s[t, :2], after - before
                    size, extent = obj["size"], (SPEC.width, SPEC.height)
                    clipped = any(not size < after[j] < extent[j] - size for j in range(2))
                    if not clipped:  # along the agent's move, until the discs touch
                        cross = d_agent[0] * d_obj[1] - d_agent[1] * d_obj[0]
                        assert cross == pytest.approx(0, abs=1e-9) and d_agent @ d_obj > 0
                        assert math.dist(s[t + 1, :2], after) == pytest.approx(sa + size)
    assert pushes >= 20


def test_invalid_actions_are_refused() -> None:
    with pytest.raises(ValueError, match=r"shape \[num_transitions, 7\]"):
        sw.render_action_episode(SPEC, 0, 0, actions=np.zeros((16, 2)))
    with pytest.raises(ValueError, match="finite"):
        sw.render_action_episode(SPEC, 0, 0, actions=np.full((16, 7), np.nan))
    frames, actions, states = sw.render_action_episode(SPEC, 0, 0, actions=np.zeros((3, 7)))
    assert frames.shape[0] == 4 and actions.shape == (3, 7) and states.shape == (4, 9)


def test_shards_read_back_in_line_with_the_clip(tmp_path: Path) -> None:
    kw = dict(variant="action", num_videos=3, num_frames=17, height=32, width=48, fps=8, seed=SEED,
              shard_max_count=2, progress=False)
    out = worlds.generate(tmp_path / "action", **kw)
    parallel = worlds.generate(tmp_path / "parallel", **{**kw, "workers": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in parallel.iterdir()}
    params = read_manifest(out)["extra"]["params"]
    assert params["variant"] == "action" and params["variant_version"] == sw.ACTION_WORLD.version == 2
    stats = read_manifest(out)["extra"]["sidecars"]  # the normalisation statistics, in the manifest
    assert stats["actions.npy"]["kind"] == "transitions" and stats["actions.npy"]["shape"] == [7]
    assert stats["states.npy"]["kind"] == "frames" and not (out / "action_stats.json").exists()

    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "actions.npy", "states.npy"))
    meta = json.loads(index.read(1, "json"))
    assert meta["variant"] == "action" and meta["action_dim"] == 7 and meta["num_frames"] == 17
    assert (meta["seed"], meta["index"]) == (SEED, 1)
    truth = [sw.render_action_episode(worlds.WorldSpec(17, 32, 48, 8), SEED, i) for i in range(3)]
    assert np.array_equal(np.load(io.BytesIO(index.read(1, "actions.npy"))), truth[1][1])

    ds = VideoClipDataset(index, num_frames=9, height=32, width=48, clip_sampling="random",
                          sidecars={"actions.npy": "transitions", "states.npy": "frames"})
    starts = set()
    for sample_idx, clip_seed in [(0, 11), (1, 12), (2, 13), (1, 99), (2, 7)]:
        item = ds[(sample_idx, clip_seed)]
        start = random.Random(clip_seed).randint(0, 17 - 9)
        starts.add(start)
        frames, actions, states = truth[sample_idx]
        assert item["key"] == f"sample_{sample_idx:06d}"
        assert item["actions"].shape == (8, 7) and np.array_equal(item["actions"].numpy(), actions[start:start + 8])
        assert np.array_equal(item["states"].numpy(), states[start:start + 9], equal_nan=True)
        video = ((item["video"].permute(1, 2, 3, 0).numpy() + 1) * 127.5)  # [9, H, W, 3]
        err = {s: np.abs(video - frames[s:s + 9]).mean() for s in range(17 - 9 + 1)}
        assert err[start] < 6 and err[start] == min(err.values()), (start, err)
    assert len(starts) > 1


def test_prep_cli_writes_the_action_variant(tmp_path: Path) -> None:
    from nemo_ext.cli import prep

    out = tmp_path / "cli"
    assert prep.main(["sample", "--out", str(out), "--variant", "action", "--num-videos", "2", "--num-frames", "9",
                      "--height", "32", "--width", "32", "--workers", "1"]) == 0
    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "actions.npy", "states.npy"))
    assert len(index) == 2
    assert np.load(io.BytesIO(index.read(0, "actions.npy"))).shape == (8, 7)
