"""Data prep from videos with per-video instruction JSON: variants, rejects, CLI, kinds of output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.clips import ClipSpec, PrepError, ShardLayout
from data_prep.instruction import InstructionError, collect_instructions, prepare_instructions, read_instructions
from data_prep.videos import prepare_videos
from nemo_ext.cli import prep as prep_cli
from nemo_ext.data.shards import ShardIndex, read_manifest
from nemo_ext.data.video import encode_video, probe_video

SPEC = ClipSpec(clip_frames=9, height=32, width=32, codec="vp9")

# video -> its JSON next to it (None: no JSON file; str: raw file text)
EPISODES: dict[str, object] = {
    "ep1.mp4": {"language_instruction_2": "put the cup in the sink", "language_instruction_0": " open the drawer ",
                "language_instruction_1": "", "language_instruction_10": "open the drawer", "state": [1, 2]},
    "ep2.mp4": {"language_instruction": "pick up the red block"},
    "ep3.mkv": {"instructions": ["", "wipe the table", "wipe the table clean"]},
    "sub/ep4.mp4": {"language_instruction": ["stack the bowls", None]},
    "ep5.mp4": None,
    "ep6.mp4": "{not json",
    "ep7.mp4": {"language_instruction_0": "  ", "language_instruction_1": ""},
    "ep8.mp4": {"language_instruction_0": 42},
    "ep9.mp4": ["a list, not an object"],
    "ep10.mp4": {"task": "no instruction key"},
}
GOOD = {
    "ep1.mp4": ["open the drawer", "put the cup in the sink"],
    "ep2.mp4": ["pick up the red block"],
    "ep3.mkv": ["wipe the table", "wipe the table clean"],
    "sub/ep4.mp4": ["stack the bowls"],
}
REASONS = {
    "ep5.mp4": "no instruction file: expected ep5.json next to the video",
    "ep6.mp4": "instruction file ep6.json is not valid JSON",
    "ep7.mp4": "every instruction is empty",
    "ep8.mp4": "key 'language_instruction_0': expected a string or a list of strings, got 42",
    "ep9.mp4": "expected a JSON object, got list",
    "ep10.mp4": "has no language_instruction, language_instruction_<n> or instructions key",
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("episodes")
    (root / "sub").mkdir()
    frames = np.full((17, 48, 64, 3), 90, dtype=np.uint8)
    frames[:, :, ::8] = 200  # some structure
    for rel, content in EPISODES.items():
        container = "matroska" if rel.endswith(".mkv") else "mp4"
        (root / rel).write_bytes(encode_video(frames, 10, codec="vp9", container=container))
        if content is None:
            continue
        text = content if isinstance(content, str) else json.dumps(content)
        (root / rel).with_suffix(".json").write_text(text)
    (root / "orphan.json").write_text(json.dumps({"language_instruction": "no video for me"}))
    return root


@pytest.fixture(scope="module")
def out(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_instructions(raw, out, SPEC, ShardLayout(videos_per_unit=4), workers=1, progress=False)
    return out


def test_samples_carry_every_instruction_variant(out: Path) -> None:
    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "nframes.npy"))
    found = {}
    for i in range(len(index)):
        meta = json.loads(index.read(i, "json"))
        assert meta["caption"] == meta["instructions"][0]
        assert "state" not in meta  # other keys of the instruction JSON are not copied
        info = probe_video(index.read(i, "mp4"))
        assert (info.num_frames, info.height, info.width) == (9, 32, 32)
        found[meta["source"]] = meta["instructions"]
    assert found == GOOD


def test_rejects_are_reported(out: Path) -> None:
    lines = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert len(lines) == len(REASONS)
    for line in lines:
        assert REASONS[line["video"]] in line["reason"], line
    extra = read_manifest(out)["extra"]
    assert extra["source"] == "instructions"
    assert (extra["num_videos"], extra["num_rejected"], extra["num_clips"]) == (10, 6, 4)


def test_read_instructions_forms(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"language_instruction_1": "b", "language_instruction_0": "a",
                             "language_instruction": "top", "instructions": ["c", "a"]}))
    assert read_instructions(p) == ["top", "a", "b", "c"]  # key order, numbered keys by number, no duplicates
    with pytest.raises(InstructionError, match="no instruction file: expected y.json"):
        read_instructions(tmp_path / "y.json")


def test_resume_and_source_kind_mismatch(raw: Path, out: Path, tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = prepare_instructions(raw, out, SPEC, ShardLayout(videos_per_unit=4), workers=2, progress=False)
    assert result.units_skipped == result.num_units == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(PrepError, match="another kind"):
        prepare_videos(raw, out, SPEC, ShardLayout(videos_per_unit=4), caption="x", progress=False)
    # an edited instruction file changes its unit's inputs: only that unit is redone
    copy = tmp_path / "raw"
    import shutil

    shutil.copytree(raw, copy)
    o2 = tmp_path / "o2"
    prepare_instructions(copy, o2, SPEC, ShardLayout(videos_per_unit=4), workers=1, progress=False)
    (copy / "ep2.json").write_text(json.dumps({"language_instruction": "pick up the blue block"}))
    result = prepare_instructions(copy, o2, SPEC, ShardLayout(videos_per_unit=4), workers=1, progress=False)
    assert result.units_skipped == 2
    index = ShardIndex.from_paths(o2)
    captions = {json.loads(index.read(i, "json"))["source"]: json.loads(index.read(i, "json"))["caption"]
                for i in range(len(index))}
    assert captions["ep2.mp4"] == "pick up the blue block"


def test_collect_and_cli(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos, params = collect_instructions(raw)
    assert [v.rel for v in videos] == sorted(EPISODES) and params == {"raw": str(raw.resolve())}
    code = prep_cli.main(["instructions", "--raw", str(raw), "--out", str(tmp_path / "o"), "--codec", "vp9",
                          "--clip-frames", "9", "--height", "32", "--width", "32", "--workers", "1", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "clips written: 4 (from 4 of 10 videos" in stdout and "videos rejected: 6" in stdout
    with pytest.raises(SystemExit) as e:  # instructions take no caption options
        prep_cli.main(["instructions", "--raw", str(raw), "--out", str(tmp_path / "o"), "--caption", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --caption" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = prep_cli.main(["instructions", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "o3")])
    assert code == 2 and "holds no videos" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The other instruction layouts (data_prep/instruction.py): each on a fixture written here, good and
# bad inputs; --instructions each
# ------------------------------------------------------------------------------------------------

def _video(path: Path, frames: int = 17) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((frames, 32, 32, 3), 80, dtype=np.uint8)
    data[:, ::4] = 200
    path.write_bytes(encode_video(data, 10, codec="vp9") if frames else b"")


def _reports(out: Path) -> dict[str, str]:
    return {r["video"]: r["reason"] for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}


def test_cosmos_layout(tmp_path: Path) -> None:
    raw = tmp_path / "cosmos"
    for name in ("a", "b", "c", "d"):
        _video(raw / "videos" / f"{name}.mp4", 0 if name == "d" else 17)
    (raw / "instructions").mkdir()
    (raw / "instructions" / "a.json").write_text(json.dumps({"language_instruction_0": "fold the towel",
                                                             "language_instruction_1": "fold it"}))
    (raw / "instructions" / "b.json").write_text("{broken")
    (raw / "instructions" / "d.json").write_text(json.dumps({"language_instruction_0": "an empty video"}))
    out = tmp_path / "out"
    code = prep_cli.main(["cosmos_instructions", "--raw", str(raw), "--out", str(out), "--codec", "vp9", "--workers",
                          "1", "--no-progress", "--height", "32", "--width", "32", "data.num_frames=9"])
    assert code == 0
    rep = _reports(out)
    assert "not valid JSON" in rep["videos/b.mp4"] and "instructions/c.json" in rep["videos/c.mp4"]
    assert "videos/d.mp4" in rep  # the empty video: a report line after its decode, not a silent drop
    index = ShardIndex.from_paths(out, required_exts=("json",))
    assert {json.loads(index.read(i, "json"))["caption"] for i in range(len(index))} == {"fold the towel"}
    assert read_manifest(out)["extra"]["info"]["recipe"] == "instruction"  # the source's default recipe


def test_bridge_texts(tmp_path: Path) -> None:
    raw = tmp_path / "bridge"
    for i, texts in enumerate([["pick the spoon", "grab the spoon"], [], None]):
        _video(raw / "videos" / "train" / str(i) / "rgb.mp4")
        ann = {"episode_id": i, "videos": [{"video_path": f"videos/train/{i}/rgb.mp4"}]}
        if texts is not None:
            ann["texts"] = texts
        (raw / "annotation" / "train").mkdir(parents=True, exist_ok=True)
        (raw / "annotation" / "train" / f"{i}.json").write_text(json.dumps(ann))
    (raw / "annotation" / "train" / "3.json").write_text(json.dumps({"videos": [{"video_path": "videos/none.mp4"}],
                                                                      "texts": ["x"]}))
    out = tmp_path / "out"
    code = prep_cli.main(["bridge_instructions", "--raw", str(raw), "--out", str(out), "--codec", "vp9", "--workers", "1",
                          "--no-progress", "--height", "32", "--width", "32", "data.num_frames=9"])
    assert code == 0
    rep = _reports(out)
    assert rep["videos/train/1/rgb.mp4"].endswith("no instruction ('texts' is missing or empty)")
    assert "no instruction" in rep["videos/train/2/rgb.mp4"]
    assert "does not exist" in rep["annotation/train/3.json"]
    index = ShardIndex.from_paths(out, required_exts=("json",))
    assert json.loads(index.read(0, "json"))["instructions"] == ["pick the spoon", "grab the spoon"]


def test_lerobot_tasks_per_frame_and_per_episode(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = tmp_path / "lerobot"
    (raw / "meta").mkdir(parents=True)
    key = "observation.images.top"
    info = {"codebase_version": "v2.1", "fps": 10, "chunks_size": 1000, "total_episodes": 3,
            "features": {"action": {"dtype": "float32", "shape": [2]}, key: {"dtype": "video", "shape": [32, 32, 3]},
                         "task_index": {"dtype": "int64", "shape": [1]}}}
    (raw / "meta" / "info.json").write_text(json.dumps(info))
    (raw / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in
                                                      enumerate(["open the lid", "close the lid"])))
    episodes = [{"episode_index": 0, "tasks": ["open the lid", "close the lid"]},
                {"episode_index": 1, "tasks": ["listed only here"]}, {"episode_index": 2, "tasks": []}]
    (raw / "meta" / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    for ep, column in ((0, [0] * 8 + [1] * 9), (1, None), (2, [7] * 17)):
        table = {"action": pa.array([[0.0, 0.0]] * 17, type=pa.list_(pa.float32()))}
        if column is not None:
            table["task_index"] = pa.array(column)
        (raw / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), raw / "data" / "chunk-000" / f"episode_{ep:06d}.parquet")
        _video(raw / "videos" / "chunk-000" / key / f"episode_{ep:06d}.mp4")
    out = tmp_path / "out"
    code = prep_cli.main(["lerobot_instructions", "--raw", str(raw), "--out", str(out), "--codec", "vp9", "--workers",
                          "1", "--no-progress", "--height", "32", "--width", "32", "data.num_frames=9",
                          "--instructions", "each"])
    assert code == 0
    rep = _reports(out)
    assert "task_index [7] not in meta/tasks.jsonl" in rep[f"videos/chunk-000/{key}/episode_000002.mp4"]
    index = ShardIndex.from_paths(out, required_exts=("json",))
    captions = sorted(json.loads(index.read(i, "json"))["caption"] for i in range(len(index)))
    # episode 0: its frames' two tasks, one sample each (--instructions each); episode 1: episodes.jsonl's task
    assert captions == ["close the lid", "listed only here", "open the lid"]


def test_instruction_table(tmp_path: Path) -> None:
    raw = tmp_path / "table"
    for name in ("a.mp4", "sub/b.mp4", "c.mp4"):
        _video(raw / name)
    table = tmp_path / "instructions.csv"
    table.write_text("video,instruction\na.mp4,turn left\na.mp4,go left\nsub/b.mp4,stop\nmissing.mp4,x\nc.mp4,\n")
    out = tmp_path / "out"
    code = prep_cli.main(["instruction_table", "--raw", str(raw), "--out", str(out), "--table", str(table), "--codec",
                          "vp9", "--workers", "1", "--no-progress", "--height", "32", "--width", "32", "data.num_frames=9"])
    assert code == 0
    rep = _reports(out)
    assert "no such video" in rep["missing.mp4"] and "no non-empty row" in rep["c.mp4"]
    index = ShardIndex.from_paths(out, required_exts=("json",))
    got = sorted(tuple(json.loads(index.read(i, "json"))["instructions"]) for i in range(len(index)))
    assert got == [("stop",), ("turn left", "go left")]
    bad = tmp_path / "bad.csv"
    bad.write_text("video,caption\na.mp4,x\n")
    code = prep_cli.main(["instruction_table", "--raw", str(raw), "--out", str(tmp_path / "o2"), "--table", str(bad)])
    assert code == 2


def test_caption_choice_draws_one_instruction_per_draw() -> None:
    from nemo_ext.data.dataset import caption_for

    meta = {"caption": "a", "instructions": ["a", "b", "c"]}
    assert caption_for(meta, 5) == "a" and caption_for({}, 5) == ""
    drawn = [caption_for(meta, seed, "random") for seed in range(60)]
    assert set(drawn) == {"a", "b", "c"} and drawn == [caption_for(meta, s, "random") for s in range(60)]
    assert caption_for({"caption": "only"}, 3, "random") == "only"
