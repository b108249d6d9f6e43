"""camera_control's evaluation on the shared core (``make recipe=camera_control eval CKPT=...``).

From each held-out episode's first frame the model generates the video along the episode's camera
path and, as the control, along another episode's path (``--control episodes``, default) or its own
path reversed (``--control reverse``); with ``--base`` the base model along the true path. Reported:
PSNR / SSIM against the world's render (the scene is static: the render *is* the ground truth of any
path, and the world's simulator replays the control path in the episode's own scene, at the episode's
own translation scale, kept inside the room), the paired
gaps and the shared verdict (margin 0.25 dB), the teacher-forced loss gap, and **pose errors**: the
camera poses recovered from each generated video (:mod:`nemo_ext.eval.poses`, SIFT + PnP on frame 0's
rendered depth) against the true path: registration success, RotErr, translation-direction error,
TransErr and CamMC (CamI2V's rel normalisation), the same estimator on the ground-truth video as the
floor row, and a second verdict on the per-episode RotErr gap (control minus true, margin
:data:`ROT_MARGIN_DEG`). The control video's errors against its *own* path say whether the model
followed the path it was given.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from nemo_ext.eval.core import Evaluation, register_evaluation, require_one_given_frame
from nemo_ext.eval.episodes import Episode, to_video

ROT_MARGIN_DEG = 0.5  # the verdict's margin on the per-frame mean RotErr gap (degrees)
# a frame whose pose cannot be recovered from the video counts as this RotErr in the verdict's score
# (an unregistered frame is a failure, never a free zero)
UNREGISTERED_DEG = 90.0
UPSCALE = 2  # SIFT on frames enlarged 2x: 64-pixel frames give few keypoints


def _pose_matrices(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4, 4)


def _relative(rows) -> np.ndarray:
    from nemo_ext.conditioning.camera import relative_to_first

    return relative_to_first(_pose_matrices(rows))


def _spread(c2w: np.ndarray) -> float:
    """The largest distance between two camera centres of a path."""
    c = c2w[:, :3, 3]
    return float(np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)).max()) if len(c) > 1 else 0.0


class SimulatorPredictor:
    """The camera world's ground truth along any path: the episode's scene rendered from its own first
    pose moved by the path's motion relative to the path's first pose, chunk after chunk."""

    def __init__(self, episodes: Sequence[Episode], height: int, width: int, chunk: int):
        self.episodes = {ep.index: ep for ep in episodes}
        self.size = (height, width)
        self.chunk = chunk
        self.at: dict = {}  # episode -> the camera pose at the start of the next chunk
        self.scenes: dict = {}  # episode -> (its scene, K, camera bounds), parsed once

    @staticmethod
    def supports(episode: Episode) -> bool:
        return episode.meta.get("variant") == "camera" and "scene" in episode.meta

    def __call__(self, current, cond, step, ids):
        from nemo_ext.tasks.camera_control.world import FOV_X_DEG, SUPERSAMPLE
        from nemo_ext.worlds.scene3d import Scene, camera_bounds, default_intrinsics, render_path

        h, w = self.size
        out = []
        for row, i in enumerate(ids):
            ep = self.episodes[i]
            if i not in self.scenes:
                scene = Scene.from_json(ep.meta["scene"])
                k = default_intrinsics(h, w, float(ep.meta.get("fov_x_deg", FOV_X_DEG)))
                self.scenes[i] = (scene, k, camera_bounds(scene))
            scene, k, (lo, hi) = self.scenes[i]
            if step == 0:
                self.at[i] = _pose_matrices(ep.signals["poses"][:1])[0]
            rel = _relative(cond["poses"][row].detach().cpu().numpy())  # [chunk + 1, 4, 4]
            # the model sees translations normalised per clip: another episode's path moves at this
            # episode's own scale (its chunk's largest camera distance), and stays in the room
            own = _relative(ep.signals["poses"][step * self.chunk:(step + 1) * self.chunk + 1])
            rel[:, :3, 3] *= _spread(own) / max(_spread(rel), 1e-9)
            poses = self.at[i] @ rel[1:]
            poses[:, :3, 3] = np.clip(poses[:, :3, 3], lo, hi)
            self.at[i] = poses[-1]
            frames, _ = render_path(scene, poses, k, h, w, supersample=SUPERSAMPLE)
            out.append(to_video(frames))
        return torch.stack(out)


def simulator(episodes, cfg):
    if not all(SimulatorPredictor.supports(ep) for ep in episodes):
        return None
    return SimulatorPredictor(episodes, cfg.data.height, cfg.data.width, cfg.data.num_frames - 1)


def _deg(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _errors(video: np.ndarray, path: np.ndarray, k: np.ndarray, depth0: np.ndarray) -> dict:
    from nemo_ext.eval.poses import estimate_poses, pose_errors

    est = estimate_poses(video, k, depth0=depth0, upscale=UPSCALE)
    err = pose_errors(est.c2w, path[: len(video)], est.registered)
    err["success"] = est.success
    err["registered"] = float(est.registered[1:].mean()) if len(video) > 1 else 1.0
    return err


def task_metrics(result, episodes: Sequence[Episode], run, args) -> Optional[dict]:
    from nemo_ext.conditioning.camera import intrinsics_matrix, resize_intrinsics
    from nemo_ext.eval.metrics import paired_gap, verdict
    from nemo_ext.tasks.camera_control.world import render_along

    if not all(SimulatorPredictor.supports(ep) for ep in episodes):
        return None  # real data: PSNR and the teacher-forced gap (pose metrics need the data's depth or pycolmap)
    d = run.cfg.data
    controls = result.conditioning["control"]
    rows = {name: [] for name in ("ground_truth", "pred", "control", "control_vs_its_path", "base")}
    for row, ep in enumerate(episodes):
        v = result.videos[ep.index]
        fx, fy, cx, cy, w0, h0 = (float(x) for x in np.asarray(ep.signals["intrinsics"]).reshape(-1)[:6])
        k, _ = resize_intrinsics(intrinsics_matrix(fx, fy, cx, cy), (int(h0), int(w0)), (d.height, d.width),
                                 d.resize_mode)
        first = _pose_matrices(ep.signals["poses"][:1])
        _, depth = render_along(ep.meta, first, d.height, d.width, k)
        true_path = _relative(ep.signals["poses"])
        rows["ground_truth"].append(_errors(v["gt"], true_path, k, depth[0]))
        rows["pred"].append(_errors(v["pred"], true_path, k, depth[0]))
        rows["control"].append(_errors(v["control"], true_path, k, depth[0]))
        control_rows = controls[row].detach().cpu().numpy() if isinstance(controls[row], torch.Tensor) else controls[row]
        rows["control_vs_its_path"].append(_errors(v["control"], _relative(control_rows), k, depth[0]))
        if "base" in v:
            rows["base"].append(_errors(v["base"], true_path, k, depth[0]))

    def summary(items: list) -> Optional[dict]:
        if not items:
            return None
        keys = ("rot_err_deg_mean", "trans_dir_err_deg_mean", "trans_err_rel", "cam_mc_rel", "registered")
        out = {"success_rate": float(np.mean([x["success"] for x in items]))}
        for key in keys:
            vals = [x[key] for x in items if x[key] is not None]
            out[key] = float(np.mean(vals)) if vals else None
        return out

    def rot(items: list) -> np.ndarray:
        """Per episode: the mean RotErr over frames 1.., unregistered ones at UNREGISTERED_DEG."""
        return np.array([np.mean([UNREGISTERED_DEG if e is None else e for e in x["rot_err_deg_per_frame"][1:]])
                         for x in items], dtype=np.float64)

    # smaller is better: the gap is the control's (base's) error minus the true path's
    gaps = {"control": paired_gap(rot(rows["control"]), rot(rows["pred"]), seed=args.control_seed),
            "base model": paired_gap(rot(rows["base"]), rot(rows["pred"]), seed=args.control_seed)
            if rows["base"] else None}
    state = verdict(gaps, margin=ROT_MARGIN_DEG, unit_name="deg RotErr")
    table = {name: summary(items) for name, items in rows.items()}
    pred, floor = table["pred"], table["ground_truth"]
    return {
        "what": "camera poses recovered from each video (SIFT + PnP on frame 0's rendered depth) against the true "
                "path; 'control_vs_its_path': the control video against the path it was generated along",
        "pose_errors": table, "rot_err_gap_vs_control": gaps["control"], "rot_err_gap_vs_base": gaps["base model"],
        "pose_verdict": state,
        "headline": (f"camera poses: RotErr {_deg(pred['rot_err_deg_mean'])} deg/frame along the true path, "
                     f"{_deg(table['control']['rot_err_deg_mean'])} for the control video (registered frames); "
                     f"estimator floor {_deg(floor['rot_err_deg_mean'])}; registered {pred['registered']:.2f} of the "
                     f"frames, {table['control']['registered']:.2f} for the control -> {state['verdict']}"),
    }


CAMERA_EVALUATION = register_evaluation(Evaluation(
    task="camera_control",
    description="rollouts from the first frame along the true vs another episode's (or the reversed) camera path "
                "(and the base model): PSNR / SSIM against the world's render, the teacher-forced loss gap, and camera "
                "poses recovered from the videos (RotErr, translation errors, CamMC, success; the ground-truth video as "
                "the estimator's floor) with their own verdict",
    signal="poses",
    controls=("episodes", "reverse"),
    margin_db=0.25,
    check_run=require_one_given_frame,
    simulator=simulator,
    task_metrics=task_metrics,
    panels=("ground truth", "prediction", "prediction along the control path"),
    control_label="other path",
))
