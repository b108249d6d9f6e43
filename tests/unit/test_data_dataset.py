"""The CPU clip dataset (content, shapes, errors) and the resumable data-parallel sampler."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nemo_ext.data.dataset import DataParallelBatchSampler, VideoClipDataset, clip_seed_for, collate_clips
from nemo_ext.data.shards import ShardError, ShardIndex, ShardWriter
from nemo_ext.data.video import encode_video

H, W = 48, 64  # stored size; the dataset resizes to 32x32 (crop)


def gray_video(n: int) -> np.ndarray:
    """Frame i is uniform gray 7*i: after any resize the frame index can be read back."""
    return np.repeat((7 * np.arange(n, dtype=np.uint8))[:, None, None, None], H * W * 3).reshape(n, H, W, 3)


def frame_ids(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> estimated source frame index per frame."""
    gray = (video.mean(dim=(0, 2, 3)).numpy() + 1) * 127.5
    return gray / 7


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    with ShardWriter(out, max_count=2) as w:
        for i, n in enumerate([33, 25, 33]):
            w.write({"__key__": f"clip{i}", "mp4": encode_video(gray_video(n), fps=12),
                     "json": {"caption": f"clip number {i}", "fps": 12.0, "num_frames": n},
                     "nframes.npy": np.array([n], np.int32)})
        # no nframes.npy and no caption: the count comes from the json
        w.write({"__key__": "nocaption", "mp4": encode_video(gray_video(17), fps=12),
                 "json": {"fps": 12.0, "num_frames": 17}})
    return out


@pytest.fixture(scope="module")
def index(shard_dir: Path) -> ShardIndex:
    return ShardIndex.from_paths(shard_dir, required_exts=("mp4", "json"))


def test_item_shapes_types_and_metadata(index: ShardIndex) -> None:
    ds = VideoClipDataset(index, num_frames=9, height=32, width=32, stride=2, clip_sampling="start")
    assert len(ds) == 4
    item = ds[(0, 123)]
    assert item["video"].shape == (3, 9, 32, 32) and item["video"].dtype == torch.float32
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert item["caption"] == "clip number 0" and item["key"] == "clip0"
    assert item["fps"] == 12.0 and item["num_frames_total"] == 33
    np.testing.assert_allclose(frame_ids(item["video"]), np.arange(0, 18, 2), atol=0.5)
    last = ds[(3, 0)]
    assert last["caption"] == "" and last["num_frames_total"] == 17  # from json num_frames


def test_random_clip_start_follows_clip_seed(index: ShardIndex) -> None:
    ds = VideoClipDataset(index, num_frames=5, height=32, width=32, stride=3, clip_sampling="random",
                          resize_mode="pad")
    span = 13
    starts = set()
    for seed in range(6):
        item = ds[(1, seed)]  # 25 frames -> start in [0, 12]
        start = random.Random(seed).randint(0, 25 - span)
        starts.add(start)
        ids = frame_ids(item["video"][:, :, 4:28])  # pad: 48x64 -> 24x32 picture in rows 4..27
        np.testing.assert_allclose(ids, start + 3 * np.arange(5), atol=0.5)
        assert torch.equal(item["video"], ds[(1, seed)]["video"])  # same seed, same clip
    assert len(starts) > 1
    padded = ds[(1, 0)]["video"]
    assert torch.all(padded[:, :, :4] == -1) and torch.all(padded[:, :, 28:] == -1)  # black bars


def test_video_shorter_than_span_names_shard_key_and_counts(index: ShardIndex) -> None:
    ds = VideoClipDataset(index, num_frames=9, height=32, width=32, stride=3)
    with pytest.raises(ShardError) as err:
        ds[(3, 0)]
    msg = str(err.value)
    assert "shard-000001.tar" in msg and "'nocaption'" in msg
    assert "has 17 frames" in msg and "25" in msg and "9 frames with stride 3" in msg


def test_dataset_validates_arguments(index: ShardIndex) -> None:
    with pytest.raises(ValueError, match="clip_sampling"):
        VideoClipDataset(index, 9, 32, 32, clip_sampling="middle")
    with pytest.raises(ValueError, match="resize_mode"):
        VideoClipDataset(index, 9, 32, 32, resize_mode="stretch")


def test_dataloader_with_sampler_and_collate(index: ShardIndex) -> None:
    ds = VideoClipDataset(index, num_frames=9, height=16, width=16)
    sampler = DataParallelBatchSampler(len(ds), micro_batch_size=2, global_batch_size=4, dp_rank=0,
                                       dp_size=1, seed=5, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_clips, num_workers=1)
    batches = list(itertools.islice(iter(loader), 2))
    assert [b["key"] for b in batches] == [["clip0", "clip1"], ["clip2", "nocaption"]]
    b = batches[0]
    assert b["video"].shape == (2, 3, 9, 16, 16)
    assert b["fps"].dtype == torch.float32 and b["num_frames_total"].tolist() == [33, 25]
    assert b["caption"] == ["clip number 0", "clip number 1"]


def _take(sampler: DataParallelBatchSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("num_samples,mbs,gbs,dp", [(10, 2, 8, 2), (7, 1, 6, 3), (5, 3, 3, 1), (100, 4, 16, 4)])
def test_sampler_resume_equivalence(num_samples: int, mbs: int, gbs: int, dp: int) -> None:
    per_step = gbs // (mbs * dp)
    for rank in range(dp):
        full = _take(DataParallelBatchSampler(num_samples, mbs, gbs, rank, dp, seed=11), 9 * per_step)
        for k in (1, 3, 7):
            resumed = _take(DataParallelBatchSampler(num_samples, mbs, gbs, rank, dp, seed=11, start_step=k),
                            (9 - k) * per_step)
            assert resumed == full[k * per_step:]


def test_ranks_cover_each_global_batch_exactly_once() -> None:
    n, mbs, gbs, dp = 12, 2, 12, 3  # one step == one epoch: every sample exactly once per step
    per_step = gbs // (mbs * dp)
    streams = [_take(DataParallelBatchSampler(n, mbs, gbs, r, dp, seed=1), 4 * per_step) for r in range(dp)]
    epochs = []
    for step in range(4):
        items = [pair for r in range(dp) for mb in streams[r][step * per_step:(step + 1) * per_step] for pair in mb]
        assert sorted(i for i, _ in items) == list(range(n))
        assert len({seed for _, seed in items}) == gbs  # clip seeds differ per position
        epochs.append([i for i, _ in items])
    assert len({tuple(e) for e in epochs}) == 4  # each epoch is a different permutation
    # rank r holds the r-th contiguous slice of the global order
    ref = DataParallelBatchSampler(n, mbs, gbs, 0, 1, seed=1)
    assert [i for mb in streams[1][:per_step] for i, _ in mb] == [ref.sample_at(p) for p in range(4, 8)]
    assert streams[1][0][0][1] == clip_seed_for(1, 4)


def test_sampler_epochs_and_no_shuffle() -> None:
    s = DataParallelBatchSampler(5, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1, seed=0,
                                 shuffle=False)
    assert [i for mb in _take(s, 4) for i, _ in mb] == [0, 1, 2, 3, 4, 0, 1, 2]
    shuffled = DataParallelBatchSampler(50, 5, 50, 0, 1, seed=0)
    order = [i for mb in _take(shuffled, 10) for i, _ in mb]
    assert sorted(order) == list(range(50)) and order != list(range(50))
    other_seed = DataParallelBatchSampler(50, 5, 50, 0, 1, seed=1)
    assert [i for mb in _take(other_seed, 10) for i, _ in mb] != order
    assert not hasattr(s, "__len__")


def test_sampler_validation_names_the_config_fields() -> None:
    with pytest.raises(ValueError, match=r"data\.global_batch_size \(10\).*data\.micro_batch_size \(2\).*\(3\)"):
        DataParallelBatchSampler(10, micro_batch_size=2, global_batch_size=10, dp_rank=0, dp_size=3, seed=0)
    with pytest.raises(ValueError, match="0 samples"):
        DataParallelBatchSampler(0, 1, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        DataParallelBatchSampler(4, 1, 2, 2, 2, seed=0)


def test_collate_clips_types() -> None:
    items = [{"video": torch.zeros(3, 2, 4, 4), "caption": "a", "key": "k0", "fps": 8.0, "num_frames_total": 17},
             {"video": torch.ones(3, 2, 4, 4), "caption": "b", "key": "k1", "fps": 8.0, "num_frames_total": 9}]
    batch = collate_clips(items)
    assert batch["video"].shape == (2, 3, 2, 4, 4)
    assert batch["caption"] == ["a", "b"] and batch["key"] == ["k0", "k1"]
    assert batch["num_frames_total"].dtype == torch.int64 and batch["num_frames_total"].tolist() == [17, 9]
    assert batch["fps"].dtype == torch.float32
