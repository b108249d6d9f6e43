"""Training data: the loader of a run, built from ``cfg.data`` and the task.

* ``data.path`` (or the generated sample world) or a mixture of ``data.sources`` weighted by the
  ``data.stages`` schedule (equal weights when no stage is given);
* ``data.kind``: ``video`` (encoded clips decoded on the fly) or ``latent`` (precomputed latents
  and T5 embeddings: no decoding, no encoders);
* ``data.backend``: ``dali`` (NVDEC on GPU; VP9/VP8/MJPEG on CPU), ``pyav`` (CPU decoding in
  DataLoader workers, any codec) or ``auto`` (the default: DALI wherever it can decode the data,
  i.e. on GPU or for CPU-decodable codecs, PyAV otherwise; the choice and its reason are logged).

Samples are split by data-parallel rank only: the TP/PP/CP ranks of one model replica read the
same samples. The PyAV and latent paths are step-resumable without state; the DALI path carries
its reader state in the checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_ext.data.dataset import DataParallelBatchSampler, VideoClipDataset, collate_clips
from nemo_ext.data.shards import ShardIndex

logger = logging.getLogger(__name__)


def data_source(cfg) -> str:
    """``data.path`` or, when unset, the sample-world directory."""
    return cfg.data.path or cfg.data.sample_dir


def sources(cfg) -> list[tuple[str, str]]:
    """(name, path) of every shard set the run reads."""
    if cfg.data.sources:
        return [(s.name, s.path) for s in cfg.data.sources]
    return [("data", data_source(cfg))]


def schedule(cfg):
    from nemo_ext.data.mixture import Schedule, Stage

    names = [name for name, _ in sources(cfg)]
    stages = [Stage(s.until_step, dict(s.weights)) for s in cfg.data.stages] or [Stage(None, {n: 1.0 for n in names})]
    return Schedule(names, stages)


def video_backend(cfg, plan) -> tuple[str, str]:
    """(``dali`` | ``pyav``, why) for a video run: ``data.backend`` resolved on this machine."""
    import importlib.util

    chosen = cfg.data.backend
    if chosen != "auto":
        return chosen, f"data.backend={chosen}"
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return "pyav", "NVIDIA DALI is not installed (pip install 'cosmos-recipes[dali]')"
    if plan.device == "cuda":
        for name, path in sources(cfg):
            info = source_video(path)
            small = min(info.get("width") or NVDEC_VP9_MIN, info.get("height") or NVDEC_VP9_MIN) < NVDEC_VP9_MIN
            if info.get("codec") == "vp9" and small:
                return "pyav", (f"source {name!r} holds {info['width']}x{info['height']} VP9 video, below NVDEC's VP9 "
                                f"minimum of {NVDEC_VP9_MIN}x{NVDEC_VP9_MIN} (the sample worlds are 64x64)")
        return "dali", "GPU run: NVDEC decodes"
    from nemo_ext.data.dali import CPU_CODECS

    for name, path in sources(cfg):
        codec = source_codec(path)
        if codec not in CPU_CODECS:
            return "pyav", (f"source {name!r} holds {codec or 'undetectable'} video, which DALI's CPU decoder "
                            f"cannot read (it reads {', '.join(CPU_CODECS)})")
    return "dali", f"CPU run on {'/'.join(sorted({source_codec(p) for _, p in sources(cfg)}))} video"


# Measured on an H200 (DALI 2.4): NVDEC refuses VP9 below 128x128 ("Video is too small ... supported:128x128").
NVDEC_VP9_MIN = 128


def source_codec(path) -> str | None:
    """The codec of a shard set's first video (see :func:`source_video`); None if nothing says."""
    return source_video(path).get("codec")


def source_video(path) -> dict:
    """``codec``, ``width``, ``height`` of a shard set's first video: its json's keys (written by data_prep
    and the sample world), else a header probe of the video itself; a key nothing says is missing."""
    import io
    import json
    import tarfile

    from nemo_ext.data.shards import expand_paths

    shards = sorted(expand_paths(path))
    if not shards:
        return {}
    with tarfile.open(shards[0]) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                meta = json.loads(tar.extractfile(member).read())
                if isinstance(meta, dict) and meta.get("codec"):
                    return {"codec": str(meta["codec"]), **{k: int(meta[k]) for k in ("width", "height")
                                                              if isinstance(meta.get(k), (int, float))}}
            elif member.name.endswith(".mp4"):
                import av

                try:
                    with av.open(io.BytesIO(tar.extractfile(member).read())) as container:
                        ctx = container.streams.video[0].codec_context
                        return {"codec": ctx.name, "width": ctx.width, "height": ctx.height}
                except (av.FFmpegError, IndexError):
                    return {}
    return {}


# The held-out sample world is the same procedural world with other videos (the training world
# uses seed 0).
HELD_OUT_SAMPLE_SEED = 1


def held_out_sample_dir(cfg) -> str:
    """Where the held-out sample world of the validation loss lives: ``<data.sample_dir>_val``."""
    return str(Path(cfg.data.sample_dir)) + "_val"


def ensure_sample_data(cfg) -> None:
    """Generate the procedural sample world of ``cfg.data`` when no data is given, and its held-out
    counterpart (``<data.sample_dir>_val``) when validation is on and ``data.val_path`` is unset
    (a no-op for each when it already exists with the same parameters). Global rank 0 writes, the
    others wait."""
    d = cfg.data
    if d.path or d.sources:
        return
    worlds = [(d.sample_dir, d.sample_num_videos, 0, False)]
    if cfg.trainer.val_every_n_steps > 0 and not d.val_path:
        worlds.append((held_out_sample_dir(cfg), d.sample_val_num_videos, HELD_OUT_SAMPLE_SEED, True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        from nemo_ext.worlds import generate

        for out_dir, num_videos, seed, held_out in worlds:
            generate(
                out_dir=out_dir,
                variant=d.sample_variant,
                num_videos=num_videos,
                num_frames=d.sample_num_frames,
                height=d.height,
                width=d.width,
                seed=seed,
                workers=max(1, min(8, (os.cpu_count() or 1) - 1)),  # same bytes for any worker count
                regenerate_outdated=True,  # the recipes' own data/sample/ worlds follow the code
                held_out=held_out,
            )
    if dist.is_initialized():
        dist.barrier()


def _dataset(cfg, task, plan, path, clip_sampling=None):
    d = cfg.data
    sidecars = dict(task.sidecars)
    if d.kind == "tokens":  # the AR family's precomputed token shards
        from nemo_ext.data.tokens import build_token_dataset

        return build_token_dataset(cfg, path, sidecars)
    if d.kind == "latent":
        from nemo_ext.data.latents import LATENT_EXTS, LatentClipDataset

        index = ShardIndex.from_paths(path, required_exts=LATENT_EXTS + tuple(sidecars))
        context_shape = (cfg.model.text_encoder.max_length, cfg.model.context_dim)
        return LatentClipDataset(index, plan.latent_shape, context_shape, sidecars)
    index = ShardIndex.from_paths(path, required_exts=("mp4",) + tuple(task.sample_exts) + tuple(sidecars))
    return VideoClipDataset(
        index,
        num_frames=d.num_frames,
        height=d.height,
        width=d.width,
        stride=d.frame_stride,
        clip_sampling=clip_sampling or d.clip_sampling,
        resize_mode=d.resize_mode,
        sidecars=sidecars,
        caption_choice=d.caption_choice,
    )


def build_train_dataloader(cfg, task, plan, start_step: int = 0, states=None):
    """This rank's training loader from ``start_step`` on. The PyAV loader recomputes its position
    from the step; the DALI loader restores the per-source reader ``states`` of a checkpoint."""
    d = cfg.data
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if d.kind == "video":
        backend, why = video_backend(cfg, plan)
        logger.info("decoding video with %s (%s)", "DALI" if backend == "dali" else "PyAV", why)
        if backend == "dali":
            from nemo_ext.training.dali_loader import build_dali_loader

            return build_dali_loader(cfg, task, plan, start_step, states)
    named = sources(cfg)
    datasets = [_dataset(cfg, task, plan, path) for _, path in named]
    if len(datasets) == 1:
        dataset = datasets[0]
        sampler = DataParallelBatchSampler(
            num_samples=len(dataset),
            micro_batch_size=d.micro_batch_size,
            global_batch_size=d.global_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=d.seed,
            start_step=start_step,
            shuffle=d.shuffle,
        )
    else:
        from nemo_ext.data.mixture import ConcatSources, MixtureBatchSampler

        dataset = ConcatSources(datasets, [name for name, _ in named])
        sampler = MixtureBatchSampler(
            [len(x) for x in datasets], schedule(cfg), d.micro_batch_size, d.global_batch_size, dp_rank, dp_size,
            seed=d.seed, start_step=start_step, shuffle=d.shuffle,
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_clips,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=d.num_workers > 0,
        worker_init_fn=ignore_preemption_signals,
    )


def ignore_preemption_signals(_worker_id: int) -> None:
    """Loader workers leave SIGUSR1/SIGTERM to the trainer: Slurm signals every process of a job
    step, and a worker killed by the preemption warning would take the run down before its
    checkpoint (workers still exit with the trainer: PyTorch watches their parent)."""
    import signal

    from nemo_ext.training.preemption import PREEMPTION_SIGNALS

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
