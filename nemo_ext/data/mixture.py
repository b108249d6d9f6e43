"""Data mixtures: several shard sets with weights, and a staged schedule of weights.

Post-training typically mixes sources (different quality, camera, relevance) and runs in two
stages: a broad mixture first, then a high-quality subset. A schedule is a list of stages, each
active until a global step, with a weight per source. The source of every micro-batch is drawn
from the active stage's weights by a generator seeded by (seed, step, data-parallel rank,
micro-batch): the choice depends only on the step, so a resumed run replays the counts and
continues each source's stream exactly where it was.

Each source is consumed by a per-rank stream: rank ``r``'s ``k``-th draw from a source takes
position ``k * dp + r`` of that source's epoch-permuted order, so the ranks share every epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset

from nemo_ext.data.dataset import DataParallelBatchSampler, clip_seed_for


@dataclass(frozen=True)
class Stage:
    until_step: Optional[int]  # None: until the end of training
    weights: dict[str, float]


class Schedule:
    """Stages in order; ``weights_at(step)`` are the normalized weights of the active stage."""

    def __init__(self, sources: Sequence[str], stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a mixture schedule needs at least one stage")
        self.sources = list(sources)
        self.bounds: list[int] = []
        self.weights: list[np.ndarray] = []
        for i, stage in enumerate(stages):
            unknown = sorted(set(stage.weights) - set(self.sources))
            if unknown:
                raise ValueError(f"data.stages[{i}].weights names unknown sources {unknown}; sources: {self.sources}")
            w = np.array([float(stage.weights.get(name, 0.0)) for name in self.sources])
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"data.stages[{i}].weights must be >= 0 with a positive sum, got {stage.weights}")
            last = i == len(stages) - 1
            if stage.until_step is None and not last:
                raise ValueError(f"data.stages[{i}].until_step is null but later stages follow")
            if stage.until_step is not None and self.bounds and stage.until_step <= self.bounds[-1]:
                raise ValueError(f"data.stages[{i}].until_step={stage.until_step} must be larger than the previous stage's")
            self.bounds.append(stage.until_step if stage.until_step is not None else np.iinfo(np.int64).max)
            self.weights.append(w / w.sum())

    def stage_at(self, step: int) -> int:
        return min(bisect.bisect_right(self.bounds, step), len(self.bounds) - 1)

    def weights_at(self, step: int) -> np.ndarray:
        return self.weights[self.stage_at(step)]


class ConcatSources(Dataset):
    """Several clip datasets as one index space; items gain their ``source`` name."""

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str]):
        self.datasets = list(datasets)
        self.names = list(names)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, clip_seed = item
        s = bisect.bisect_right(self.offsets, index) - 1
        out = self.datasets[s][(index - self.offsets[s], clip_seed)]
        out["source"] = self.names[s]
        return out


def _choice_seed(seed: int, step: int, dp_rank: int, microbatch: int) -> int:
    return clip_seed_for(seed ^ 0x5EED, (step * 65_537 + dp_rank) * 4_099 + microbatch)


def choose_source(schedule: Schedule, seed: int, step: int, dp_rank: int, microbatch: int) -> int:
    """The source of one micro-batch: a pure function of (seed, step, rank, micro-batch)."""
    u = _choice_seed(seed, step, dp_rank, microbatch) / 2.0**31  # uniform in [0, 1)
    cdf = np.cumsum(schedule.weights_at(step))
    return min(int(np.searchsorted(cdf, u, side="right")), len(schedule.sources) - 1)


class MixtureBatchSampler:
    """Infinite, step-resumable micro-batches of ``(concat index, clip seed)`` for one DP rank
    of a :class:`ConcatSources`, each micro-batch from one source chosen by the schedule."""

    def __init__(self, sizes: Sequence[int], schedule: Schedule, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, start_step: int = 0, shuffle: bool = True):
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every mixture source needs samples; sizes {dict(zip(schedule.sources, sizes))}")
        self.schedule = schedule
        self.mbs = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.start_step = start_step
        # One stream per source (sample order per epoch); positions are rank-interleaved.
        self.streams = [
            DataParallelBatchSampler(n, micro_batch_size, global_batch_size, dp_rank, dp_size, seed + 7919 * (i + 1),
                                     shuffle=shuffle)
            for i, n in enumerate(sizes)
        ]
        self.offsets = np.cumsum([0] + list(sizes)).tolist()
        self.micro_batches_per_step = global_batch_size // (micro_batch_size * dp_size)

    def choose(self, step: int, microbatch: int) -> int:
        return choose_source(self.schedule, self.seed, step, self.dp_rank, microbatch)

    def draws_before(self, step: int) -> list[int]:
        """Micro-batches this rank drew from each source before ``step`` (replayed on resume)."""
        counts = [0] * len(self.streams)
        for s in range(step):
            for m in range(self.micro_batches_per_step):
                counts[self.choose(s, m)] += 1
        return counts

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        drawn = self.draws_before(self.start_step)
        step = self.start_step
        while True:
            for m in range(self.micro_batches_per_step):
                src = self.choose(step, m)
                stream = self.streams[src]
                out = []
                for j in range(self.mbs):
                    position = (drawn[src] * self.mbs + j) * self.dp_size + self.dp_rank
                    out.append((self.offsets[src] + stream.sample_at(position), clip_seed_for(stream.seed, position)))
                drawn[src] += 1
                yield out
            step += 1
