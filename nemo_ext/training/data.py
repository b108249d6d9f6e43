"""Training data loader: shard index -> clip dataset -> data-parallel, step-resumable sampler.

Samples are split by data-parallel rank only: the TP/PP/CP ranks of one model replica read the
same samples. The sampler starts at the restored global step, so a resumed run sees exactly the
samples it would have seen without the interruption.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_ext.data.dataset import DataParallelBatchSampler, VideoClipDataset, collate_clips
from nemo_ext.data.shards import ShardIndex


def data_source(cfg) -> str:
    """``data.path`` or, when unset, the sample-world directory."""
    return cfg.data.path or cfg.data.sample_dir


def ensure_sample_data(cfg) -> None:
    """Generate the procedural sample world of ``cfg.data`` when no data path is given (a no-op
    when it already exists with the same parameters). Global rank 0 writes, the others wait."""
    if cfg.data.path:
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        from data_prep.sample_world import generate

        generate(
            out_dir=cfg.data.sample_dir,
            variant=cfg.data.sample_variant,
            num_videos=cfg.data.sample_num_videos,
            num_frames=cfg.data.sample_num_frames,
            height=cfg.data.height,
            width=cfg.data.width,
            seed=0,
            workers=max(1, min(8, (os.cpu_count() or 1) - 1)),  # same bytes for any worker count
        )
    if dist.is_initialized():
        dist.barrier()


def build_train_dataloader(cfg, task, start_step: int = 0) -> torch.utils.data.DataLoader:
    d = cfg.data
    index = ShardIndex.from_paths(data_source(cfg), required_exts=("mp4",) + tuple(task.sample_exts))
    dataset = VideoClipDataset(
        index,
        num_frames=d.num_frames,
        height=d.height,
        width=d.width,
        stride=d.frame_stride,
        clip_sampling=d.clip_sampling,
        resize_mode=d.resize_mode,
    )
    sampler = DataParallelBatchSampler(
        num_samples=len(dataset),
        micro_batch_size=d.micro_batch_size,
        global_batch_size=d.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=d.seed,
        start_step=start_step,
        shuffle=d.shuffle,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_clips,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=d.num_workers > 0,
    )
