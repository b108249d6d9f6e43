"""Camera-posed videos -> camera_control clip shards (``python -m nemo_ext.cli.prep <source> --raw ... --out ...``).

Every clip gets ``<key>.poses.npy`` float32 ``[T, 16]`` (camera-to-world per frame, row-major, OpenCV
axes, cut like the frames) and ``<key>.intrinsics.npy`` float32 ``[6]`` (fx, fy, cx, cy, width, height
in pixels of the *clip*: the source intrinsics carried through prep's resize / crop / letterbox, the
same geometry as :func:`nemo_ext.conditioning.camera.resize_intrinsics`). Sources:

* ``camera_videos`` (generic): one folder per clip holding one video, ``poses.npy`` ``[T, 4, 4]``
  (or ``[T, 3, 4]``) camera-to-world, and ``intrinsics.json`` ``{"fx", "fy", "cx", "cy"}`` in pixels of
  that video (optional ``"convention": "opencv"`` (default) or ``"opengl"``; ``"normalised": true`` when
  fx, cx are fractions of the width and fy, cy of the height, RealEstate10K's habit).
* ``nerfstudio`` (nerfstudio / DL3DV ``transforms.json``): per scene folder, ``frames[*].transform_matrix``
  camera-to-world in **OpenGL axes** (x right, y up, z back: converted), intrinsics ``fl_x fl_y cx cy w h``
  at the top or per frame (per-frame values must agree: one camera per clip), the images of
  ``frames[*].file_path`` (in the file's order) made into a video in ``<out>/.frames/``.
* ``realestate10k``: one ``<clip>.txt`` per clip under RAW (line 1 the YouTube URL, then per posed frame
  ``timestamp fx fy cx cy k1 k2`` and the 12 values of the 3x4 **world-to-camera** matrix, intrinsics
  normalised by the width and height; timestamps in microseconds), the frames in
  ``--frames <dir>/<clip>/<timestamp>.{png,jpg}`` (the layout RealEstate10K's download scripts write) or
  a video ``--frames <dir>/<clip>.mp4`` (any container; the frame nearest each pose timestamp, within
  half a frame interval, by its presentation time), matched by timestamp: only posed frames are used,
  the video is made of them at the poses' own rate (1e6 / the median timestamp step: the pose rate,
  whatever the YouTube video's); a posed frame with no image is a report line, as are distortion
  coefficients that are not zero.

Rejected, with a report line each (never a silent drop): pose count != frame count, a rotation that is
not orthonormal with det +1, missing / non-positive / out-of-image intrinsics, NaN or inf, unreadable
files, videos too short for a clip.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_prep.clips import (VIDEO_EXTENSIONS, ClipSpec, PrepError, PrepResult, ShardLayout, Sidecar, SourceVideo,
                             clip_options, prepare, raw_videos, source_video)
from nemo_ext.conditioning import camera as cam
from nemo_ext.data.sources import PrepSource, register_source

POSES_EXT, INTRINSICS_EXT = "poses.npy", "intrinsics.npy"
CAPTION = "a video of a camera moving"  # NeMo's camera-control default caption


def _array(arr: np.ndarray) -> np.ndarray:
    return arr


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _video_size(path: Path) -> tuple[int, int]:
    """(height, width) of a video's first stream, from its header."""
    import av

    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        return int(ctx.height), int(ctx.width)


def camera_sidecars(c2w: np.ndarray, k: np.ndarray, src_hw: tuple[int, int], spec: ClipSpec, what: str
                    ) -> tuple[Sidecar, Sidecar]:
    """Checked poses and the clip-pixel intrinsics as the two sidecars (raises PoseError naming the problem)."""
    poses = cam.as_poses(c2w, f"{what}: poses")
    cam.check_rotations(poses, f"{what}: poses")
    k = cam.check_intrinsics(k, src_hw[1], src_hw[0], f"{what}: intrinsics")
    k_clip, _ = cam.resize_intrinsics(k, src_hw, (spec.height, spec.width), spec.resize_mode)
    rows = poses.reshape(len(poses), 16).astype(np.float32)
    intr = np.array([k_clip[0, 0], k_clip[1, 1], k_clip[0, 2], k_clip[1, 2], spec.width, spec.height], np.float32)
    digest = _digest(rows, intr)
    return (Sidecar(POSES_EXT, "frames", functools.partial(_array, rows), digest, what=f"{what}: poses"),
            Sidecar(INTRINSICS_EXT, "static", functools.partial(_array, intr), digest, what=f"{what}: intrinsics"))


def read_intrinsics_json(path: Path, height: int, width: int) -> tuple[np.ndarray, str]:
    """(K in pixels, convention) of an ``intrinsics.json``."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise cam.PoseError(f"{path.name}: unreadable ({type(e).__name__}: {e})") from None
    missing = [key for key in ("fx", "fy", "cx", "cy") if not isinstance(d.get(key), (int, float))]
    if missing:
        raise cam.PoseError(f"{path.name}: no numeric {', '.join(missing)}")
    convention = str(d.get("convention", "opencv")).lower()
    if convention not in ("opencv", "opengl"):
        raise cam.PoseError(f"{path.name}: convention {convention!r} is neither 'opencv' nor 'opengl'")
    if d.get("normalised") or d.get("normalized"):
        return cam.intrinsics_from_normalised(d["fx"], d["fy"], d["cx"], d["cy"], width, height), convention
    return cam.intrinsics_matrix(d["fx"], d["fy"], d["cx"], d["cy"]), convention


def collect_camera_folders(raw: str | os.PathLike, spec: ClipSpec, exclude=None) -> tuple[list[SourceVideo], dict]:
    """Each folder under RAW with one video, ``poses.npy`` and ``intrinsics.json``."""
    raw = Path(raw)
    videos = []
    for rel in raw_videos(raw, exclude=exclude):
        folder = (raw / rel).parent
        what = f"clip {Path(rel).parent.as_posix() or rel}"
        try:
            if not (folder / "poses.npy").is_file():
                raise cam.PoseError(f"no poses.npy beside {Path(rel).name}")
            if not (folder / "intrinsics.json").is_file():
                raise cam.PoseError(f"no intrinsics.json beside {Path(rel).name}")
            hw = _video_size(raw / rel)
            k, convention = read_intrinsics_json(folder / "intrinsics.json", *hw)
            try:
                poses = np.load(folder / "poses.npy", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise cam.PoseError(f"poses.npy unreadable ({type(e).__name__}: {e})") from None
            poses = cam.as_poses(poses, f"{what}: poses.npy")
            if convention == "opengl":
                poses = cam.opengl_to_opencv(poses)
            sidecars = camera_sidecars(poses, k, hw, spec, what)
        except Exception as e:  # PoseError, unreadable video header: a report line
            videos.append(source_video(raw, rel, None, reject=str(e)))
            continue
        videos.append(source_video(raw, rel, CAPTION, meta={"camera_source": "camera_videos"}, sidecars=sidecars))
    return videos, {"raw": str(raw.resolve())}


def _frame_intrinsics(d: dict, frame: dict) -> tuple[Optional[tuple], Optional[tuple]]:
    """(fl_x, fl_y, cx, cy) and (h, w) of a nerfstudio frame: its own keys over the file's."""
    get = lambda key: frame.get(key, d.get(key))  # noqa: E731
    k = tuple(get(key) for key in ("fl_x", "fl_y", "cx", "cy"))
    hw = (get("h"), get("w"))
    return (k if all(isinstance(v, (int, float)) for v in k) else None,
            hw if all(isinstance(v, (int, float)) for v in hw) else None)


def frames_at_timestamps(video: Path, timestamps_us: np.ndarray) -> list[np.ndarray]:
    """The frame of ``video`` nearest each timestamp (microseconds from the video's start, by the frames'
    presentation times), within half the video's frame interval; raises PoseError naming the first
    timestamp that has none."""
    import av

    times, frames = [], []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            times.append(float(frame.pts * stream.time_base) * 1e6)
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise cam.PoseError(f"{video.name}: no frames decoded")
    times = np.array(times)
    half = 0.5 * float(np.median(np.diff(times))) if len(times) > 1 else 1e9
    idx = np.abs(times[None, :] - np.asarray(timestamps_us, dtype=np.float64)[:, None]).argmin(axis=1)
    off = np.abs(times[idx] - timestamps_us)
    bad = np.flatnonzero(off > half)
    if len(bad):
        raise cam.PoseError(f"{len(bad)} of {len(timestamps_us)} posed frames have no frame of {video.name} within half "
                            f"a frame interval (first: timestamp {int(timestamps_us[bad[0]])}, nearest frame "
                            f"{off[bad[0]] / 1e3:.1f} ms away)")
    return [frames[i] for i in idx]


def _images_to_video(paths: list, out: Path, fps: float) -> None:
    """Images (files, or RGB arrays) in order -> a VP9 video at ``out`` (written atomically)."""
    from PIL import Image

    from nemo_ext.data.video import encode_video

    frames = []
    for p in paths:
        if isinstance(p, np.ndarray):
            frames.append(p)
            continue
        with Image.open(p) as im:
            frames.append(np.asarray(im.convert("RGB")))
    if len({f.shape for f in frames}) != 1:
        raise cam.PoseError("the images differ in size")
    h, w = frames[0].shape[:2]
    arr = np.stack(frames)[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sizes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(encode_video(arr, fps))  # VP9 (the CPU decoders read it)
    os.replace(tmp, out)


def collect_nerfstudio(raw: str | os.PathLike, spec: ClipSpec, out: str | os.PathLike, fps: float = 30.0
                       ) -> tuple[list[SourceVideo], dict]:
    """Each ``transforms.json`` under RAW (nerfstudio / DL3DV): its images in order as a video in
    ``<out>/.frames/`` (made once), its OpenGL camera-to-world poses converted to OpenCV axes."""
    raw, frames_dir = Path(raw), Path(out) / ".frames"
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    files = sorted(p for p in raw.rglob("transforms.json") if frames_dir not in p.parents)
    if not files:
        raise PrepError(f"RAW {raw} holds no transforms.json (nerfstudio / DL3DV layout)")
    videos = []
    for f in files:
        scene = f.parent.relative_to(raw).as_posix() or "."
        rel = f"{scene}/transforms.mp4" if scene != "." else "transforms.mp4"
        video_path = frames_dir / rel
        what = f"scene {scene}"
        try:
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise cam.PoseError(f"transforms.json unreadable ({type(e).__name__}: {e})") from None
            frames = d.get("frames")
            if not isinstance(frames, list) or not frames:
                raise cam.PoseError("transforms.json has no frames")
            ks = {_frame_intrinsics(d, fr) for fr in frames}
            if len(ks) != 1:
                raise cam.PoseError(f"per-frame intrinsics differ ({len(ks)} cameras): one camera per clip")
            (k4, hw), = ks
            if k4 is None or hw is None:
                raise cam.PoseError("transforms.json: missing fl_x / fl_y / cx / cy / w / h")
            images = []
            for i, fr in enumerate(frames):
                p = f.parent / str(fr.get("file_path", ""))
                if not p.is_file():
                    raise cam.PoseError(f"frame {i}: image {fr.get('file_path')!r} not found")
                images.append(p)
            poses = cam.opengl_to_opencv(np.array([fr.get("transform_matrix") for fr in frames], dtype=np.float64))
            h, w = int(hw[0]), int(hw[1])
            sidecars = camera_sidecars(poses, cam.intrinsics_matrix(*k4), (h - h % 2, w - w % 2), spec, what)
            if not video_path.is_file():
                _images_to_video(images, video_path, fps)
        except Exception as e:
            videos.append(SourceVideo(rel=rel, path=str(video_path), size=-1, caption=None,
                                      reject=str(e)))
            continue
        videos.append(source_video(frames_dir, rel, CAPTION, meta={"camera_source": "nerfstudio"}, sidecars=sidecars))
    return videos, {"raw": str(raw.resolve()), "fps": fps}


REALESTATE_COLUMNS = 19  # timestamp, fx, fy, cx, cy, k1, k2, 12 values of the 3x4 world-to-camera matrix


def read_realestate10k(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(url, timestamps [T] int, rows [T, 18] float64) of a RealEstate10K camera file."""
    try:
        lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    except OSError as e:
        raise cam.PoseError(f"unreadable ({type(e).__name__}: {e})") from None
    if len(lines) < 2:
        raise cam.PoseError("no posed frames (line 1 is the URL, then one line per frame)")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) != REALESTATE_COLUMNS:
            raise cam.PoseError(f"line {n}: {len(parts)} values, expected {REALESTATE_COLUMNS} "
                                "(timestamp fx fy cx cy k1 k2 + 3x4 world-to-camera)")
        try:
            rows.append([float(x) for x in parts])
        except ValueError:
            raise cam.PoseError(f"line {n}: not numbers") from None
    arr = np.array(rows)
    ts = arr[:, 0].astype(np.int64)
    if (np.diff(ts) <= 0).any():
        raise cam.PoseError("timestamps do not increase")
    return lines[0], ts, arr[:, 1:]


def collect_realestate10k(raw: str | os.PathLike, spec: ClipSpec, out: str | os.PathLike, frames_root: str | os.PathLike
                          ) -> tuple[list[SourceVideo], dict]:
    from PIL import Image

    raw, frames_root, made = Path(raw), Path(frames_root), Path(out) / ".frames"
    if not raw.is_dir():
        raise PrepError(f"RAW {raw} is not a directory")
    if not frames_root.is_dir():
        raise PrepError(f"--frames {frames_root} is not a directory")
    files = sorted(raw.rglob("*.txt"))
    if not files:
        raise PrepError(f"RAW {raw} holds no RealEstate10K camera files (<clip>.txt)")
    videos = []
    for f in files:
        clip = f.relative_to(raw).with_suffix("").as_posix()
        rel = f"{clip}.mp4"
        video_path = made / rel
        what = f"clip {clip}"
        try:
            url, ts, rows = read_realestate10k(f)
            if np.abs(rows[:, 4:6]).max() > 0:
                raise cam.PoseError("distortion coefficients k1, k2 are not zero (the frames are not undistorted)")
            folder = frames_root / clip
            source = next((folder.with_suffix(ext) for ext in VIDEO_EXTENSIONS if folder.with_suffix(ext).is_file()),
                          None)
            if folder.is_dir() or source is None:
                images = []
                for t in ts:
                    hit = next((folder / f"{t}{ext}" for ext in (".png", ".jpg", ".jpeg")
                                if (folder / f"{t}{ext}").is_file()), None)
                    images.append(hit)
                missing = [int(t) for t, im in zip(ts, images) if im is None]
                if missing:
                    raise cam.PoseError(f"{len(missing)} of {len(ts)} posed frames have no image in {folder} "
                                        f"(first: timestamp {missing[0]})")
                with Image.open(images[0]) as im:
                    w, h = im.size
            else:
                images = frames_at_timestamps(source, ts)
                h, w = images[0].shape[:2]
            h, w = h - h % 2, w - w % 2
            fps = 1e6 / float(np.median(np.diff(ts))) if len(ts) > 1 else 30.0
            fx, fy, cx, cy = rows[0, :4]
            if np.abs(rows[:, :4] - rows[0, :4]).max() > 1e-6:
                raise cam.PoseError("the intrinsics change within the clip: one camera per clip")
            k = cam.intrinsics_from_normalised(fx, fy, cx, cy, w, h)
            poses = cam.world_to_camera_to_pose(rows[:, 6:].reshape(-1, 3, 4))
            sidecars = camera_sidecars(poses, k, (h, w), spec, what)
            if not video_path.is_file():
                _images_to_video(images, video_path, fps)
        except Exception as e:
            videos.append(SourceVideo(rel=rel, path=str(video_path), size=-1, caption=None, reject=str(e)))
            continue
        videos.append(source_video(made, rel, CAPTION, meta={"camera_source": "realestate10k", "url": url,
                                                              "pose_fps": fps}, sidecars=sidecars))
    return videos, {"raw": str(raw.resolve()), "frames": str(frames_root.resolve())}


def prepare_cameras(raw, out, spec: ClipSpec, layout: ShardLayout = ShardLayout(), *, layout_name: str,
                    workers: int = 1, progress: bool = True, info=None, **options: Any) -> PrepResult:
    if layout_name == "camera_videos":
        videos, params = collect_camera_folders(raw, spec, exclude=out)
    elif layout_name == "nerfstudio":
        videos, params = collect_nerfstudio(raw, spec, out, **options)
    elif layout_name == "realestate10k":
        videos, params = collect_realestate10k(raw, spec, out, **options)
    else:
        raise PrepError(f"unknown camera layout {layout_name!r}")
    return prepare(layout_name, videos, out, spec, layout, workers=workers, source_params=params, info=info,
                   progress=progress)


def _run(layout_name: str, options=lambda a: {}):
    def run(args: Any, cfg: Any) -> PrepResult:
        spec, layout, common = clip_options(args, cfg)
        return prepare_cameras(Path(args.raw), Path(args.out), spec, layout, layout_name=layout_name, **common,
                               **options(args))

    return run


def _nerfstudio(p: Any) -> None:
    p.add_argument("--images-fps", type=float, default=30.0,
                   help="frame rate of the video made of the images (default 30; DL3DV's prep used 7)")


def _realestate(p: Any) -> None:
    p.add_argument("--frames", required=True, help="folder of <clip>/<timestamp>.png|jpg frames")


for _source in (
    PrepSource(name="camera_videos", recipe="camera_control",
               help="one folder per clip: a video + poses.npy (camera-to-world) + intrinsics.json -> camera clip shards",
               run=_run("camera_videos")),
    PrepSource(name="nerfstudio", recipe="camera_control", add_arguments=_nerfstudio,
               help="nerfstudio / DL3DV transforms.json scenes (images + OpenGL poses) -> camera clip shards",
               run=_run("nerfstudio", lambda a: {"fps": float(a.images_fps)})),
    PrepSource(name="realestate10k", recipe="camera_control", add_arguments=_realestate,
               help="RealEstate10K camera files (<clip>.txt) + their frames by timestamp -> camera clip shards",
               run=_run("realestate10k", lambda a: {"frames_root": a.frames})),
):
    register_source(dataclasses.replace(_source, description=_source.help + ". See data_prep/camera_control.py."))
