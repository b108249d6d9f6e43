"""Data prep from a folder of captioned videos: clips, rejects, resume, determinism, CLI, Makefile.

Fixture videos are made at test time with ``encode_video``. Frame i of every fixture is a uniform
gray of value ``20 + 5 * i``, so the source frame behind any output frame can be read back after
re-encoding, resizing and cropping (and padding shows as black borders). Each RGB -> yuv420p ->
RGB round trip lowers a gray by 0..1, so two of them (source, clip) stay within [-2, 0].
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep import clips as cl
from data_prep.clips import ClipSpec, PrepError, ShardLayout
from data_prep.videos import collect_videos, match_captions, prepare_videos, read_captions
from nemo_ext.cli import prep as prep_cli
from nemo_ext.data.shards import ShardIndex, read_manifest
from nemo_ext.data.video import decode_frames, encode_video, probe_video

REPO = Path(__file__).resolve().parents[2]
EXTS = ("mp4", "json", "nframes.npy")
SPEC = ClipSpec(clip_frames=9, height=32, width=32, codec="vp9")
GOOD = {"a.mp4": "a red ball rolls", "sub/b.mkv": "a blue box", "sub/deep/c.mp4": "a green cone"}
BAD = ("bad.mp4", "empty.mp4", "faststart_trunc.mp4", "nocap.mp4", "short.mp4", "trunc.mp4")


def marked(n: int, h: int, w: int) -> np.ndarray:
    values = (20 + 5 * np.arange(n)).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(values[:, None, None, None], (n, h, w, 3)))


def markers(mp4: bytes) -> list[int]:
    """The source frame index each frame of ``mp4`` shows (read from its center)."""
    info = probe_video(mp4)
    frames = decode_frames(mp4, 0, info.num_frames)
    h, w = frames.shape[1:3]
    center = frames[:, h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].reshape(len(frames), -1).mean(axis=1)
    return [int(round((v + 1 - 20) / 5)) for v in center]  # +1: centers the [-2, 0] error


def faststart_mp4(path: Path, frames: np.ndarray, fps: int) -> bytes:
    """An mp4 with its index (moov) first: truncating it keeps the declared frame count."""
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path.read_bytes()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.mp4").write_bytes(encode_video(marked(48, 64, 96), 24, codec="vp9"))
    (root / "sub" / "b.mkv").write_bytes(encode_video(marked(40, 48, 64), 10, codec="h264", container="matroska"))
    (root / "sub" / "deep" / "c.mp4").write_bytes(encode_video(marked(20, 48, 64), 10, codec="h264"))
    (root / "bad.mp4").write_bytes(bytes(range(256)) * 20)  # garbage
    (root / "empty.mp4").write_bytes(b"")
    (root / "short.mp4").write_bytes(encode_video(marked(5, 48, 64), 10, codec="vp9"))
    (root / "nocap.mp4").write_bytes(encode_video(marked(12, 48, 64), 10, codec="vp9"))
    whole = encode_video(marked(40, 48, 64), 10, codec="vp9")
    (root / "trunc.mp4").write_bytes(whole[: len(whole) // 2])
    fs = faststart_mp4(tmp_path_factory.mktemp("fs") / "fs.mp4", marked(40, 48, 64), 10)
    with av.open(io.BytesIO(fs)) as c:  # cut right before packet 24: 24 frames decode, 40 declared
        cut = [p.pos for p in c.demux(c.streams.video[0]) if p.size][24]
    (root / "faststart_trunc.mp4").write_bytes(fs[:cut])
    (root / "notes.txt").write_text("not a video")
    rows = ["video,caption,extra"]
    rows += ["a.mp4,a red ball rolls,1", "b.mkv,a blue box,2",  # bare file name, unique under RAW
             "sub/deep/c.mp4,a green cone,3"]
    rows += [f"{name},caption of {name},0" for name in BAD if name != "nocap.mp4"]
    rows += ["missing.mp4,a video that is not there,0"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def run(raw: Path, out: Path, spec: ClipSpec = SPEC, **kw) -> cl.PrepResult:
    kw.setdefault("layout", ShardLayout(videos_per_unit=3))
    return prepare_videos(raw, out, spec, kw.pop("layout"), captions=raw / "captions.csv", progress=False, **kw)


@pytest.fixture(scope="module")
def out1(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out1")
    run(raw, out, workers=1)
    return out


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------------------------


def test_shards_hold_one_captioned_clip_per_good_video(out1: Path) -> None:
    index = ShardIndex.from_paths(out1, required_exts=EXTS)
    seen = {}
    for i in range(len(index)):
        key = index.key(i)
        meta = json.loads(index.read(i, "json"))
        assert re.fullmatch(r"[A-Za-z0-9_-]+_[0-9a-f]{8}_c\d+", key) and "." not in key
        assert key == cl.clip_key(meta["source"], meta["clip_index"])
        info = probe_video(index.read(i, "mp4"))
        assert (info.num_frames, info.height, info.width, info.codec) == (9, 32, 32, "vp9")
        assert int(np.load(io.BytesIO(index.read(i, "nframes.npy")))[0]) == 9
        assert (meta["num_frames"], meta["height"], meta["width"], meta["clip_index"]) == (9, 32, 32, 0)
        assert meta["start_frame"] == 0 and meta["fps"] == meta["source_fps"]
        seen[meta["source"]] = (meta["caption"], meta["fps"])
        assert markers(index.read(i, "mp4")) == list(range(9))
    assert seen == {"a.mp4": ("a red ball rolls", 24.0), "sub/b.mkv": ("a blue box", 10.0),
                    "sub/deep/c.mp4": ("a green cone", 10.0)}


def test_report_and_manifest_account_for_every_input(out1: Path) -> None:
    lines = [json.loads(x) for x in (out1 / "report.jsonl").read_text().splitlines()]
    reasons = {x["video"]: x["reason"] for x in lines}
    assert len(lines) == len(reasons) == len(BAD) + 1  # one line per bad video + the orphan caption row
    assert "line 10: no such video" in reasons["missing.mp4"]
    assert "no caption" in reasons["nocap.mp4"]
    assert "empty" in reasons["empty.mp4"]
    assert "cannot open" in reasons["bad.mp4"] and "cannot open" in reasons["trunc.mp4"]
    assert "decoded 24 frames, the container declares 40" in reasons["faststart_trunc.mp4"]
    assert "too short: 5 frames" in reasons["short.mp4"]
    m = read_manifest(out1)
    extra = m["extra"]
    assert (extra["num_videos"], extra["num_videos_ok"], extra["num_rejected"], extra["num_clips"]) == (9, 3, 6, 3)
    assert extra["num_source_issues"] == 1 and m["num_samples"] == 3
    assert extra["params"]["clip_frames"] == 9 and extra["params"]["codec"] == "vp9"
    assert extra["params"]["videos_per_unit"] == 3 and extra["source"] == "videos"
    # units of 3 sorted inputs; a unit whose videos are all rejected writes no shard
    assert sorted(p.name for p in out1.glob("unit-*.done.json")) == [f"unit-{u:06d}.done.json" for u in range(3)]
    assert [s["path"] for s in m["shards"]] == ["shard-000000-000000.tar", "shard-000002-000000.tar"]


def test_resample_indices_and_clip_starts() -> None:
    assert cl.resample_indices(48, 24, 10) == [round(i * 2.4 + 1e-9) for i in range(20)]
    assert cl.resample_indices(48, 24, 10)[:9] == [0, 2, 5, 7, 10, 12, 14, 17, 19]
    assert cl.resample_indices(5, 10, None) == [0, 1, 2, 3, 4]
    up = cl.resample_indices(10, 10, 20)  # never longer than the source
    assert len(up) == 10 and up[:4] == [0, 1, 1, 2]
    assert cl.clip_starts(48, 9, 0) == [0, 9, 18, 27, 36]
    assert cl.clip_starts(48, 9, 1) == [0]
    assert cl.clip_starts(48, 9, 2) == [0, 39]
    assert cl.clip_starts(48, 9, 3) == [0, 19, 39]
    assert cl.clip_starts(48, 9, 99) == cl.clip_starts(48, 9, 5)  # capped at what fits
    assert cl.clip_starts(8, 9, 1) == []
    for n, k in [(100, 7), (50, 3), (27, 3)]:
        s = cl.clip_starts(n, 9, k)
        assert all(b - a >= 9 for a, b in zip(s, s[1:])) and s[-1] + 9 <= n
    with pytest.raises(PrepError, match="1 \\+ 8k"):
        ClipSpec(clip_frames=10, height=32, width=32)
    with pytest.raises(PrepError, match="multiple of 16"):
        ClipSpec(clip_frames=9, height=40, width=32)


def test_fps_resampling_takes_the_nearest_source_frames(raw: Path) -> None:
    data = (raw / "a.mp4").read_bytes()  # 48 frames at 24 fps -> 20 frames at 10 fps -> 2 clips
    ex = cl.extract_clips(data, ClipSpec(clip_frames=9, height=32, width=32, fps=10, clips_per_video=0, codec="vp9"))
    assert (ex.source_fps, ex.fps, ex.source_num_frames) == (24.0, 10.0, 48)
    expected = [[round(i * 2.4 + 1e-9) for i in range(s, s + 9)] for s in (0, 9)]
    assert [list(c.source_frames) for c in ex.clips] == expected
    assert [c.start_frame for c in ex.clips] == [0, 22]
    for clip, want in zip(ex.clips, expected):
        assert markers(clip.mp4) == want
        assert probe_video(clip.mp4).fps == 10.0
    # all non-overlapping clips at the source rate, evenly spaced ones when fewer are asked for
    every = cl.extract_clips(data, ClipSpec(clip_frames=9, height=32, width=32, clips_per_video=0, codec="vp9"))
    assert [c.start_frame for c in every.clips] == [0, 9, 18, 27, 36]
    two = cl.extract_clips(data, ClipSpec(clip_frames=9, height=32, width=32, clips_per_video=2, codec="vp9"))
    assert [markers(c.mp4)[0] for c in two.clips] == [0, 39]
    # too short after resampling: 20 frames at 24 fps are 8 frames at 10 fps
    short = encode_video(marked(20, 48, 64), 24, codec="vp9")
    with pytest.raises(cl.VideoDecodeError, match="20 frames at 24 fps give 8 frames at 10 fps"):
        cl.extract_clips(short, ClipSpec(clip_frames=9, height=32, width=32, fps=10, codec="vp9"))


def test_a_container_count_that_moves_the_clips_gets_a_second_pass(raw: Path, monkeypatch) -> None:
    data = (raw / "sub" / "b.mkv").read_bytes()  # Matroska declares no count: packets are counted
    spec = ClipSpec(clip_frames=9, height=32, width=32, clips_per_video=2, codec="vp9")
    assert [c.start_frame for c in cl.extract_clips(data, spec).clips] == [0, 31]
    monkeypatch.setattr(cl, "_count_packets", lambda _: 42)  # plan says [0, 33]; 40 frames decode
    ex = cl.extract_clips(data, spec)
    assert ex.source_num_frames == 40 and [c.start_frame for c in ex.clips] == [0, 31]
    assert [markers(c.mp4)[0] for c in ex.clips] == [0, 31]


def test_crop_and_pad(raw: Path) -> None:
    data = (raw / "a.mp4").read_bytes()  # 64x96 (wide) into 48x48
    for mode in ("crop", "pad"):
        ex = cl.extract_clips(data, ClipSpec(clip_frames=9, height=48, width=48, resize_mode=mode, codec="vp9"))
        frames = decode_frames(ex.clips[0].mp4, 0, 9)
        assert frames.shape == (9, 48, 48, 3)
        top, middle = frames[-1, 1:4, 20:28].mean(), frames[-1, 22:26, 20:28].mean()
        assert abs(middle - (20 + 5 * 8)) < 4
        if mode == "crop":  # covers the target: no border
            assert abs(top - middle) < 4
        else:  # fits inside: black bands above and below the 48x32 picture
            assert top < 8


def test_resume_is_a_noop_and_redoes_only_a_missing_unit(raw: Path, out1: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(out1, out)
    before = snapshot(out)
    result = run(raw, out, workers=1)
    assert result.units_skipped == 3 and snapshot(out) == before  # nothing rewritten, nothing added
    # unit 2 lost its done file and a stray partial shard of an interrupted run appeared
    (out / "unit-000002.done.json").unlink()
    (out / "shard-000002-000001.tar.partial").write_bytes(b"half a shard")
    result = run(raw, out, workers=1)
    assert result.units_skipped == 2
    after = snapshot(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # byte-identical
    changed = sorted(k for k in after if after[k][1] != before[k][1])
    # the manifest is removed while units are pending (it marks a complete set) and written again
    assert changed == ["manifest.json", "shard-000002-000000.idx", "shard-000002-000000.tar", "unit-000002.done.json"]
    # a shard of a done unit that was deleted: that unit is redone too
    (out / "shard-000000-000000.tar").unlink()
    assert run(raw, out, workers=1).units_skipped == 2
    assert {k: v[0] for k, v in snapshot(out).items()} == {k: v[0] for k, v in before.items()}


def test_workers_do_not_change_the_bytes(raw: Path, out1: Path, tmp_path: Path) -> None:
    out2 = tmp_path / "out2"
    result = run(raw, out2, workers=2)
    assert result.num_clips == 3
    assert {k: v[0] for k, v in snapshot(out2).items()} == {k: v[0] for k, v in snapshot(out1).items()}


def test_other_parameters_are_refused(raw: Path, out1: Path) -> None:
    spec = ClipSpec(clip_frames=17, height=32, width=32, codec="h264")
    with pytest.raises(PrepError) as e:
        run(raw, out1, spec=spec)
    assert "clip_frames (has 9, asked 17)" in str(e.value) and "codec (has 'vp9', asked 'h264')" in str(e.value)
    with pytest.raises(PrepError, match="videos_per_unit"):
        run(raw, out1, layout=ShardLayout(videos_per_unit=4))


def test_h264_default_all_clips_and_small_shards(raw: Path, tmp_path: Path) -> None:
    spec = ClipSpec(clip_frames=9, height=32, width=48, clips_per_video=0)
    res = run(raw, tmp_path / "o", spec=spec, layout=ShardLayout(videos_per_unit=32, max_clips_per_shard=3))
    assert res.num_clips == 5 + 4 + 2 and res.num_shards == 4  # one unit; 11 clips in shards of <= 3
    index = ShardIndex.from_paths(tmp_path / "o", required_exts=EXTS)
    starts = {}
    for i in range(len(index)):
        meta = json.loads(index.read(i, "json"))
        info = probe_video(index.read(i, "mp4"))
        assert (info.codec, info.num_frames, info.height, info.width) == ("h264", 9, 32, 48)
        starts.setdefault(meta["source"], []).append(meta["start_frame"])
        assert markers(index.read(i, "mp4"))[0] == meta["start_frame"]
    assert {k: sorted(v) for k, v in starts.items()} == {"a.mp4": [0, 9, 18, 27, 36], "sub/b.mkv": [0, 9, 18, 27],
                                                         "sub/deep/c.mp4": [0, 9]}


def test_caption_files_and_matching(raw: Path, tmp_path: Path) -> None:
    jl = tmp_path / "caps.jsonl"
    jl.write_text('{"video": "a.mp4", "caption": " one "}\n\n{"video": "./sub/b.mkv", "caption": "two"}\n')
    assert [(r.line, r.video, r.caption) for r in read_captions(jl)] == [(1, "a.mp4", "one"), (3, "./sub/b.mkv", "two")]
    rels = ["a.mp4", "x/dup.mp4", "y/dup.mp4", "z.mp4", "e.mp4"]
    rows = [cl_row(1, "a.mp4", "A"), cl_row(2, "dup.mp4", "D"), cl_row(3, "z.mp4", "Z1"), cl_row(4, "z.mp4", "Z2"),
            cl_row(5, "e.mp4", ""), cl_row(6, "a.mp4", "A"), cl_row(7, str(raw / "nope.mp4"), "N")]
    caps, rejects, issues = match_captions(raw, rels, rows, "c.csv")
    assert caps == {"a.mp4": "A"}  # a repeated identical row is fine
    assert "conflicting captions: c.csv lines 3, 4" in rejects["z.mp4"]
    assert "empty caption in c.csv line 5" in rejects["e.mp4"]
    assert "no caption" in rejects["x/dup.mp4"] and "no caption" in rejects["y/dup.mp4"]
    assert [i["reason"] for i in issues] == ["c.csv line 2: the file name 'dup.mp4' is ambiguous (x/dup.mp4, "
                                             "y/dup.mp4); give the path relative to RAW",
                                             "c.csv line 7: no such video under RAW"]
    videos, issues, params = collect_videos(raw, caption="same for all")
    assert {v.caption for v in videos} == {"same for all"} and not issues and len(videos) == 9
    assert params["caption"] == "same for all" and params["captions"] is None
    (tmp_path / "bad.csv").write_text("video;caption\na.mp4;x\n")
    with pytest.raises(PrepError, match="bad.csv: the first line must be a header naming the columns"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4"}\n')
    with pytest.raises(PrepError, match="bad.jsonl line 1: field 'caption' must be a string"):
        read_captions(tmp_path / "bad.jsonl")
    with pytest.raises(PrepError, match="exactly one"):
        collect_videos(raw, captions=jl, caption="x")


def cl_row(line: int, video: str, caption: str):
    from data_prep.videos import CaptionRow

    return CaptionRow(line, video, caption)


def test_cli_errors_and_summary(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        code = prep_cli.main(["videos", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    (tmp_path / "novideos").mkdir()
    cases = [
        (["--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--caption", "x"], "is not a directory"),
        (["--raw", str(raw), "--out", str(raw) + "/", "--caption", "x"], "is the input folder"),
        (["--raw", str(raw), "--out", str(tmp_path / "o")], "exactly one of --captions"),
        (["--raw", str(tmp_path / "novideos"), "--out", str(tmp_path / "o"), "--caption", "x"], "holds no videos"),
        (["--raw", str(raw), "--out", str(tmp_path / "o"), "--caption", "x", "--clip-frames", "12"], "1 + 8k"),
        (["--raw", str(raw), "--out", str(tmp_path / "o"), "--caption", "x", "data.height=40"], "multiple of 16"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2 and message in err, (args, err)
    with pytest.raises(SystemExit) as e:  # argparse: conflicting caption options
        cli("--raw", str(raw), "--out", str(tmp_path / "o"), "--caption", "x", "--captions", "y.csv")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    # recipe defaults (general: 17 frames, 64x64) with explicit flags winning, overrides after options
    out = tmp_path / "cli"
    code, stdout, _ = cli("--raw", str(raw), "--out", str(out), "--captions", str(raw / "captions.csv"),
                          "--codec", "vp9", "--workers", "1", "--no-progress", "data.num_frames=9", "--width", "48")
    assert code == 0, stdout
    assert "clips written: 3 (from 3 of 9 videos; 9 frames at 48x64, vp9)" in stdout
    assert f"videos rejected: 6 (one line each in {out / 'report.jsonl'})" in stdout
    assert "shards: 1" in stdout and f"output: {out}" in stdout
    params = read_manifest(out)["extra"]["params"]
    assert (params["clip_frames"], params["height"], params["width"], params["fps"]) == (9, 64, 48, None)
    code, _, err = cli("--raw", str(raw), "--out", str(out), "--captions", str(raw / "captions.csv"), "--codec", "h264",
                       "--workers", "1", "--no-progress", "data.num_frames=9", "--width", "48")
    assert code == 2 and "codec (has 'vp9', asked 'h264')" in err


def test_cli_subprocess_exit_codes(raw: Path, tmp_path: Path) -> None:
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.mp4").write_bytes(b"not a video")
    cmd = [sys.executable, "-m", "nemo_ext.cli.prep", "videos", "--raw", str(only_bad), "--out", str(tmp_path / "o"),
           "--caption", "c", "--no-progress", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "clips written: 0" in proc.stdout and "no clip was written" in proc.stderr
    proc = subprocess.run(cmd[:5] + [str(only_bad), "--out", str(only_bad), "--caption", "c"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is the input folder" in proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_refuses_out_from_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RAW", "SOURCE", "MAKEFLAGS")}
    proc = subprocess.run(["make", "-n", "data", "RAW=/r"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "OUT": "/gpu/machine/out"})
    assert proc.returncode != 0
    assert "OUT=/gpu/machine/out comes from the environment" in proc.stderr and "refused" in proc.stderr
    proc = subprocess.run(["make", "-e", "-n", "data", "RAW=/r"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "OUT": "/gpu/machine/out"})
    assert proc.returncode != 0 and "comes from the environment" in proc.stderr  # make -e: refused too
    proc = subprocess.run(["make", "-n", "data", "RAW=/r", "OUT=/o", "SOURCE=instructions", "ARGS=--codec vp9"],
                          cwd=REPO, capture_output=True, text=True, env={**env, "OUT": "/gpu/machine/out"})
    assert proc.returncode == 0, proc.stderr
    assert "-m nemo_ext.cli.prep instructions --recipe general --raw /r --out /o --codec vp9" in proc.stdout
    proc = subprocess.run(["make", "-n", "recipe=general", "data", "OUT=/o"], cwd=REPO, capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0 and "RAW and OUT are required" in proc.stderr
    proc = subprocess.run(["make", "-n", "data", "RAW=/r", "OUT=/o"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "-m nemo_ext.cli.prep videos --recipe general --raw /r --out /o" in proc.stdout
