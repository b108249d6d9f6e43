"""Mixtures and the staged schedule: proportions follow the weights, stages switch at their step,
resume replays exactly, and the ranks share each source's samples."""

from __future__ import annotations

import itertools

import pytest

from nemo_ext.data.mixture import MixtureBatchSampler, Schedule, Stage

SOURCES = ["broad", "hq"]


def _sampler(stages, sizes=(1000, 100), dp_rank=0, dp_size=1, start_step=0, mbs=1, gbs=4):
    return MixtureBatchSampler(list(sizes), Schedule(SOURCES, stages), mbs, gbs, dp_rank, dp_size, seed=3,
                               start_step=start_step)


def _sources(batches, offsets=(0, 1000)):
    return [0 if idx < offsets[1] else 1 for b in batches for idx, _ in b]


def test_proportions_follow_the_weights():
    batches = list(itertools.islice(iter(_sampler([Stage(None, {"broad": 0.8, "hq": 0.2})])), 4000))
    src = _sources(batches)
    assert abs(src.count(1) / len(src) - 0.2) < 0.02


def test_two_stage_schedule_switches_at_its_step():
    sampler = _sampler([Stage(100, {"broad": 0.7, "hq": 0.3}), Stage(None, {"hq": 1.0})])
    batches = list(itertools.islice(iter(sampler), 4 * 150))  # 4 micro-batches per step
    first, second = _sources(batches[: 4 * 100]), _sources(batches[4 * 100:])
    assert 0.2 < first.count(1) / len(first) < 0.4
    assert set(second) == {1}


def test_resume_replays_each_source_stream():
    stages = [Stage(10, {"broad": 0.5, "hq": 0.5}), Stage(None, {"broad": 0.1, "hq": 0.9})]
    full = list(itertools.islice(iter(_sampler(stages)), 4 * 30))
    resumed = list(itertools.islice(iter(_sampler(stages, start_step=17)), 4 * 13))
    assert resumed == full[4 * 17:]


def test_ranks_share_a_source_epoch_without_overlap():
    stages = [Stage(None, {"hq": 1.0})]
    seen = []
    for rank in (0, 1):
        batches = itertools.islice(iter(_sampler(stages, dp_rank=rank, dp_size=2, sizes=(1000, 100))), 50)
        seen += [idx for b in batches for idx, _ in b]
    assert sorted(seen) == list(range(1000, 1100))  # 2 ranks x 50 draws = one epoch of "hq"


@pytest.mark.parametrize(
    "stages,needle",
    [
        ([Stage(None, {"nope": 1.0})], "unknown sources ['nope']"),
        ([Stage(None, {"broad": 0.0})], "positive sum"),
        ([Stage(None, {"broad": 1.0}), Stage(None, {"hq": 1.0})], "until_step is null"),
        ([Stage(10, {"broad": 1.0}), Stage(5, {"hq": 1.0}), Stage(None, {"hq": 1.0})], "must be larger"),
    ],
)
def test_bad_schedules_name_the_field(stages, needle):
    with pytest.raises(ValueError) as err:
        Schedule(SOURCES, stages)
    assert needle in str(err.value)
