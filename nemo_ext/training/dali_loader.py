"""The DALI training loader of a run (``data.backend=dali``): one DaliVideoLoader per data source,
the source of every micro-batch chosen by the same schedule as the CPU path, and the readers'
state carried in checkpoints (each data-parallel rank saves its own).

Decoding runs on NVDEC (``mixed``) when the run is on GPU and on DALI's CPU decoder otherwise
(VP9/VP8/MJPEG only).
"""

from __future__ import annotations

import logging
from typing import Optional

from megatron.core import parallel_state

from nemo_ext.data.dali import DaliVideoLoader
from nemo_ext.data.mixture import choose_source
from nemo_ext.training.data import schedule, sources

logger = logging.getLogger(__name__)


class DaliTrainLoader:
    def __init__(self, cfg, task, plan, start_step: int, states: Optional[dict] = None):
        import torch

        d = cfg.data
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.seed = d.seed
        self.schedule = schedule(cfg)
        self.names = [name for name, _ in sources(cfg)]
        self.micro_batches_per_step = plan.num_microbatches
        self.step, self.microbatch = start_step, 0
        states = states or {}
        gpu = plan.device == "cuda"
        self.loaders = [
            DaliVideoLoader(
                path,
                num_frames=d.num_frames,
                height=d.height,
                width=d.width,
                micro_batch_size=d.micro_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                seed=d.seed + 7919 * i,
                stride=d.frame_stride,
                clip_sampling=d.clip_sampling,
                resize_mode=d.resize_mode,
                device="gpu" if gpu else "cpu",
                device_id=torch.cuda.current_device() if gpu else None,
                num_threads=max(2, d.num_workers),
                sidecars=dict(task.sidecars),
                shuffle=d.shuffle,
                state=states.get(name),
                max_failed_samples=d.max_failed_samples,
                max_failed_fraction=d.max_failed_fraction,
                caption_choice=d.caption_choice,
            )
            for i, (name, path) in enumerate(sources(cfg))
        ]
        missing = [name for name in self.names if name not in states]
        if start_step and missing:
            logger.warning("resuming at step %d without the DALI reader positions of %s: their sample order "
                           "starts over", start_step, ", ".join(missing))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        src = choose_source(self.schedule, self.seed, self.step, self.dp_rank, self.microbatch)
        batch = next(self.loaders[src])
        batch["source"] = [self.names[src]] * len(batch["key"])
        self.microbatch += 1
        if self.microbatch == self.micro_batches_per_step:
            self.step, self.microbatch = self.step + 1, 0
        return batch

    def state_dict(self) -> dict[str, bytes]:
        """Reader positions after the last micro-batch returned, per source (this DP rank)."""
        return {name: loader.state_dict() for name, loader in zip(self.names, self.loaders)}

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def build_dali_loader(cfg, task, plan, start_step: int, states: Optional[dict] = None) -> DaliTrainLoader:
    return DaliTrainLoader(cfg, task, plan, start_step, states)
