"""camera_control: camera poses in, 3D-consistent video out.

Per sample the shards hold the camera of every frame, ``<key>.poses.npy`` float32 ``[T, 16]`` (the
4x4 camera-to-world matrix, row-major, OpenCV axes: :mod:`nemo_ext.conditioning.camera`), and the
intrinsics of the stored video, ``<key>.intrinsics.npy`` float32 ``[6]`` = (fx, fy, cx, cy, width,
height) in its pixels. Per clip the conditioner makes the poses relative to the clip's first frame,
normalises the translations (``task.normalise``), carries the intrinsics through the loader's resize /
crop / pad (``data.resize_mode``) and picks one pose per latent frame, explicitly
(``task.pose_frame``: the last (default) or first pixel frame of each latent frame's group).

* diffusion (Video2World): Plücker rays (6 channels, ``[o x d, d]``) at latent resolution, zero on
  letterbox padding, concatenated to the latent input (``extra_channels`` 6). The patch embedding's
  new columns start at zero (built so, and widened so when a base checkpoint without them loads):
  step 0 is the base model.
* autoregressive: one context token per latent frame from an MLP over its relative pose (3x4) plus a
  learned frame embedding, before the caption's T5 tokens in cross-attention. Not zero-initialised,
  for the reason action_control's AR tokens are not (megatron's bias-free cross-attention gives zero
  gradient to an all-zero context).

The folder: this file, ``world.py`` (a 3D room rendered along camera paths, with exact poses and
depth), ``evaluation.py``; recipes in ``recipes/camera_control/``.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn as nn

from nemo_ext.conditioning import Conditioning, tokens_then_text
from nemo_ext.data.signals import Signal
from nemo_ext.tasks.base import TaskConfig, TaskSpec, register_task, require_video2world

POSES = Signal("poses.npy", "frames", "poses",
               description="camera-to-world 4x4 per frame, row-major [T, 16], OpenCV axes")
INTRINSICS = Signal("intrinsics.npy", "static", "intrinsics",
                    description="fx, fy, cx, cy, width, height of the stored video, pixels")
PLUCKER_CHANNELS = 6
NORMALISATIONS = ("max_distance", "none")
POSE_FRAMES = ("last", "first")


@dataclass
class CameraControlTaskConfig(TaskConfig):
    name: str = "camera_control"
    # translations of a clip divided by its largest camera-to-camera distance (NeMo's recipe) or kept
    normalise: str = "max_distance"
    # which pixel frame's pose a latent frame of temporal_compression frames gets
    pose_frame: str = "last"
    hidden: int = 256  # AR: the pose MLP's width


def clip_cameras(poses: torch.Tensor, intrinsics: torch.Tensor, task_cfg, model_cfg, data_cfg
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One sample's cameras on the latent grid: (c2w [T_lat, 4, 4] relative to the clip's first frame and
    normalised, K [3, 3] in latent pixels, valid-pixel mask [h_lat, w_lat], translation scale)."""
    from nemo_ext.conditioning import camera as cam

    p = cam.as_poses(poses.detach().double().cpu().numpy().reshape(-1, 4, 4), "poses.npy")
    fx, fy, cx, cy, w, h = (float(v) for v in intrinsics.detach().double().cpu().reshape(-1)[:6])
    k = cam.intrinsics_matrix(fx, fy, cx, cy)
    rel = cam.relative_to_first(p)
    scale = 1.0
    if task_cfg.normalise == "max_distance":
        rel, scale = cam.normalise_translation(rel)
    tc, sc = int(model_cfg.tokenizer.temporal_compression), int(model_cfg.tokenizer.spatial_compression)
    rel = rel[cam.latent_pose_frames(len(rel), tc, task_cfg.pose_frame)]
    k_data, mask = cam.resize_intrinsics(k, (int(round(h)), int(round(w))), (data_cfg.height, data_cfg.width),
                                         data_cfg.resize_mode)
    return rel, cam.latent_intrinsics(k_data, sc), cam.latent_mask(mask, sc), scale


class DiTCameraConditioner(nn.Module):
    """Plücker rays at latent resolution as extra input channels; the caption's T5 tokens as context."""

    def __init__(self, task_cfg, model_cfg, data_cfg):
        super().__init__()
        self.task_cfg, self.model_cfg, self.data_cfg = task_cfg, model_cfg, data_cfg

    def forward(self, batch: dict) -> Conditioning:
        from nemo_ext.conditioning.camera import plucker_rays

        if "poses" not in batch or "intrinsics" not in batch:
            raise KeyError("camera_control: the batch has no 'poses' / 'intrinsics' (the shards need "
                           "<key>.poses.npy and <key>.intrinsics.npy)")
        sc = int(self.model_cfg.tokenizer.spatial_compression)
        h, w = self.data_cfg.height // sc, self.data_cfg.width // sc
        rays = []
        for poses, k in zip(batch["poses"], batch["intrinsics"]):
            c2w, k_lat, mask, _ = clip_cameras(poses, k, self.task_cfg, self.model_cfg, self.data_cfg)
            rays.append(plucker_rays(c2w, k_lat, h, w, mask).transpose(0, 1))  # [6, T_lat, h, w]
        channels = torch.stack(rays).to(batch["poses"].device)
        return Conditioning(context=batch.get("context"), context_mask=batch.get("context_mask"), channels=channels)


class ARCameraConditioner(nn.Module):
    """One cross-attention token per latent frame: MLP(relative pose 3x4) + a frame embedding."""

    def __init__(self, task_cfg, model_cfg, data_cfg):
        super().__init__()
        self.task_cfg, self.model_cfg, self.data_cfg = task_cfg, model_cfg, data_cfg
        self.mlp = nn.Sequential(nn.Linear(12, task_cfg.hidden), nn.SiLU(), nn.Linear(task_cfg.hidden, task_cfg.hidden),
                                 nn.SiLU())
        self.to_context = nn.Linear(task_cfg.hidden, model_cfg.context_dim)
        frames = 1 + (data_cfg.num_frames - 1) // int(model_cfg.tokenizer.temporal_compression)
        self.frame_embedding = nn.Parameter(torch.zeros(frames, task_cfg.hidden))
        nn.init.normal_(self.frame_embedding, std=0.02)

    def forward(self, batch: dict) -> Conditioning:
        if "poses" not in batch or "intrinsics" not in batch:
            raise KeyError("camera_control: the batch has no 'poses' / 'intrinsics' (the shards need "
                           "<key>.poses.npy and <key>.intrinsics.npy)")
        dtype = self.to_context.weight.dtype
        rel = [clip_cameras(p, k, self.task_cfg, self.model_cfg, self.data_cfg)[0][:, :3].reshape(-1, 12)
               for p, k in zip(batch["poses"], batch["intrinsics"])]
        x = torch.as_tensor(np.stack(rel), dtype=dtype, device=self.to_context.weight.device)
        if x.shape[1] != self.frame_embedding.shape[0]:
            raise ValueError(f"camera_control: {x.shape[1]} latent frames of poses, the conditioner was built for "
                             f"{self.frame_embedding.shape[0]} (data.num_frames changed?)")
        tokens = self.to_context(self.mlp(x) + self.frame_embedding.to(dtype))
        context, mask = tokens_then_text(tokens, batch)  # an instruction / caption: its T5 tokens after these
        return Conditioning(context=context, context_mask=mask)


def build_conditioner(task_cfg, model_cfg, data_cfg=None):
    if data_cfg is None:
        raise ValueError("camera_control's conditioner needs the data config (frame size, resize mode)")
    if model_cfg.family == "ar":
        return ARCameraConditioner(task_cfg, model_cfg, data_cfg)
    return DiTCameraConditioner(task_cfg, model_cfg, data_cfg)


def check(task_cfg, cfg) -> None:
    from nemo_ext.conditioning.camera import latent_pose_frames

    m, d = cfg.model, cfg.data
    if task_cfg.normalise not in NORMALISATIONS:
        raise ValueError(f"task.normalise={task_cfg.normalise!r} must be one of {', '.join(NORMALISATIONS)}")
    if task_cfg.pose_frame not in POSE_FRAMES:
        raise ValueError(f"task.pose_frame={task_cfg.pose_frame!r} must be one of {', '.join(POSE_FRAMES)}")
    try:
        latent_pose_frames(d.num_frames, m.tokenizer.temporal_compression, task_cfg.pose_frame)
    except ValueError as exc:
        raise ValueError(f"data.num_frames={d.num_frames} with model.tokenizer.temporal_compression="
                         f"{m.tokenizer.temporal_compression}: {exc}") from None
    sc = int(m.tokenizer.spatial_compression)
    if d.height % sc or d.width % sc:
        raise ValueError(f"data.height={d.height} / data.width={d.width} must be multiples of the tokenizer's "
                         f"spatial compression {sc} (one ray per latent pixel)")
    require_video2world(cfg, "camera_control", "continues the given first frame along the camera path",
                        "camera tokens enter through cross-attention and the first frame is the prompt")


def extra_channels(task_cfg, model_cfg) -> int:
    return PLUCKER_CHANNELS if model_cfg.family == "diffusion" else 0


CAMERA_CONTROL = register_task(
    TaskSpec(
        name="camera_control",
        config_cls=CameraControlTaskConfig,
        families=("diffusion", "ar"),
        sample_exts=("json",),
        world="camera",
        build_conditioner=build_conditioner,
        extra_channels=extra_channels,
        signals=(POSES, INTRINSICS),
        check=check,
        zero_init=("diffusion",),  # AR: camera tokens are a cross-attention context (ARCameraConditioner)
        description="3D-consistent video along a camera path (Plücker rays into the DiT's input, pose tokens "
                    "into the AR model's cross-attention)",
    )
)

from nemo_ext.tasks.camera_control import evaluation, world  # noqa: E402,F401  (register the world and eval)
