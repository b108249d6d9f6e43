"""Bad input in the CPU loader: sidecars are cut to the clip and checked; a corrupt video met at
training time is skipped and counted, a data bug fails naming the shard and key, and too many
failures stop the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_ext.data.dataset import VideoClipDataset
from nemo_ext.data.shards import ShardError, ShardIndex, ShardWriter
from nemo_ext.data.video import encode_video
from nemo_ext.training.module import DataAccounting

N = 25


def _video(n=N):
    frames = np.repeat((7 * np.arange(n, dtype=np.uint8))[:, None, None, None], 32 * 32 * 3).reshape(n, 32, 32, 3)
    return encode_video(frames, fps=10)


def _corrupt_mid_stream(mp4: bytes) -> bytes:
    """Keep the container structure, overwrite bytes in the middle of the frame data."""
    data = bytearray(mp4)
    mid = len(data) // 2
    data[mid : mid + 400] = bytes(range(256)) + bytes(144)
    return bytes(data)


def _write(tmp_path, samples):
    with ShardWriter(tmp_path, max_count=100) as w:
        for s in samples:
            w.write(s)
    return tmp_path


def _sample(key, mp4, actions=None, poses=None):
    s = {"__key__": key, "mp4": mp4, "json": {"caption": key, "fps": 10.0}, "nframes.npy": np.array([N], np.int32)}
    if actions is not None:
        s["actions.npy"] = actions
    if poses is not None:
        s["poses.npy"] = poses
    return s


SIDECARS = {"actions.npy": "transitions", "poses.npy": "frames"}


def test_sidecars_are_cut_to_the_clip(tmp_path):
    actions = np.arange(N - 1, dtype=np.float32)[:, None].repeat(7, 1)  # row t = transition t -> t+1
    poses = np.arange(N, dtype=np.float32)[:, None].repeat(3, 1)
    index = ShardIndex.from_paths(_write(tmp_path, [_sample("a", _video(), actions, poses)]), ("mp4",))
    ds = VideoClipDataset(index, num_frames=9, height=32, width=32, clip_sampling="random", sidecars=SIDECARS)
    for seed in range(5):
        item = ds[(0, seed)]
        start = int(round(float((item["video"].mean(dim=(0, 2, 3))[0] + 1) * 127.5 / 7)))
        assert item["poses"][:, 0].tolist() == list(range(start, start + 9))
        assert item["actions"].shape == (8, 7) and item["actions"][:, 0].tolist() == list(range(start, start + 8))


@pytest.mark.parametrize(
    "actions,needle",
    [
        (np.zeros((N, 7), np.float32), "expected 24 rows (one per transition of its 25 frames)"),
        (np.array(["x"] * (N - 1)), "expected a numeric array"),
    ],
)
def test_bad_sidecar_names_shard_and_key(tmp_path, actions, needle):
    index = ShardIndex.from_paths(_write(tmp_path, [_sample("bad", _video(), actions, np.zeros((N, 3), np.float32))]), ("mp4",))
    ds = VideoClipDataset(index, num_frames=9, height=32, width=32, sidecars=SIDECARS)
    with pytest.raises(ShardError) as err:
        ds[(0, 0)]
    assert "bad.actions.npy" in str(err.value) and needle in str(err.value)


def test_missing_member_names_shard_and_key(tmp_path):
    _write(tmp_path, [_sample("nosidecar", _video())])
    with pytest.raises(ShardError) as err:
        ShardIndex.from_paths(tmp_path, ("mp4", "actions.npy"))
    assert "nosidecar" in str(err.value) and "actions.npy" in str(err.value)


def test_corrupt_video_is_skipped_and_counted(tmp_path):
    samples = [_sample("good0", _video()), _sample("broken", _corrupt_mid_stream(_video())), _sample("good1", _video())]
    index = ShardIndex.from_paths(_write(tmp_path, samples), ("mp4",))
    ds = VideoClipDataset(index, num_frames=17, height=32, width=32, clip_sampling="start")
    item = ds[(1, 0)]
    assert item["key"] == "good1" and item["failed_samples"] == 1
    assert ds[(0, 0)]["failed_samples"] == 0


def test_too_many_failures_stop_the_run():
    acc = DataAccounting(max_failed=2, max_fraction=0.5)
    acc({"key": ["a", "b"], "failed_samples": torch.tensor([1, 1])})
    with pytest.raises(RuntimeError, match="data.max_failed_samples"):
        acc({"key": ["c"], "failed_samples": torch.tensor([1])})
    acc = DataAccounting(max_failed=1000, max_fraction=0.01)
    for _ in range(99):
        acc({"key": ["a"], "failed_samples": torch.tensor([0])})
    with pytest.raises(RuntimeError, match="data.max_failed_fraction"):
        acc({"key": ["a", "b"], "failed_samples": torch.tensor([1, 1])})
