"""Video decode throughput of the training loaders: DALI (NVDEC on GPU, or its CPU decoder for
VP9) against the PyAV loader in DataLoader worker processes, on the same shards.

    python benchmarks/dali_decode.py --codec h264 --sizes 704x1280,256x256 [--out DIR] [--commit SHA]

Writes ``--clips`` synthetic clips per size (``--frames`` frames each: a textured background
panning under a moving square, so the encoder has real motion and detail to code, not flat
colour) as webdataset shards with DALI index files, then reads whole ``--frames``-frame clips at
the source size with each loader for ``--epochs`` passes (the first micro-batch excluded, as
warm-up) and reports output frames per second: decoded, resized/cropped, normalized to
float [-1, 1] and handed over as a torch tensor (on the GPU for DALI ``gpu``). The JSON result
records hardware, versions, the bitrate of the clips and the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def synthetic_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 [F, H, W, 3]: a smooth random texture panning 3 px/frame plus a moving square."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, (width + 3 * frames) // 8 + 2, 3)).astype(np.float32)
    big = np.kron(coarse, np.ones((8, 8, 1), np.float32))  # 8x8 blocks ...
    k = np.ones(5, np.float32) / 5  # ... softened so the texture looks like a scene, not noise
    big = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, big)
    big = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, big)
    out = np.empty((frames, height, width, 3), np.uint8)
    size = max(8, min(height, width) // 6)
    for i in range(frames):
        frame = big[:height, 3 * i: 3 * i + width].copy()
        top, left = (5 * i) % (height - size), (7 * i) % (width - size)
        frame[top: top + size, left: left + size] = (255, 64, 32)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def _encode(args: tuple[int, int, int, int, str]) -> bytes:
    frames, height, width, seed, codec = args
    from nemo_ext.data.video import encode_video

    return encode_video(synthetic_clip(frames, height, width, seed), fps=24.0, codec=codec)


def write_shards(out: Path, clips: int, frames: int, height: int, width: int, codec: str, workers: int) -> dict:
    from nemo_ext.data.shards import ShardWriter

    with ProcessPoolExecutor(workers) as pool:
        videos = list(pool.map(_encode, [(frames, height, width, seed, codec) for seed in range(clips)]))
    with ShardWriter(out, max_count=8) as writer:
        for i, video in enumerate(videos):
            writer.write({"__key__": f"clip{i:04d}", "mp4": video,
                          "json": {"caption": "synthetic", "fps": 24.0, "codec": codec},
                          "nframes.npy": np.array([frames], np.int32)})
    total = sum(len(v) for v in videos)
    return {"clips": clips, "frames_per_clip": frames, "height": height, "width": width, "codec": codec,
            "mbit_per_s_at_24fps": round(total * 8 / (clips * frames / 24.0) / 1e6, 2),
            "bytes_per_clip": total // clips}


def bench_dali(path: Path, frames: int, height: int, width: int, device: str, batches: int,
               micro_batch_size: int, threads: int) -> dict:
    import torch

    from nemo_ext.data.dali import DaliVideoLoader

    gpu = device == "gpu"
    with DaliVideoLoader(path, num_frames=frames, height=height, width=width, micro_batch_size=micro_batch_size,
                         dp_rank=0, dp_size=1, seed=0, device=device, device_id=0 if gpu else None,
                         num_threads=threads, clip_sampling="start", initial_fill=8) as loader:
        next(loader)  # warm-up: pipeline build, decoder init
        if gpu:
            torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            batch = next(loader)
            n += batch["video"].shape[0] * batch["video"].shape[2]
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"loader": f"dali_{device}", "threads": threads, "micro_batch_size": micro_batch_size,
            "frames": n, "seconds": round(seconds, 3), "frames_per_s": round(n / seconds, 1)}


def bench_pyav(path: Path, frames: int, height: int, width: int, batches: int, micro_batch_size: int,
               workers: int) -> dict:
    import torch

    from nemo_ext.data.dataset import VideoClipDataset, collate_clips
    from nemo_ext.data.shards import ShardIndex

    dataset = VideoClipDataset(ShardIndex.from_paths(path), num_frames=frames, height=height, width=width,
                               clip_sampling="start")
    order = [[((b * micro_batch_size + i) % len(dataset), b * micro_batch_size + i) for i in range(micro_batch_size)]
             for b in range(batches + 1)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=workers, collate_fn=collate_clips,
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)  # warm-up: worker start
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch["video"].shape[0] * batch["video"].shape[2]
    seconds = time.perf_counter() - start
    return {"loader": "pyav_cpu", "workers": workers, "micro_batch_size": micro_batch_size,
            "frames": n, "seconds": round(seconds, 3), "frames_per_s": round(n / seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="h264", choices=["h264", "vp9"])
    parser.add_argument("--sizes", default="704x1280,256x256", help="HxW list of the clips (and of the output)")
    parser.add_argument("--frames", type=int, default=121, help="frames per clip (the loaders read whole clips)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the clips per measurement")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--dali-threads", type=int, default=4)
    parser.add_argument("--pyav-workers", default="1,4,15", help="DataLoader worker counts to measure")
    parser.add_argument("--skip-dali", action="store_true")
    parser.add_argument("--work", type=Path, help="where the shards go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--commit", help="git commit of the code (for a copy of the tree without .git)")
    args = parser.parse_args(argv)

    import torch

    from recipe_throughput import _commit, _hardware

    gpu = torch.cuda.is_available()
    dali_device = "gpu" if gpu else "cpu"
    if not gpu and args.codec != "vp9" and not args.skip_dali:
        parser.error("DALI's CPU decoder reads VP9/VP8/MJPEG only: use --codec vp9 or --skip-dali on CPU")
    versions = {}
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        if not args.skip_dali:
            parser.error("NVIDIA DALI is not installed (pip install 'cosmos-recipes[dali]'), or pass --skip-dali")
    import av

    versions["pyav"] = av.__version__
    work = args.work or Path(tempfile.mkdtemp(prefix="dali_decode_"))
    results = []
    for size in args.sizes.split(","):
        height, width = (int(x) for x in size.lower().split("x"))
        shards = work / f"{args.codec}_{height}x{width}"
        t0 = time.perf_counter()
        clips = write_shards(shards, args.clips, args.frames, height, width, args.codec, max(1, (os.cpu_count() or 2) - 1))
        print(f"{size}: wrote {args.clips} {args.codec} clips in {time.perf_counter() - t0:.1f}s "
              f"({clips['mbit_per_s_at_24fps']} Mbit/s at 24 fps)", flush=True)
        batches = args.epochs * args.clips // args.micro_batch_size
        runs = []
        if not args.skip_dali:
            runs.append(bench_dali(shards, args.frames, height, width, dali_device, batches, args.micro_batch_size,
                                   args.dali_threads))
            print(f"  {runs[-1]}", flush=True)
        for workers in (int(w) for w in args.pyav_workers.split(",") if w):
            runs.append(bench_pyav(shards, args.frames, height, width, batches, args.micro_batch_size, workers))
            print(f"  {runs[-1]}", flush=True)
        results.append({**clips, "runs": runs})

    hardware = _hardware()
    record = {
        "benchmark": "dali_decode",
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or _commit(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "hardware": hardware,
        "versions": versions,
        "measures": "output frames/s of whole clips at the source size: decode + resize/crop + normalize to "
                    "float [-1, 1] + torch tensor (on the GPU for DALI gpu); first micro-batch excluded",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    words = (hardware.get("gpu") or platform.machine()).replace("/", "-").split()
    tag = words[1] if words[0] == "NVIDIA" and len(words) > 1 else words[0]  # "NVIDIA H100 80GB HBM3" -> H100
    path = args.out / f"dali_decode_{args.codec}_{tag}_{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
