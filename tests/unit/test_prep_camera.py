"""Camera converters (data_prep/camera_control.py) on fixtures written here from the 3D world: the
generic folder layout (OpenCV and OpenGL poses, pixel and normalised intrinsics) and nerfstudio /
DL3DV transforms.json (OpenGL camera-to-world, images), with a report line for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.camera_control import prepare_cameras
from data_prep.clips import ClipSpec, ShardLayout
from nemo_ext.conditioning import camera as cam
from nemo_ext.data.shards import ShardIndex
from nemo_ext.data.video import encode_video
from nemo_ext.worlds.scene3d import camera_path, default_intrinsics, render_path, sample_scene

H = W = 48
FRAMES = 12
SPEC = ClipSpec(clip_frames=9, height=32, width=32, codec="vp9")


def _clip(seed: int):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    poses = camera_path("orbit", rng, FRAMES, scene)
    k = default_intrinsics(H, W)
    frames, _ = render_path(scene, poses, k, H, W)
    return frames, poses, k


def _read(out: Path) -> dict:
    index = ShardIndex.from_paths(out, required_exts=("mp4", "json", "nframes.npy"))
    got = {}
    for i in range(len(index)):
        meta = json.loads(index.read(i, "json"))
        got[meta["source"]] = (np.load(__import__("io").BytesIO(index.read(i, "poses.npy"))),
                               np.load(__import__("io").BytesIO(index.read(i, "intrinsics.npy"))))
    return got


def _report(out: Path) -> dict:
    return {json.loads(x)["video"]: json.loads(x)["reason"] for x in (out / "report.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("camera_raw")
    truth = {}

    def write(name, frames, poses, intr, convention=None):
        d = root / name
        d.mkdir()
        (d / "video.mp4").write_bytes(encode_video(frames, 8))
        if poses is not None:
            np.save(d / "poses.npy", poses)
        if intr is not None:
            (d / "intrinsics.json").write_text(json.dumps(intr if convention is None else {**intr, "convention": convention}))

    frames, poses, k = _clip(0)
    kd = {"fx": k[0, 0], "fy": k[1, 1], "cx": k[0, 2], "cy": k[1, 2]}
    write("good", frames, poses, kd)
    truth["good/video.mp4"] = (poses, k)
    f2, p2, k2 = _clip(1)
    write("opengl", f2, cam.opencv_to_opengl(p2), kd, convention="opengl")  # the same cameras in OpenGL axes
    truth["opengl/video.mp4"] = (p2, k2)
    norm = {"fx": k[0, 0] / W, "fy": k[1, 1] / H, "cx": (k[0, 2] + 0.5) / W, "cy": (k[1, 2] + 0.5) / H, "normalised": True}
    write("normalised", frames, poses, norm)
    truth["normalised/video.mp4"] = (poses, k)
    write("short_poses", frames, poses[:-2], kd)
    bent = poses.copy()
    bent[3, :3, :3] *= 1.2
    write("not_rigid", frames, bent, kd)
    nan = poses.copy()
    nan[5, 0, 3] = np.nan
    write("nan", frames, nan, kd)
    write("no_intrinsics", frames, poses, None)
    write("bad_focal", frames, poses, {**kd, "fx": -3.0})
    write("too_short", frames[:5], poses[:5], kd)
    reasons = {"short_poses/video.mp4": "10 rows for a video of 12 frames",
               "not_rigid/video.mp4": "frame 3 has a rotation that is not orthonormal",
               "nan/video.mp4": "frame 5 has NaN or inf",
               "no_intrinsics/video.mp4": "no intrinsics.json",
               "bad_focal/video.mp4": "focal lengths must be positive",
               "too_short/video.mp4": "5"}
    return root, truth, reasons


def test_camera_folders_convert_with_clip_intrinsics_and_a_report_line_per_bad_clip(folders, tmp_path):
    root, truth, reasons = folders
    out = tmp_path / "out"
    result = prepare_cameras(root, out, SPEC, ShardLayout(), layout_name="camera_videos", progress=False)
    got = _read(out)
    assert set(got) == set(truth), (set(got), _report(out))
    for rel, (poses, k) in truth.items():
        rows, intr = got[rel]
        np.testing.assert_allclose(rows.reshape(-1, 4, 4), poses[:9], atol=1e-5)  # the clip's first 9 frames
        k32, _ = cam.resize_intrinsics(k, (H, W), (32, 32), "crop")
        np.testing.assert_allclose(intr, [k32[0, 0], k32[1, 1], k32[0, 2], k32[1, 2], 32, 32], atol=1e-4)
    report = _report(out)
    assert result.num_rejected == len(reasons) == len(report)
    for rel, needle in reasons.items():
        assert needle in report[rel], (rel, report[rel])


def test_nerfstudio_transforms_with_opengl_poses_and_images(tmp_path):
    from PIL import Image

    frames, poses, k = _clip(2)
    scene = tmp_path / "raw" / "scene_a"
    (scene / "images").mkdir(parents=True)
    entries = []
    for i, (f, p) in enumerate(zip(frames, poses)):
        Image.fromarray(f).save(scene / "images" / f"frame_{i:05d}.png")
        entries.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": cam.opencv_to_opengl(p)[0].tolist()})
    (scene / "transforms.json").write_text(json.dumps({"fl_x": k[0, 0], "fl_y": k[1, 1], "cx": k[0, 2], "cy": k[1, 2],
                                                       "w": W, "h": H, "frames": entries}))
    broken = tmp_path / "raw" / "scene_b"
    broken.mkdir()
    (broken / "transforms.json").write_text(json.dumps({"fl_x": 10, "fl_y": 10, "cx": 5, "cy": 5, "w": W, "h": H,
                                                        "frames": [{"file_path": "images/missing.png",
                                                                    "transform_matrix": np.eye(4).tolist()}]}))
    out = tmp_path / "out"
    result = prepare_cameras(tmp_path / "raw", out, SPEC, ShardLayout(), layout_name="nerfstudio", fps=8.0,
                             progress=False)
    got = _read(out)
    assert list(got) == ["scene_a/transforms.mp4"] and result.num_rejected == 1
    rows, intr = got["scene_a/transforms.mp4"]
    np.testing.assert_allclose(rows.reshape(-1, 4, 4), poses[:9], atol=1e-5)  # back in OpenCV axes
    assert "image 'images/missing.png' not found" in _report(out)["scene_b/transforms.mp4"]


def test_realestate10k_world_to_camera_normalised_intrinsics_and_frames_by_timestamp(tmp_path):
    from PIL import Image

    frames, poses, k = _clip(3)
    raw, frame_root = tmp_path / "txt", tmp_path / "frames"
    raw.mkdir()
    w2c = cam.pose_to_world_to_camera(poses)
    ts = 1_000_000 + np.arange(FRAMES) * 66_733  # ~15 poses a second, whatever the video's rate
    norm = (k[0, 0] / W, k[1, 1] / H, (k[0, 2] + 0.5) / W, (k[1, 2] + 0.5) / H)

    def write(name, drop=None, bad_line=False):
        lines = ["https://www.youtube.com/watch?v=xyz"]
        (frame_root / name).mkdir(parents=True)
        for i, t in enumerate(ts):
            vals = [t, *norm, 0.0, 0.0, *w2c[i, :3].reshape(-1)]
            lines.append(" ".join(str(v) for v in vals[: -1 if bad_line and i == 4 else None]))
            if i != drop:
                Image.fromarray(frames[i]).save(frame_root / name / f"{t}.png")
        (raw / f"{name}.txt").write_text("\n".join(lines) + "\n")

    write("good")
    write("gap", drop=6)
    write("cut", bad_line=True)
    out = tmp_path / "out"
    result = prepare_cameras(raw, out, SPEC, ShardLayout(), layout_name="realestate10k", frames_root=frame_root,
                             progress=False)
    got = _read(out)
    assert list(got) == ["good.mp4"] and result.num_rejected == 2
    rows, intr = got["good.mp4"]
    np.testing.assert_allclose(rows.reshape(-1, 4, 4), poses[:9], atol=1e-4)  # camera-to-world, inverted exactly
    k32, _ = cam.resize_intrinsics(k, (H, W), (32, 32), "crop")
    np.testing.assert_allclose(intr[:4], [k32[0, 0], k32[1, 1], k32[0, 2], k32[1, 2]], atol=1e-3)
    report = _report(out)
    assert "1 of 12 posed frames have no image" in report["gap.mp4"] and f"timestamp {ts[6]}" in report["gap.mp4"]
    assert "line 6: 18 values, expected 19" in report["cut.mp4"]


def test_realestate10k_frames_from_a_video_by_timestamp(tmp_path):
    """The YouTube video runs at 30 fps, the poses at 10 per second: the frame nearest each pose's
    timestamp is taken; a pose past the video's end is a report line."""
    frames, poses, k = _clip(4)
    raw, videos = tmp_path / "txt", tmp_path / "videos"
    raw.mkdir()
    videos.mkdir()
    w2c = cam.pose_to_world_to_camera(poses)
    norm = (k[0, 0] / W, k[1, 1] / H, (k[0, 2] + 0.5) / W, (k[1, 2] + 0.5) / H)
    video = np.repeat(frames, 3, axis=0)  # 36 frames at 30 fps: pose i is video frame 3 i
    for name, extra in (("yt", 0), ("past_end", 1)):
        (videos / f"{name}.mp4").write_bytes(encode_video(video, 30))
        ts = np.arange(FRAMES + extra) * 100_000
        rows = [w2c[min(i, FRAMES - 1), :3].reshape(-1) for i in range(len(ts))]
        lines = ["https://www.youtube.com/watch?v=abc"] + [" ".join(str(v) for v in [t, *norm, 0.0, 0.0, *r])
                                                           for t, r in zip(ts, rows)]
        (raw / f"{name}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = prepare_cameras(raw, out, SPEC, ShardLayout(), layout_name="realestate10k", frames_root=videos,
                             progress=False)
    got = _read(out)
    assert list(got) == ["yt.mp4"] and result.num_rejected == 1
    np.testing.assert_allclose(got["yt.mp4"][0].reshape(-1, 4, 4), poses[:9], atol=1e-4)
    assert "1 of 13 posed frames have no frame of past_end.mp4" in _report(out)["past_end.mp4"]
