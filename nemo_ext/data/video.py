"""In-memory video encode/decode with PyAV, plus the resize/crop used by the CPU loader.

Why PyAV: it is the one decoder that handles every codec on CPU and is the fastest measured
there (research/data_feasibility.md section 2.5); data prep also uses it to validate every
video once, because DALI cannot skip a corrupt sample inside a batch (section 2.4).

Why VP9 by default: DALI's CPU video decoder reads VP8/VP9/MJPEG only, so CPU-side data and
test fixtures are VP9 in ``.mp4``; H.264 (``codec="h264"``) is for data decoded by NVDEC.

Encoding is single-threaded with fixed quality settings and bit-exact muxing so that the same
frames always give the same bytes: shards, manifests and their sha256 are then reproducible.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

logger = logging.getLogger(__name__)

__all__ = [
    "VideoDecodeError",
    "frame_converter",
    "open_video",
    "VideoInfo",
    "encode_video",
    "probe_video",
    "decode_frames",
    "resize_and_crop",
]

# codec name accepted by encode_video -> (FFmpeg encoder, encoder options). Options are fixed
# (constant quality, one thread) because determinism matters more here than encode speed.
_ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    "vp9": (
        "libvpx-vp9",
        {"crf": "20", "b:v": "0", "deadline": "good", "cpu-used": "4", "row-mt": "0", "threads": "1"},
    ),
    # mbtree off: with it, this libx264 build gave different bytes for the same input in up to
    # half of the runs under CPU load, even with one thread; without it, 1200 of 1200 agreed.
    "h264": ("libx264", {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}),
}


class VideoDecodeError(ValueError):
    """A video could not be decoded (corrupt, truncated, empty) or has too few frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What a full decode of a video found (not what the container claims)."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str


def _check_frames(frames: np.ndarray, what: str = "frames") -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"{what} must be a uint8 numpy array, got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"{what} must have shape [F>0, H, W, 3], got {tuple(frames.shape)}")


def encode_video(frames: np.ndarray, fps: float, codec: str = "vp9", container: str = "mp4") -> bytes:
    """Encode RGB uint8 frames ``[F, H, W, 3]`` to video bytes, entirely in memory.

    Deterministic: the same frames, fps and codec always give the same bytes (one encoder thread,
    constant-quality settings, bit-exact muxer flags). H and W must be even (yuv420p).
    """
    _check_frames(frames)
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {codec!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got height={height} width={width}")
    encoder, options = _ENCODERS[codec]
    rate = Fraction(fps).limit_denominator(100_000)

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = dict(options)
        converter = frame_converter()
        for i, rgb in enumerate(frames):
            # converted here with our own single-threaded converter, not implicitly by the encoder
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = converter.reformat(frame, format="yuv420p", threads=1)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())  # flush delayed frames
    return buf.getvalue()


def frame_converter() -> VideoReformatter:
    """A fresh, single-threaded pixel converter for one encode/decode call.

    PyAV's ``frame.to_ndarray()`` / ``frame.reformat()`` go through one shared converter whose
    swscale context owns a thread pool (threads=auto). After a fork (DataLoader workers) the
    child inherits that context without its threads and hangs joining them on the next
    conversion (observed with PyAV 19). A private one-thread converter per call avoids the hang.
    """
    return VideoReformatter()


def open_video(data: bytes) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open ``data`` and return its first video stream, with a readable error if impossible."""
    if not data:
        raise VideoDecodeError("cannot decode video: the input is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # PyAV raises several FFmpegError subclasses (and EOFError)
        raise VideoDecodeError(f"cannot open video ({len(data)} bytes): {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"the input ({len(data)} bytes) contains no video stream")
    return container, container.streams.video[0]


def _fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(data: bytes) -> VideoInfo:
    """Decode every frame of ``data`` once and report what was found.

    This is the validation data prep runs on each video: a full decode catches truncation and
    mid-stream corruption that opening the container alone does not. Raises
    :class:`VideoDecodeError` for anything unreadable, for zero frames, and when fewer frames
    decode than the container declares.
    """
    container, stream = open_video(data)
    try:
        num_frames = 0
        converter = frame_converter()
        try:
            for frame in container.decode(stream):
                converter.reformat(frame, format="rgb24", threads=1)  # can fail on broken frames too
                num_frames += 1
        except Exception as e:
            raise VideoDecodeError(
                f"video ({len(data)} bytes) is corrupt: decoding failed after {num_frames} frames: {e}"
            ) from e
        declared = stream.frames
        ctx = stream.codec_context
        info = VideoInfo(num_frames=num_frames, fps=_fps(stream), width=ctx.width, height=ctx.height,
                         codec=ctx.name)
    finally:
        container.close()
    if num_frames == 0:
        raise VideoDecodeError(f"video ({len(data)} bytes) has no decodable frames")
    if declared and num_frames < declared:
        raise VideoDecodeError(
            f"video ({len(data)} bytes) is truncated: decoded {num_frames} frames, "
            f"the container declares {declared}"
        )
    return info


def decode_frames(data: bytes, start: int, num_frames: int, stride: int = 1) -> np.ndarray:
    """Decode frames ``start, start+stride, ...`` (``num_frames`` of them) as RGB uint8 ``[F,H,W,3]``.

    Decodes sequentially from the first frame and stops as soon as the last wanted frame is out:
    short training clips from short videos do not pay for a seek, and the frame index is exact
    (seeking by timestamp can land on the wrong frame for some containers).
    """
    if start < 0 or num_frames < 1 or stride < 1:
        raise ValueError(f"need start >= 0, num_frames >= 1, stride >= 1; got start={start}, "
                         f"num_frames={num_frames}, stride={stride}")
    last = start + (num_frames - 1) * stride
    out: list[np.ndarray] = []
    container, stream = open_video(data)
    index = -1
    converter = frame_converter()
    try:
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index >= start and (index - start) % stride == 0:
                    out.append(converter.reformat(frame, format="rgb24", threads=1).to_ndarray())
                    if index == last:
                        break
        except Exception as e:
            raise VideoDecodeError(
                f"video ({len(data)} bytes) is corrupt: decoding failed at frame {index + 1}: {e}"
            ) from e
    finally:
        container.close()
    if len(out) < num_frames:
        raise VideoDecodeError(
            f"video has {index + 1} frames; asked for {num_frames} frames from frame {start} with "
            f"stride {stride}, which needs {last + 1}"
        )
    return np.stack(out)


def _target_hw(h: int, w: int, height: int, width: int, cover: bool) -> tuple[int, int]:
    """Size after aspect-preserving scaling so the result covers (or fits in) height x width."""
    scale = max(height / h, width / w) if cover else min(height / h, width / w)
    new_h, new_w = round(h * scale), round(w * scale)
    if cover:  # rounding must never leave the target uncovered
        return max(new_h, height), max(new_w, width)
    return min(max(new_h, 1), height), min(max(new_w, 1), width)


def _resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    if frames.shape[1:3] == (h, w):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def resize_and_crop(frames: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Resize ``[F,H,W,3]`` uint8 frames to ``[F,height,width,3]``, keeping the aspect ratio.

    ``crop``: scale so the target is covered, then center-crop (no borders, loses edges).
    ``pad``: scale so the frame fits, then center it on black (keeps everything, adds borders).
    Frames already at the target size are returned unchanged.
    """
    _check_frames(frames)
    if mode not in ("crop", "pad"):
        raise ValueError(f"resize mode must be 'crop' or 'pad', got {mode!r}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got height={height} width={width}")
    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    new_h, new_w = _target_hw(h, w, height, width, cover=(mode == "crop"))
    resized = _resize(frames, new_h, new_w)
    if mode == "crop":
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.ascontiguousarray(resized[:, top:top + height, left:left + width])
    out = np.zeros((f, height, width, 3), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = resized
    return out
