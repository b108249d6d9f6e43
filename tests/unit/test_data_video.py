"""PyAV encode/probe/decode and resize: frame-exact content, determinism, readable errors."""

from __future__ import annotations

import numpy as np
import pytest

from nemo_ext.data.video import (
    VideoDecodeError,
    VideoInfo,
    decode_frames,
    encode_video,
    probe_video,
    resize_and_crop,
)

NUM_FRAMES = 33


def marker_frames(n: int = NUM_FRAMES, h: int = 64, w: int = 48) -> np.ndarray:
    """Frame i: a textured background and a gray 16x16 marker block of value 7*i (top-left)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = ((xx * 3 + yy * 2 + i * 5) % 64 + 96)[..., None]
        frames[i, :16, :16] = (7 * i) % 256
    return frames


def markers(frames: np.ndarray) -> np.ndarray:
    # inner 8x8 of the block: away from edges where chroma subsampling smears
    return frames[:, 4:12, 4:12].astype(np.float64).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def vp9() -> bytes:
    return encode_video(marker_frames(), fps=8)


def test_encode_is_deterministic_and_probe_reports_content(vp9: bytes) -> None:
    assert encode_video(marker_frames(), fps=8) == vp9
    assert vp9[4:8] == b"ftyp"  # an mp4 container
    info = probe_video(vp9)
    assert info == VideoInfo(num_frames=NUM_FRAMES, fps=8.0, width=48, height=64, codec="vp9")


def test_h264_encode_for_gpu_data() -> None:
    frames = marker_frames(9)
    data = encode_video(frames, fps=24, codec="h264")
    assert data == encode_video(frames, fps=24, codec="h264")
    info = probe_video(data)
    assert (info.codec, info.num_frames, info.fps) == ("h264", 9, 24.0)


def test_fractional_fps_round_trips() -> None:
    info = probe_video(encode_video(marker_frames(9), fps=30000 / 1001))
    assert info.fps == pytest.approx(29.97, abs=0.01)


def test_full_decode_is_frame_exact(vp9: bytes) -> None:
    got = markers(decode_frames(vp9, 0, NUM_FRAMES))
    np.testing.assert_allclose(got, 7 * np.arange(NUM_FRAMES), atol=3)


@pytest.mark.parametrize("start,num,stride", [(0, 8, 1), (5, 8, 3), (1, 4, 10), (32, 1, 1), (16, 9, 2)])
def test_decode_clip_start_stride(vp9: bytes, start: int, num: int, stride: int) -> None:
    clip = decode_frames(vp9, start, num, stride)
    assert clip.shape == (num, 64, 48, 3) and clip.dtype == np.uint8
    expected = 7 * (start + stride * np.arange(num))
    np.testing.assert_allclose(markers(clip), expected, atol=3)


def test_decode_too_few_frames_says_how_many(vp9: bytes) -> None:
    with pytest.raises(VideoDecodeError, match=r"has 33 frames.*asked for 9 frames from frame 10 with stride 3.*needs 35"):
        decode_frames(vp9, 10, 9, 3)
    with pytest.raises(ValueError, match="stride"):
        decode_frames(vp9, 0, 1, 0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 0.7, 0.9])
def test_probe_rejects_truncated(vp9: bytes, fraction: float) -> None:
    data = vp9[: int(len(vp9) * fraction)]
    with pytest.raises(VideoDecodeError) as err:
        probe_video(data)
    msg = str(err.value)
    assert ("empty" in msg) or (f"{len(data)} bytes" in msg)


def test_truncation_never_passes_as_a_shorter_video(vp9: bytes) -> None:
    """Cutting the tail may only hit trailing metadata (then every frame still decodes);
    it must never yield a "valid" video with fewer frames."""
    for cut in list(range(1, 64, 7)) + list(range(64, len(vp9), len(vp9) // 40)):
        try:
            info = probe_video(vp9[:-cut])
        except VideoDecodeError:
            continue
        assert info.num_frames == NUM_FRAMES, f"cut {cut} bytes -> {info.num_frames} frames"


def test_probe_rejects_garbage_and_empty() -> None:
    with pytest.raises(VideoDecodeError, match="cannot open video \\(5000 bytes\\)"):
        probe_video(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoDecodeError, match="empty"):
        probe_video(b"")
    assert issubclass(VideoDecodeError, ValueError)


def test_probe_rejects_mid_stream_corruption(vp9: bytes) -> None:
    data = bytearray(vp9)
    mdat = data.find(b"mdat")
    assert mdat > 0
    for i in range(mdat + 8, mdat + 8 + 2000):
        data[i] = (data[i] * 31 + 7) % 256
    with pytest.raises(VideoDecodeError, match="corrupt"):
        probe_video(bytes(data))


def test_encode_validates_input() -> None:
    with pytest.raises(ValueError, match="even frame size"):
        encode_video(np.zeros((3, 63, 64, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((3, 64, 64, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="codec"):
        encode_video(np.zeros((3, 64, 64, 3), np.uint8), fps=8, codec="mpeg2")


def test_resize_identity_is_untouched() -> None:
    frames = marker_frames(2)
    assert resize_and_crop(frames, 64, 48) is frames


def test_resize_crop_keeps_the_center() -> None:
    frames = np.zeros((2, 64, 96, 3), np.uint8)
    frames[:, :, :16] = 255  # the left 16 columns fall outside the center crop
    frames[:, :, 80:] = 255  # so do the right 16
    frames[:, 24:40, 40:56] = 200  # a block in the middle survives
    out = resize_and_crop(frames, 32, 32, "crop")
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert out[:, :, 0].max() < 40 and out[:, :, -1].max() < 40  # edges: cropped away (antialias spill only)
    assert abs(int(out[0, 16, 16, 0]) - 200) <= 2


def test_resize_pad_letterboxes_with_zeros() -> None:
    frames = np.full((1, 64, 96, 3), 200, np.uint8)  # 3:2 into 32x32 -> 21 rows of content
    out = resize_and_crop(frames, 32, 32, "pad")
    assert out.shape == (1, 32, 32, 3)
    rows = out[0, :, :, 0].mean(axis=1)
    content = np.flatnonzero(rows > 0)
    assert content.size == 21 and content[0] == 5  # centered: 5 rows above, 6 below
    assert np.all(out[0, content[1]:content[-1]] == 200)


def test_resize_upscale_and_mode_check() -> None:
    frames = np.full((1, 16, 16, 3), 90, np.uint8)
    np.testing.assert_array_equal(resize_and_crop(frames, 32, 48, "crop"), 90)
    with pytest.raises(ValueError, match="crop.*pad"):
        resize_and_crop(frames, 8, 8, "stretch")


def _decode_in_child(data: bytes, queue) -> None:
    queue.put(markers(decode_frames(data, 2, 3, 2)).round().tolist())


def test_decode_works_in_a_forked_worker(vp9: bytes) -> None:
    """Regression: after the parent used PyAV's shared (multi-threaded) converter, a forked
    DataLoader-style worker used to hang forever in its first frame conversion."""
    import multiprocessing

    import av

    frame = av.VideoFrame.from_ndarray(marker_frames(1)[0], format="rgb24")
    frame.reformat(format="yuv420p")  # the shared converter now owns a thread pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_decode_in_child, args=(vp9, queue))
    proc.start()
    try:
        got = queue.get(timeout=30)
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    np.testing.assert_allclose(got, [14, 28, 42], atol=3)
