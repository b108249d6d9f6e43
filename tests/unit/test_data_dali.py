"""The DALI training loader on CPU (VP9 fixtures): content, PyAV agreement, DP split, resume,
sidecars, and recovery from corrupt videos."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nemo_ext.data.dali import DaliVideoLoader  # noqa: E402
from nemo_ext.data.dataset import VideoClipDataset  # noqa: E402
from nemo_ext.data.shards import ShardError, ShardIndex, ShardWriter  # noqa: E402
from nemo_ext.data.video import VideoDecodeError, encode_video, probe_video  # noqa: E402

MARK = 20  # marker block: rows/cols [0, MARK) of every stored frame


def marker_video(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients and a moving coloured square (what real clips look like more than
    noise does), plus a grey marker block at the top left whose level 10 + 7*i encodes frame i
    (never black, so black means letterbox border)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([40 + 150 * x / w, 60 + 120 * y / h, np.full((h, w), 90.0 + 60 * rng.random())], -1)
    frames = np.repeat(base[None], n, 0)
    size = max(h, w) // 5
    cy, cx = rng.integers(MARK, h - size), rng.integers(MARK, w - size)
    colour = rng.integers(0, 256, 3)
    for i in range(n):
        top = MARK + (cy - MARK + 2 * i) % (h - size - MARK)
        frames[i, top:top + size, cx:cx + size] = colour
        frames[i, :MARK, :MARK] = 10 + 7 * i
    return frames.round().clip(0, 255).astype(np.uint8)


def corrupt(data: bytes, how: str) -> bytes:
    """``midstream``: header and moov intact, most of the frame data zeroed; ``truncated``: the
    first 40% only (no moov atom)."""
    if how == "truncated":
        return data[: int(len(data) * 0.4)]
    start, end = data.find(b"mdat") + 4, data.find(b"moov")
    assert 0 < start < end, "expected an mp4 with mdat before moov"
    a, b = start + (end - start) // 10, start + (end - start) * 9 // 10
    return data[:a] + bytes(b - a) + data[b:]


def write_shards(out: Path, samples: list[dict[str, Any]], max_count: int = 4) -> Path:
    """Each sample: key, n (frames), optional h, w, codec, bad (corrupt mode), drop (member to
    leave out), extra (more members)."""
    with ShardWriter(out, max_count=max_count) as writer:
        for i, s in enumerate(samples):
            n, h, w = s["n"], s.get("h", 64), s.get("w", 64)
            video = encode_video(marker_video(n, h, w, seed=i), fps=8, codec=s.get("codec", "vp9"))
            if s.get("bad"):
                video = corrupt(video, s["bad"])
                with pytest.raises(VideoDecodeError):
                    probe_video(video)  # the fixture really is broken
            members = {"__key__": s["key"], "mp4": video,
                       "json": {"caption": f"caption of {s['key']}", "fps": 8.0, "num_frames": n},
                       "nframes.npy": np.array([n], np.int32), **s.get("extra", {})}
            members.pop(s.get("drop", ""), None)
            writer.write(members)
    return out


def markers(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> marker grey level per frame (centre of the scaled block)."""
    return ((video[:, :, 1:4, 1:4].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def frame_ids(video: torch.Tensor) -> np.ndarray:
    """Source frame index per frame, from the markers."""
    return (markers(video) - 10) / 7


def take(loader: DaliVideoLoader, n: int) -> list[dict[str, Any]]:
    return [next(loader) for _ in range(n)]


def loader(shards: Any, **kw: Any) -> DaliVideoLoader:
    args: dict[str, Any] = dict(num_frames=9, height=32, width=32, micro_batch_size=2, dp_rank=0,
                                dp_size=1, seed=0, num_threads=1, initial_fill=4)
    args.update(kw)
    return DaliVideoLoader(shards, **args)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 good samples over 3 shards; s003 is 48x64, s004 is 64x48, s005 has 17 frames."""
    out = tmp_path_factory.mktemp("clean")
    sizes = {3: (48, 64), 4: (64, 48)}
    return write_shards(out, [{"key": f"s{i:03d}", "n": 17 if i == 5 else 25,
                               "h": sizes.get(i, (64, 64))[0], "w": sizes.get(i, (64, 64))[1]}
                              for i in range(10)])


def test_batch_fields_and_frame_exact_content(clean: Path) -> None:
    with loader(clean, stride=2, clip_sampling="start", shuffle=False, micro_batch_size=3) as dl:
        assert dl.num_samples == 10 and dl.samples_per_epoch == 10
        b = next(dl)
        assert b["video"].shape == (3, 3, 9, 32, 32) and b["video"].dtype == torch.float32
        assert not b["video"].is_cuda and -1.0 <= b["video"].min() and b["video"].max() <= 1.0
        assert b["key"] == ["s000", "s001", "s002"]
        assert b["caption"] == ["caption of s000", "caption of s001", "caption of s002"]
        assert b["fps"].dtype == torch.float32 and b["fps"].tolist() == [8.0] * 3
        assert b["num_frames_total"].dtype == torch.int64 and b["num_frames_total"].tolist() == [25] * 3
        assert b["sample_seed"].dtype == torch.int64 and len(set(b["sample_seed"].tolist())) == 3
        assert b["failed_samples"].tolist() == [0, 0, 0]
        for v in b["video"]:
            np.testing.assert_allclose(markers(v), 10 + 7 * np.arange(0, 18, 2), atol=3)


def test_random_clip_starts_are_uniform_in_range_and_seeded(clean: Path) -> None:
    seen: dict[str, set[int]] = {}
    runs = []
    for _ in range(2):
        with loader(clean, stride=3, num_frames=5, shuffle=False, micro_batch_size=5) as dl:
            batches = take(dl, 4)  # two epochs
        runs.append(batches)
        for b in batches:
            for key, v, n in zip(b["key"], b["video"], b["num_frames_total"].tolist()):
                ids = frame_ids(v)
                start = int(round(ids[0]))
                np.testing.assert_allclose(ids, start + 3 * np.arange(5), atol=0.45)
                assert 0 <= start <= n - 13
                seen.setdefault(key, set()).add(start)
    assert sum(len(s) for s in seen.values()) > len(seen)  # starts differ between epochs
    for a, b in zip(*runs):  # same seed: same clips
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_matches_the_pyav_loader(clean: Path, mode: str) -> None:
    """Same samples and starts: DALI's CPU decode + resize agree with the PyAV path up to colour
    conversion rounding (measured: mean |diff| 0.006-0.010 per clip on the [-1, 1] scale, about
    one grey level), with the same frames and the same geometry (identical letterbox borders)."""
    ds = VideoClipDataset(ShardIndex.from_paths(clean), num_frames=9, height=32, width=32,
                          clip_sampling="start", resize_mode=mode)
    ref = {ds.index.key(i): ds[(i, 0)]["video"] for i in range(len(ds))}
    with loader(clean, clip_sampling="start", resize_mode=mode, shuffle=False, micro_batch_size=5) as dl:
        got = {k: v for b in take(dl, 2) for k, v in zip(b["key"], b["video"])}
    assert got.keys() == ref.keys()
    diffs = []
    for key in ref:
        diff = (got[key] - ref[key]).abs()
        diffs.append(float(diff.mean()))
        assert float(diff.mean()) < 0.03, key
        assert torch.equal(got[key] == -1, ref[key] == -1) or mode == "crop"  # borders
        if mode == "crop" or key not in ("s003", "s004"):  # letterboxed: the marker moved
            for v in (got[key], ref[key]):
                np.testing.assert_allclose(markers(v), 10 + 7 * np.arange(9), atol=3)
    print(f"DALI vs PyAV ({mode}): mean |diff| per clip {min(diffs):.4f}..{max(diffs):.4f}")


def test_dp_ranks_split_every_epoch(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [{"key": f"k{i}", "n": 9} for i in range(7)], max_count=3)
    for shuffle in (False, True):
        per_rank = []
        for rank in range(2):
            with loader(shards, dp_rank=rank, dp_size=2, shuffle=shuffle, num_frames=3,
                        height=16, width=16) as dl:
                want = dl.samples_per_epoch
                keys: list[str] = []
                while len(keys) < want:
                    keys += next(dl)["key"]
                per_rank.append(keys[:want])
        assert sorted(len(k) for k in per_rank) == [3, 4]
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == {f"k{i}" for i in range(7)}


def test_resume_gives_the_same_next_batches(clean: Path) -> None:
    """N micro-batches, save, M more; a new loader from the state yields the same M (keys and
    pixels), across the epoch boundary, although the saved loader had already read ahead."""
    with loader(clean, micro_batch_size=3, initial_fill=8) as dl:
        take(dl, 2)
        state = dl.state_dict()
        expected = take(dl, 4)
    with loader(clean, micro_batch_size=3, initial_fill=8, state=state) as dl:
        resumed = take(dl, 4)
    for a, b in zip(expected, resumed):
        assert a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"])
        assert torch.equal(a["sample_seed"], b["sample_seed"])
    with pytest.raises(ValueError, match="dp_rank: saved 0, now 1"):
        loader(clean, micro_batch_size=3, initial_fill=8, state=state, dp_rank=1, dp_size=2)


def test_sidecars_are_cut_to_the_clip(tmp_path: Path) -> None:
    n = 17

    def extra(i: int) -> dict[str, np.ndarray]:
        return {"actions.npy": (100 * i + np.arange(n - 1, dtype=np.float32))[:, None].repeat(2, 1),
                "poses.npy": 100 * i + np.arange(n, dtype=np.int64),
                "intrinsics.npy": np.full((3, 3), i, np.float32)}

    shards = write_shards(tmp_path / "ok", [{"key": f"a{i}", "n": n, "extra": extra(i)} for i in range(3)])
    kinds = {"actions.npy": "transitions", "poses.npy": "frames", "intrinsics.npy": "static"}
    with loader(shards, sidecars=kinds, micro_batch_size=3, num_frames=5, shuffle=False) as dl:
        b = next(dl)
    assert b["actions"].shape == (3, 4, 2) and b["poses"].shape == (3, 5)
    assert b["intrinsics"].shape == (3, 3, 3)
    for i, v in enumerate(b["video"]):
        start = int(round(frame_ids(v)[0]))
        assert b["poses"][i].tolist() == [100 * i + start + k for k in range(5)]
        assert b["actions"][i, :, 0].tolist() == [100 * i + start + k for k in range(4)]
        assert torch.all(b["intrinsics"][i] == i)
    with loader(shards, sidecars={"poses.npy": "frames"}, stride=2, num_frames=5, shuffle=False,
                micro_batch_size=3, clip_sampling="start") as dl:
        assert next(dl)["poses"][1].tolist() == [100, 102, 104, 106, 108]

    with pytest.raises(ValueError, match="transition"):
        loader(shards, sidecars=kinds, stride=2)
    bad = extra(1)
    bad["actions.npy"] = bad["actions.npy"][:-3]
    shards = write_shards(tmp_path / "bad", [{"key": "b0", "n": n, "extra": extra(0)},
                                             {"key": "b1", "n": n, "extra": bad}])
    with loader(shards, sidecars=kinds, num_frames=5, shuffle=False) as dl:
        with pytest.raises(ShardError, match=r"shard-000000\.tar.*b1\.actions\.npy.*expected 16 rows"):
            next(dl)


@pytest.mark.parametrize("how", ["midstream", "truncated"])
def test_corrupt_video_is_skipped_and_resumable(tmp_path: Path, how: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    keys = [f"c{i}" for i in range(8)]
    shards = write_shards(tmp_path, [{"key": k, "n": 17, "bad": how if k == "c5" else None} for k in keys])
    kw: dict[str, Any] = dict(num_frames=5, clip_sampling="start", shuffle=False, micro_batch_size=2,
                              max_failed_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="nemo_ext.data.dali"):
        with loader(shards, **kw) as dl:
            batches = take(dl, 2)
            state = dl.state_dict()  # before the failure: c4 c5 is the next micro-batch
            batches += take(dl, 4)
            state_after = dl.state_dict()
            more = take(dl, 2)
            assert dl.failed_samples == 1 and dl.failed_keys == ["c5"] and dl.samples_per_epoch == 7
    got = [k for b in batches for k in b["key"]]
    assert got == ["c0", "c1", "c2", "c3", "c4", "c6", "c7", "c0", "c1", "c2", "c3", "c4"]
    assert [int(b["failed_samples"].sum()) for b in batches] == [0, 0, 1, 0, 0, 0]
    warning = [r.getMessage() for r in caplog.records if "c5" in r.getMessage()]
    assert len(warning) == 1 and "shard-000001.tar" in warning[0] and "c5.mp4" in warning[0]
    # resuming from before the failure meets (and skips) it again; from after it, it stays excluded
    with loader(shards, **kw, state=state) as dl:
        assert [k for b in take(dl, 4) for k in b["key"]] == got[4:]
        assert dl.failed_keys == ["c5"]
    with loader(shards, **kw, state=state_after) as dl:
        again = take(dl, 2)
        assert dl.excluded == [(1, "c5")] and dl.failed_samples == 1
    for a, b in zip(more, again):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])


def test_too_many_failures_stop_the_run(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [{"key": f"t{i}", "n": 17, "bad": "midstream" if i in (1, 2) else None}
                                     for i in range(6)])
    with loader(shards, num_frames=5, shuffle=False, max_failed_samples=1, max_failed_fraction=1.0) as dl:
        with pytest.raises(RuntimeError, match=r"max_failed_samples=1.*t1, t2"):
            take(dl, 3)
    with loader(shards, num_frames=5, shuffle=False, max_failed_fraction=0.2) as dl:
        dl.min_samples_for_fraction = 1
        with pytest.raises(RuntimeError, match=r"max_failed_fraction=0.2.*t1"):
            take(dl, 3)


def test_h264_on_cpu_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [{"key": "v0", "n": 9}, {"key": "h1", "n": 9, "codec": "h264"}])
    with loader(shards, num_frames=5, shuffle=False) as dl:
        expected = r'shard-000000\.tar.*h1\.mp4 is h264.*VP9/VP8/MJPEG only.*device="gpu"'
        with pytest.raises(ValueError, match=expected):
            next(dl)
        assert dl.failed_samples == 0


def test_missing_member_names_shard_and_key(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [{"key": "m0", "n": 9}, {"key": "m1", "n": 9, "drop": "nframes.npy"}])
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 'm1' is missing nframes\.npy"):
        loader(shards)


def test_shard_resolution(clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ShardError, match="empty"):
        loader([])
    with pytest.raises(ShardError, match=r"nothing-\*\.tar"):
        loader(str(tmp_path / "nothing-*.tar"))
    # brace pattern + a shard without its .idx: the index is built in a temp dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in sorted(clean.glob("shard-00000[01].*")):
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "shard-000001.idx").unlink()
    with caplog.at_level(logging.WARNING, logger="nemo_ext.data.dali"):
        with loader(str(copy / "shard-{000000..000001}.tar"), shuffle=False, micro_batch_size=8) as dl:
            assert sorted(next(dl)["key"]) == [f"s{i:03d}" for i in range(8)]
    assert any("no index file" in r.getMessage() for r in caplog.records)


# What DALI 2.4's NVDEC decoder ("mixed") raised on an H200 for a 64x64 VP9 video.
NVDEC_TOO_SMALL = (
    'Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.video`,\nencountered:\n\n'
    'Assert on "width >= caps.nMinWidth && height >= caps.nMinHeight" failed: Video is too small in at '
    'least one dimension. Provided: 64x64 vs supported:128x128\nC++ context: '
    '[/opt/dali/dali/operators/video/frames_decoder_gpu.cc:179] \n'
    'Current pipeline object is no longer valid.')


class _FailingDecoder:
    """Stands in for the decode pipeline: every run fails as NVDEC does on a too-small video."""

    def feed_input(self, *args: Any) -> None:
        pass

    def schedule_run(self) -> None:
        pass

    def outputs(self) -> None:
        raise RuntimeError(NVDEC_TOO_SMALL)

    run = outputs


def test_decoder_limit_is_a_configuration_error_not_corruption(clean: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DaliVideoLoader, "_build_decoder", lambda self, batch_size: _FailingDecoder())
    expected = r"shard-000000\.tar: member s000\.mp4 \(vp9, 64x64\).*too small.*not a corrupt file"
    with loader(clean, shuffle=False) as dl:
        with pytest.raises(ValueError, match=expected):
            next(dl)
        assert dl.failed_samples == 0 and dl.excluded == []


def test_auto_backend_uses_dali_wherever_it_can_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.backend=auto: DALI on GPU and for CPU-decodable codecs; PyAV for H.264 on CPU, for VP9 below
    NVDEC's minimum size on GPU (the sample worlds) or without DALI installed, with the reason."""
    import importlib.util
    from types import SimpleNamespace

    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.training.data import source_codec, video_backend

    vp9 = write_shards(tmp_path / "vp9", [{"key": "a", "n": 9}])
    h264 = write_shards(tmp_path / "h264", [{"key": "b", "n": 9, "codec": "h264"}])
    with ShardWriter(tmp_path / "declared", max_count=4) as writer:  # the json's codec field is trusted
        writer.write({"__key__": "c", "mp4": encode_video(marker_video(9), fps=8, codec="vp9"),
                      "json": {"caption": "", "fps": 8.0, "codec": "mjpeg"}, "nframes.npy": np.array([9], np.int32)})
    assert (source_codec(vp9), source_codec(h264), source_codec(tmp_path / "declared")) == ("vp9", "h264", "mjpeg")

    def cfg(*overrides: str) -> Any:
        return to_typed(compose("general", "diffusion", list(overrides)))

    cpu, gpu = SimpleNamespace(device="cpu"), SimpleNamespace(device="cuda")
    assert video_backend(cfg(f"data.path={vp9}"), cpu)[0] == "dali"
    mixed = cfg(f"data.sources=[{{name:web,path:'{vp9}'}},{{name:robot,path:'{h264}'}}]")
    backend, why = video_backend(mixed, cpu)
    assert backend == "pyav" and "'robot' holds h264" in why, why
    backend, why = video_backend(mixed, gpu)  # the test videos are 64x64 VP9: NVDEC refuses them
    assert backend == "pyav" and "'web' holds" in why and "below NVDEC's VP9 minimum of 128x128" in why, why
    assert video_backend(cfg(f"data.path={h264}"), gpu) == ("dali", "GPU run: NVDEC decodes")
    assert video_backend(cfg(f"data.path={vp9}", "data.backend=pyav"), cpu) == ("pyav", "data.backend=pyav")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("nvidia") else real(name, *a))
    backend, why = video_backend(cfg(f"data.path={vp9}"), gpu)
    assert backend == "pyav" and "not installed" in why
