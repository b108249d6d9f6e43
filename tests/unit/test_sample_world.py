"""The procedural sample-world framework (nemo_ext.worlds) with the general task's world: content,
determinism, resumability, CLI, extensibility through the registry, statistics in the manifest."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nemo_ext import worlds as sw
from nemo_ext.data.shards import ShardIndex, read_manifest
from nemo_ext.tasks.general.world import object_position, render_general
from nemo_ext.worlds.shapes import PALETTE, SHAPES
from nemo_ext.data.video import decode_frames, probe_video

SMALL = dict(num_videos=5, num_frames=9, height=32, width=48, fps=6, seed=3, shard_max_count=2, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sw.generate(tmp_path_factory.mktemp("world") / "general", **SMALL)


def tar_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_layout_and_sample_contents(world: Path) -> None:
    assert sorted(p.name for p in world.iterdir()) == [
        "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar",
        "shard-000002.idx", "shard-000002.tar"]
    index = ShardIndex.from_paths(world, required_exts=("mp4", "json", "nframes.npy"))
    assert [index.key(i) for i in range(len(index))] == [f"sample_{i:06d}" for i in range(5)]
    for i in range(len(index)):
        meta = json.loads(index.read(i, "json"))
        assert meta["source"] == "sample_world" and meta["variant"] == "general"
        assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (9, 32, 48, 6.0)
        assert int(np.load(io.BytesIO(index.read(i, "nframes.npy")))[0]) == 9
        info = probe_video(index.read(i, "mp4"))
        assert (info.num_frames, info.height, info.width, info.codec) == (9, 32, 48, "vp9")
        objects = meta["objects"]
        assert 1 <= len(objects) <= 3
        assert len({o["color"] for o in objects}) == len(objects)  # distinct colors
        for o in objects:  # the caption names every object's color, shape and direction
            assert f"a {o['color']} {o['shape']} moving {o['direction']}" in meta["caption"]
            assert o["shape"] in SHAPES and o["color"] in PALETTE
            assert set(o) >= {"size", "position", "velocity"}
        assert meta["caption"].endswith(" background")
    m = read_manifest(world)
    assert m["num_samples"] == 5 and [s["num_samples"] for s in m["shards"]] == [2, 2, 1]
    assert m["extra"]["params"]["seed"] == 3


def test_objects_follow_the_stored_dynamics() -> None:
    spec = sw.WorldSpec(num_frames=33, height=32, width=48, fps=8)
    checked = 0
    for index in range(40):  # single-object episodes: no occlusion, so the object is found exactly
        ep = sw.render_episode("general", seed=0, index=index, spec=spec)
        if len(ep.meta["objects"]) != 1:
            continue
        obj = ep.meta["objects"][0]
        rgb = np.array(PALETTE[obj["color"]])
        for t in range(spec.num_frames):
            mask = np.abs(ep.frames[t].astype(int) - rgb).sum(-1) < 60
            ys, xs = np.nonzero(mask)
            cx, cy = object_position(obj, t, spec.height, spec.width)
            assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 1.0, (index, t)
            assert abs((ys.min() + ys.max() + 1) / 2 - cy) <= 1.0, (index, t)
        checked += 1
    assert checked >= 3


def test_bounce_is_elastic_and_stays_inside() -> None:
    obj = {"position": [10.0, 5.0], "velocity": [3.0, -2.0], "size": 4.0}
    xs = [object_position(obj, t, 32, 48)[0] for t in range(60)]
    assert min(xs) >= 4.0 and max(xs) <= 44.0
    assert object_position(obj, 1, 32, 48) == (13.0, 5.0)  # y: 5 - 2 = 3 < 4 reflects to 5
    steps = np.abs(np.diff(xs))
    assert np.allclose(steps[steps > 2.99], 3.0)  # speed preserved between bounces


def test_same_arguments_same_bytes_any_workers(world: Path, tmp_path: Path) -> None:
    again = sw.generate(tmp_path / "again", **SMALL)
    assert tar_bytes(again) == tar_bytes(world)
    parallel = sw.generate(tmp_path / "parallel", **{**SMALL, "workers": 2})
    assert tar_bytes(parallel) == tar_bytes(world)
    other_seed = sw.generate(tmp_path / "seed4", **{**SMALL, "seed": 4, "num_videos": 1})
    assert tar_bytes(other_seed)["shard-000000.tar"] != tar_bytes(world)["shard-000000.tar"]


def test_rerun_is_a_noop_and_other_parameters_are_refused(world: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in world.iterdir()}
    with caplog.at_level(logging.INFO, logger="nemo_ext.worlds"):
        assert sw.generate(world, **SMALL) == world
    assert "already complete" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in world.iterdir()} == before
    with pytest.raises(ValueError, match=r"other parameters \(height: has 32, asked 64.*seed: has 3, asked 9\).*delete"):
        sw.generate(world, **{**SMALL, "height": 64, "seed": 9})


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    out = tmp_path / "w"
    sw.generate(out, **{**SMALL, "num_videos": 3})
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    (out / "shard-000007.tar").write_bytes(b"stale")
    sw.generate(out, **{**SMALL, "num_videos": 3})
    assert not (out / "shard-000007.tar").exists()
    assert read_manifest(out)["num_samples"] == 3


def test_argument_validation(tmp_path: Path) -> None:
    from nemo_ext.worlds import WORLDS

    with pytest.raises(ValueError, match=rf"unknown sample world 'robot'; registered: {', '.join(WORLDS.names())}$"):
        sw.generate(tmp_path, variant="robot", progress=False)
    with pytest.raises(ValueError, match=r"num_frames must be >= 1"):
        sw.generate(tmp_path, num_frames=0, progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        sw.generate(tmp_path, height=40, progress=False)


def test_a_new_world_is_just_a_registered_renderer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A world is a registered renderer returning sidecars; nothing else changes (the real "action"
    world is tested in test_sample_world_action.py). Its signals' statistics land in the manifest."""

    def render_toy(rng: np.random.Generator, spec: sw.WorldSpec) -> sw.Episode:
        ep = render_general(rng, spec)
        actions = rng.normal(size=(spec.num_frames - 1, 2)).astype(np.float32)
        return sw.Episode(frames=ep.frames, caption=ep.caption, meta=ep.meta, sidecars={"actions.npy": actions})

    sw.WORLDS.names()  # discover the tasks' worlds first
    monkeypatch.setitem(sw.WORLDS._items, "toy", sw.World("toy", render_toy, sidecars={"actions.npy": "transitions"}))
    out = sw.generate(tmp_path / "toy", **{**SMALL, "num_videos": 2, "variant": "toy"})
    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "actions.npy"))
    rows = [np.load(io.BytesIO(index.read(i, "actions.npy"))) for i in range(2)]
    assert rows[0].shape == (8, 2) and rows[0].dtype == np.float32
    meta = json.loads(index.read(0, "json"))
    assert meta["variant"] == "toy" and (meta["seed"], meta["index"]) == (3, 0)  # records_origin
    stats = read_manifest(out)["extra"]["sidecars"]["actions.npy"]
    allrows = np.concatenate(rows).astype(np.float64)
    assert stats["kind"] == "transitions" and stats["count"] == 16 and stats["shape"] == [2]
    np.testing.assert_allclose(stats["mean"], allrows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], allrows.std(0), rtol=1e-12)
    from nemo_ext.data.signals import signal_stats

    assert signal_stats(out, "actions.npy") == stats and signal_stats(out, "states.npy") is None


def test_an_outdated_world_is_regenerated_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipes' own data/sample/ worlds follow the code (regenerate_outdated); an explicit directory
    of another version is refused, like any other parameter."""
    out = sw.generate(tmp_path / "w", **{**SMALL, "num_videos": 2})
    monkeypatch.setattr(sw, "GENERATOR_VERSION", sw.GENERATOR_VERSION + 1)
    with pytest.raises(ValueError, match="generator_version"):
        sw.generate(out, **{**SMALL, "num_videos": 2})
    sw.generate(out, **{**SMALL, "num_videos": 2}, regenerate_outdated=True)
    assert read_manifest(out)["extra"]["params"]["generator_version"] == sw.GENERATOR_VERSION


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nemo_ext.cli import prep

    with pytest.raises(SystemExit) as exit_:
        prep.main(["sample", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--variant", "--num-videos", "--num-frames", "--height", "--width", "--fps",
                 "--seed", "--workers"):
        assert flag in help_text
    out = tmp_path / "cli"
    assert prep.main(["sample", "--out", str(out), "--num-videos", "2", "--num-frames", "9",
                      "--height", "32", "--width", "32"]) == 0
    assert read_manifest(out)["num_samples"] == 2
    clip = decode_frames(ShardIndex.from_paths(out).read(1, "mp4"), 0, 9)
    assert clip.shape == (9, 32, 32, 3)
