"""Shard writing (rollover, atomic rename, DALI index), random-access reading and manifests."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nemo_ext.data.shards import (
    ShardError,
    ShardIndex,
    ShardWriter,
    read_idx,
    read_manifest,
    write_manifest,
)


def make_sample(i: int, payload: int = 300) -> dict:
    rng = np.random.default_rng(i)
    return {
        "__key__": f"sample_{i:06d}",
        "mp4": rng.bytes(payload + 37 * i),  # stands in for video bytes; odd sizes test padding
        "json": {"caption": f"caption {i}", "fps": 8.0, "num_frames": 17},
        "nframes.npy": np.array([17 + i], dtype=np.int32),
    }


def write_shards(out: Path, n: int, payload: int = 300, **kw) -> list:
    with ShardWriter(out, **kw) as writer:
        for i in range(n):
            writer.write(make_sample(i, payload))
    return writer.shards


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each member, straight from Python's tarfile."""
    with tarfile.open(path) as tf:
        return [(m.name, m.offset_data, m.size) for m in tf.getmembers()]


def test_rollover_by_count(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 7, max_count=3)
    assert [s.num_samples for s in shards] == [3, 3, 1]
    assert [s.path.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"shard-00000{i}.{e}" for i in range(3) for e in ("tar", "idx")])
    for s in shards:
        assert s.num_bytes == s.path.stat().st_size
        assert s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
    assert [m[0] for m in tar_members(shards[2].path)] == [
        "sample_000006.json", "sample_000006.mp4", "sample_000006.nframes.npy"]


def test_rollover_by_bytes(tmp_path: Path) -> None:
    # each sample takes ~6.6 KiB of tar blocks: two fit in a 20 KiB file (10 KiB tar records), three do not
    shards = write_shards(tmp_path, 5, payload=5000, max_count=100, max_bytes=20480, prefix="part")
    assert [s.num_samples for s in shards] == [2, 2, 1]
    assert all(s.num_bytes <= 20480 for s in shards)
    assert shards[0].path.name == "part-000000.tar"


def test_oversized_sample_gets_its_own_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_bytes=12000) as writer:
        writer.write(make_sample(0, payload=100))
        writer.write(make_sample(1, payload=50_000))
        writer.write(make_sample(2, payload=100))
    assert [s.num_samples for s in writer.shards] == [1, 1, 1]


def test_unfinished_shard_is_never_a_tar(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_count=10)
    writer.write(make_sample(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar.partial"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.idx", "shard-000000.tar"]

    # an exception while writing drops the unfinished shard, keeps the finished ones
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, max_count=2) as w:
            for i in range(3):
                w.write(make_sample(i))
            raise RuntimeError("simulated crash")
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.idx", "shard-000000.tar"]


def test_writer_is_deterministic(tmp_path: Path) -> None:
    a = write_shards(tmp_path / "a", 4, max_count=2)
    b = write_shards(tmp_path / "b", 4, max_count=2)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]


def test_writer_rejects_bad_keys(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="without dots"):
            w.write({"__key__": "a.b", "json": {}})
        w.write(make_sample(0))
        with pytest.raises(ValueError, match="duplicate sample key"):
            w.write(make_sample(0))


def test_idx_matches_tarfile_offsets(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 5, max_count=5)
    tar, idx = shards[0].path, shards[0].path.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    assert lines[0] == "v1.2 5"
    assert len(lines) == 6
    expected = tar_members(tar)
    parsed = [(name, off, size) for sample in read_idx(idx) for _ext, off, size, name in sample]
    assert parsed == expected
    # one line per sample, members as "<ext> <offset> <size> <name>"
    first = lines[1].split(" ")
    assert first[0::4] == ["json", "mp4", "nframes.npy"]
    assert first[3::4] == ["sample_000000.json", "sample_000000.mp4", "sample_000000.nframes.npy"]
    # offsets point at member data: the bytes there are what was written
    data = tar.read_bytes()
    _, off, size, _ = read_idx(idx)[3][1]
    assert data[off:off + size] == make_sample(3)["mp4"]


def test_idx_is_what_dali_wds2idx_writes(tmp_path: Path) -> None:
    wds2idx = pytest.importorskip("wds2idx")
    shards = write_shards(tmp_path, 4)
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(shards[0].path), str(ref), verbose=False) as creator:
        creator.create_index()
    assert shards[0].path.with_suffix(".idx").read_text() == ref.read_text()


def test_index_reads_back_what_was_written(tmp_path: Path) -> None:
    write_shards(tmp_path, 7, max_count=3)
    for spec in (tmp_path, str(tmp_path / "shard-*.tar"), str(tmp_path / "shard-{000000..000002}.tar"),
                 [tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar", tmp_path / "shard-000002.tar"]):
        index = ShardIndex.from_paths(spec, required_exts=("mp4", "json"))
        assert [index.key(i) for i in range(len(index))] == [f"sample_{i:06d}" for i in range(7)]
    for i in range(7):
        s = make_sample(i)
        assert index.read(i, "mp4") == s["mp4"]
        assert json.loads(index.read(i, "json")) == s["json"]
        assert int(np.load(io.BytesIO(index.read(i, "nframes.npy")))[0]) == 17 + i
    assert index.has(0, "nframes.npy") and not index.has(0, "actions.npy")
    with pytest.raises(ShardError, match=r"sample_000002.*no 'actions.npy' member.*json, mp4, nframes.npy"):
        index.read(2, "actions.npy")


def test_index_without_idx_scans_the_tar(tmp_path: Path) -> None:
    write_shards(tmp_path, 5, max_count=3)
    with_idx = ShardIndex.from_paths(tmp_path)
    for idx in tmp_path.glob("*.idx"):
        idx.unlink()
    scanned = ShardIndex.from_paths(tmp_path)
    assert scanned.samples == with_idx.samples
    assert scanned.read(4, "mp4") == make_sample(4)["mp4"]


def test_missing_required_ext_names_shard_key_and_exts(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        w.write(make_sample(0))
        w.write({"__key__": "broken", "json": {"caption": "no video"}})
    with pytest.raises(ShardError) as err:
        ShardIndex.from_paths(tmp_path, required_exts=("mp4", "json"))
    msg = str(err.value)
    assert str(tmp_path / "shard-000000.tar") in msg
    assert "'broken'" in msg and "missing mp4" in msg and "it has: json" in msg


def test_empty_and_missing_shard_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match=r"no shards match the pattern '.*empty/\*\.tar'"):
        ShardIndex.from_paths(str(empty / "*.tar"))
    with pytest.raises(ShardError, match=f"directory {empty}.*no \\*.tar"):
        ShardIndex.from_paths(empty)
    with pytest.raises(ShardError, match="list of shard paths/patterns is empty"):
        ShardIndex.from_paths([])
    missing = tmp_path / "nope-000000.tar"
    with pytest.raises(ShardError, match=f"shard {missing} does not exist"):
        ShardIndex.from_paths(missing)


def test_unreadable_and_stale_shards(tmp_path: Path) -> None:
    bad = tmp_path / "bad-000000.tar"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ShardError, match=f"cannot read shard {bad}"):
        ShardIndex.from_paths(bad)
    good = write_shards(tmp_path / "good", 3)[0].path
    good.write_bytes(good.read_bytes()[:4096])  # truncated after its index was written
    with pytest.raises(ShardError, match="does not match shard"):
        ShardIndex.from_paths(good)


def _read_in_child(index: ShardIndex, queue) -> None:
    import os

    queue.put((index.read(1, "mp4"), index._pid == os.getpid()))


def test_reads_after_fork_and_pickle(tmp_path: Path) -> None:
    write_shards(tmp_path, 3)
    index = ShardIndex.from_paths(tmp_path)
    assert index.read(0, "mp4") == make_sample(0)["mp4"]  # parent opens its descriptor first
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(index, queue))
    proc.start()
    data, reopened = queue.get(timeout=30)
    proc.join(timeout=30)
    assert data == make_sample(1)["mp4"] and reopened
    clone = pickle.loads(pickle.dumps(index))
    assert clone.read(2, "json") == index.read(2, "json")


def test_manifest_round_trip(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 5, max_count=2)
    path = write_manifest(tmp_path, shards, extra={"params": {"seed": 3}})
    assert path == tmp_path / "manifest.json"
    m = read_manifest(tmp_path)
    assert [s["path"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [2, 2, 1]
    assert m["num_samples"] == 5 and m["num_shards"] == 3
    assert m["num_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    assert m["shards"][1]["sha256"] == hashlib.sha256((tmp_path / "shard-000001.tar").read_bytes()).hexdigest()
    assert m["extra"] == {"params": {"seed": 3}}
    assert read_manifest(path) == m
    with pytest.raises(ShardError, match="no manifest at"):
        read_manifest(tmp_path / "elsewhere")


def test_dali_reads_our_shards_with_our_index(tmp_path: Path) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    shards = write_shards(tmp_path, 5, max_count=3)
    tars = [str(s.path) for s in shards]
    idxs = [str(s.path.with_suffix(".idx")) for s in shards]

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        meta, video, nframes = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["json", "mp4", "nframes.npy"],
            missing_component_behavior="error", random_shuffle=False, name="reader")
        return meta, video, fn.decoders.numpy(nframes)

    p = pipe()
    p.build()
    meta, video, nframes = p.run()
    assert dali.__version__
    for i in range(5):
        s = make_sample(i)
        assert json.loads(bytes(np.array(meta[i]))) == s["json"]
        assert bytes(np.array(video[i])) == s["mp4"]
        assert int(np.array(nframes[i])[0]) == 17 + i
