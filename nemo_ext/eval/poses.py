"""Camera poses recovered from a video, and their errors against the poses that were asked for.

The estimator (OpenCV only, no learned weights): SIFT keypoints of frame 0 and frame i, Lowe-ratio
matches (0.75), then

* ``pnp`` (frame 0's depth known: the sample worlds render it, and a rollout starts from that frame):
  frame 0's keypoints lifted to 3D with the depth start a map; each frame is registered against the
  map (``solvePnPRansac`` + refinement: metric poses relative to frame 0) and adds the points it
  triangulates with the previous registered frame, so a path that leaves frame 0's view is tracked;
* ``essential`` (no depth, real data): ``findEssentialMat`` + ``recoverPose``: the rotation and the
  *direction* of the translation only (unit length).

A frame is registered when the fit keeps at least ``min_inliers`` inliers; an episode succeeds when
every frame is. The same estimator on the ground-truth video is the floor row of an evaluation.

Errors (:func:`pose_errors`), with poses camera-to-world relative to frame 0
(``nemo_ext.conditioning.camera``'s convention), as CameraCtrl / CamI2V define them:
RotErr = sum_i arccos((tr(R_est R_gt^T) - 1) / 2) in degrees; TransErr = sum_i ||t_gt - t_est||
and CamMC = sum_i ||[R|t]_est - [R|t]_gt||_F, both after CamI2V's "rel" normalisation (each
trajectory divided by its own largest ||t_i||); the angle between the translation directions
(scale-free, the only translation error of the ``essential`` method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

LOWE_RATIO = 0.75
MIN_INLIERS = 12


@dataclass
class PoseEstimate:
    c2w: np.ndarray  # [T, 4, 4] relative to frame 0 (frame 0 the identity); NaN rows where unregistered
    registered: np.ndarray  # [T] bool
    inliers: np.ndarray  # [T] int
    method: str  # "pnp" (metric) | "essential" (unit translation directions)

    @property
    def success(self) -> bool:
        return bool(self.registered.all())


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _matches(sift, matcher, kp0, des0, frame) -> tuple[np.ndarray, np.ndarray]:
    """Matched pixel coordinates (frame 0, frame i), [N, 2] float64 each."""
    kp1, des1 = sift.detectAndCompute(_gray(frame), None)
    good = _ratio_matches(matcher, des0, des1)
    p0 = np.array([kp0[m.queryIdx].pt for m in good], dtype=np.float64).reshape(-1, 2)
    p1 = np.array([kp1[m.trainIdx].pt for m in good], dtype=np.float64).reshape(-1, 2)
    return p0, p1


def _ratio_matches(matcher, des_a, des_b) -> list:
    """Lowe-ratio matches of descriptors ``des_a`` (queries) in ``des_b``."""
    if des_a is None or des_b is None or len(des_a) < 2 or len(des_b) < 2:
        return []
    return [m for m, *rest in matcher.knnMatch(des_a, des_b, k=2) if rest and m.distance < LOWE_RATIO * rest[0].distance]


def _start(t_len: int, keypoints0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c2w, registered, inliers) before any frame but frame 0 (the identity, registered) is estimated."""
    c2w = np.full((t_len, 4, 4), np.nan)
    c2w[0] = np.eye(4)
    registered = np.zeros(t_len, dtype=bool)
    registered[0] = True
    inliers = np.zeros(t_len, dtype=np.int64)
    inliers[0] = keypoints0
    return c2w, registered, inliers


def _c2w(r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Frame i's camera-to-world in frame 0's camera coordinates, from x_i = R x_0 + t."""
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ np.asarray(t, dtype=np.float64).reshape(3)
    return out


def estimate_poses(frames: np.ndarray, k: np.ndarray, depth0: Optional[np.ndarray] = None,
                   min_inliers: int = MIN_INLIERS, upscale: int = 1) -> PoseEstimate:
    """Poses of ``frames`` (uint8 [T, H, W, 3]) relative to frame 0, for intrinsics ``k`` (pixels of
    these frames). ``depth0``: frame 0's z-depth [H, W] (method ``pnp``), else ``essential``.
    ``upscale``: SIFT on frames enlarged by this factor (tiny 64-pixel frames give few keypoints)."""
    import cv2

    frames = np.asarray(frames)
    t_len = len(frames)
    k = np.asarray(k, dtype=np.float64)
    if upscale > 1:
        from nemo_ext.conditioning.camera import scale_intrinsics

        frames = np.stack([cv2.resize(f, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC) for f in frames])
        k = scale_intrinsics(k, upscale, upscale)
    sift = cv2.SIFT_create()
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    if depth0 is not None:
        d = np.asarray(depth0, dtype=np.float64)
        if upscale > 1:
            d = cv2.resize(d, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST)
        c2w, registered, inliers = _track_pnp(frames, k, d, sift, matcher, min_inliers, upscale)
        return PoseEstimate(c2w=c2w, registered=registered, inliers=inliers, method="pnp")
    kp0, des0 = sift.detectAndCompute(_gray(frames[0]), None)
    c2w, registered, inliers = _start(t_len, len(kp0))
    for i in range(1, t_len):
        p0, p1 = _matches(sift, matcher, kp0, des0, frames[i])
        if len(p0) < max(min_inliers, 6):
            continue
        e, mask = cv2.findEssentialMat(p0, p1, k, cv2.RANSAC, 0.999, 1.0 * upscale)
        if e is None or e.shape != (3, 3):
            continue
        n, r, t, _ = cv2.recoverPose(e, p0, p1, k, mask=mask)
        if n < min_inliers:
            continue
        c2w[i], inliers[i] = _c2w(r, t), int(n)
        registered[i] = True
    return PoseEstimate(c2w=c2w, registered=registered, inliers=inliers, method="essential")


def _track_pnp(frames, k, depth0, sift, matcher, min_inliers: int, upscale: int):
    """Metric poses by tracking against a growing 3D map: frame 0's keypoints lifted with its depth, then,
    for every registered frame, the points triangulated from its matches with the previous registered
    frame (keypoints not already explained by the map). Every frame is registered against the map, so a
    path that leaves frame 0's view keeps its poses while it keeps seeing mapped points."""
    import cv2

    t_len = len(frames)
    k_inv = np.linalg.inv(k)
    feats = [sift.detectAndCompute(_gray(f), None) for f in frames]
    kp0, des0 = feats[0]
    c2w, registered, inliers = _start(t_len, len(kp0))
    if des0 is None:
        return c2w, registered, inliers
    uv0 = np.array([kp.pt for kp in kp0], dtype=np.float64)
    px = np.clip(np.round(uv0).astype(int), 0, [depth0.shape[1] - 1, depth0.shape[0] - 1])
    z = depth0[px[:, 1], px[:, 0]]
    keep = np.isfinite(z) & (z > 0)
    map_xyz = (k_inv @ np.c_[uv0[keep], np.ones(keep.sum())].T * z[keep]).T
    map_des = des0[keep]
    w2c = {0: np.eye(4)}
    last = 0
    for i in range(1, t_len):
        kp_i, des_i = feats[i]
        good = _ratio_matches(matcher, des_i, map_des)
        if len(good) < max(min_inliers, 6):
            continue
        obj = map_xyz[[m.trainIdx for m in good]]
        img = np.array([kp_i[m.queryIdx].pt for m in good], dtype=np.float64)
        ok, rvec, tvec, idx = cv2.solvePnPRansac(obj, img, k, None, reprojectionError=2.0 * upscale,
                                                 iterationsCount=200, flags=cv2.SOLVEPNP_EPNP)
        n = 0 if idx is None else len(idx)
        if not ok or n < min_inliers:
            continue
        # refine on the inliers (EPnP inside RANSAC is approximate)
        rvec, tvec = cv2.solvePnPRefineLM(obj[idx[:, 0]], img[idx[:, 0]], k, None, rvec, tvec)
        r, _ = cv2.Rodrigues(rvec)
        c2w[i], inliers[i], registered[i] = _c2w(r, tvec), n, True
        w2c[i] = np.eye(4)
        w2c[i][:3, :3], w2c[i][:3, 3] = r, np.asarray(tvec).reshape(3)
        # grow the map with the new keypoints of frame i seen in the last registered frame
        explained = {good[j].queryIdx for j in idx[:, 0]}
        kp_j, des_j = feats[last]
        pairs = [m for m in _ratio_matches(matcher, des_i, des_j) if m.queryIdx not in explained]
        if len(pairs) >= 8:
            a = np.array([kp_j[m.trainIdx].pt for m in pairs], dtype=np.float64).T
            b = np.array([kp_i[m.queryIdx].pt for m in pairs], dtype=np.float64).T
            x = cv2.triangulatePoints(k @ w2c[last][:3], k @ w2c[i][:3], a, b)
            xyz = (x[:3] / np.where(np.abs(x[3]) < 1e-12, 1e-12, x[3])).T
            ok_pts = np.ones(len(xyz), dtype=bool)
            for pose, uv in ((w2c[last], a.T), (w2c[i], b.T)):
                cam_pts = (pose[:3, :3] @ xyz.T + pose[:3, 3:]).T
                proj = (k @ cam_pts.T).T
                err = np.linalg.norm(proj[:, :2] / np.maximum(proj[:, 2:], 1e-9) - uv, axis=1)
                ok_pts &= (cam_pts[:, 2] > 1e-3) & (err < 2.0 * upscale)
            if ok_pts.any():
                map_xyz = np.concatenate([map_xyz, xyz[ok_pts]])
                map_des = np.concatenate([map_des, des_i[[m.queryIdx for m, o in zip(pairs, ok_pts) if o]]])
        last = i
    return c2w, registered, inliers


def _rel_normalised(t: np.ndarray) -> np.ndarray:
    scale = np.linalg.norm(t, axis=1).max()
    return t / scale if scale > 1e-12 else t


def pose_errors(est: np.ndarray, gt: np.ndarray, registered: Optional[np.ndarray] = None) -> dict:
    """Errors of estimated against ground-truth camera-to-world poses [T, 4, 4], both relative to frame
    0, over the registered frames (all by default). Sums over frames as the papers report them, and
    means per frame."""
    est, gt = np.asarray(est, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    mask = np.ones(len(gt), dtype=bool) if registered is None else np.asarray(registered, dtype=bool)
    mask = mask & np.isfinite(est).all(axis=(1, 2))
    mask[0] = True
    e, g = est[mask], gt[mask]
    cos = (np.einsum("tij,tij->t", e[:, :3, :3], g[:, :3, :3]) - 1.0) / 2.0  # tr(R_e R_g^T) = sum R_e * R_g
    rot = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    te, tg = _rel_normalised(e[:, :3, 3]), _rel_normalised(g[:, :3, 3])
    trans = np.linalg.norm(tg - te, axis=1)
    mc = np.linalg.norm(np.concatenate([e[:, :3, :3], te[:, :, None]], 2)
                        - np.concatenate([g[:, :3, :3], tg[:, :, None]], 2), axis=(1, 2))
    ne, ng = np.linalg.norm(e[:, :3, 3], axis=1), np.linalg.norm(g[:, :3, 3], axis=1)
    moving = (ne > 1e-9) & (ng > 1e-9)
    dir_cos = np.einsum("ti,ti->t", e[moving, :3, 3], g[moving, :3, 3]) / (ne[moving] * ng[moving])
    direction = np.degrees(np.arccos(np.clip(dir_cos, -1.0, 1.0)))
    per_frame = np.full(len(gt), np.nan)
    per_frame[mask] = rot
    some = mask.sum() > 1  # frame 0 is the identity in both: no error to measure without another frame
    return {"frames": int(mask.sum()), "rot_err_deg": float(rot.sum()),
            "rot_err_deg_mean": float(rot[1:].mean()) if some else None,
            "trans_err_rel": float(trans.sum()) if some else None, "cam_mc_rel": float(mc.sum()) if some else None,
            "trans_dir_err_deg_mean": float(direction.mean()) if len(direction) else None,
            "rot_err_deg_per_frame": [None if np.isnan(x) else float(x) for x in per_frame]}
