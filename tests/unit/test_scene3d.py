"""The 3D renderer brick (nemo_ext/worlds/scene3d.py) against independent computations: OpenCV's own
projection (cv2.projectPoints) of back-projected depth into a second camera, closed-form floor and
wall depths, a red box found where cv2 projects it, and each camera path's defining geometry."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from nemo_ext.worlds import scene3d as s3
from nemo_ext.worlds.shapes import PALETTE


def project_cv2(points: np.ndarray, c2w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """OpenCV's projection of world points by a camera-to-world pose (OpenCV axes)."""
    w2c = np.linalg.inv(c2w)
    rvec, _ = cv2.Rodrigues(w2c[:3, :3])
    uv, _ = cv2.projectPoints(np.asarray(points, dtype=np.float64).reshape(-1, 1, 3), rvec, w2c[:3, 3], k, None)
    return uv.reshape(-1, 2)


def camera_z(points: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T)[2]


def plain(rgb, rgb2=None, pattern: str = "solid", period: float = 0.5) -> s3.Texture:
    return s3.Texture(pattern, (tuple(rgb), tuple(rgb2 or rgb)), period)


GRAY = plain((150, 150, 150), (80, 80, 80), "checker")


def empty_room(hx: float = 3.0, hy: float = 3.0, height: float = 2.8, objects=()) -> s3.Scene:
    return s3.Scene((hx, hy, height), GRAY, GRAY, GRAY, tuple(objects))


def test_default_intrinsics_span_the_field_of_view_on_opencvs_grid() -> None:
    k = s3.default_intrinsics(48, 64, fov_x_deg=60)
    assert k[0, 2] == 31.5 and k[1, 2] == 23.5 and k[0, 0] == k[1, 1]
    # the left edge (x = -0.5) and the right edge (x = 63.5) of the image are 60 degrees apart
    left, right = np.linalg.inv(k) @ [-0.5, 23.5, 1], np.linalg.inv(k) @ [63.5, 23.5, 1]
    cos = left @ right / np.linalg.norm(left) / np.linalg.norm(right)
    assert np.degrees(np.arccos(cos)) == pytest.approx(60.0)


def test_look_at_gives_opencv_axes_in_the_z_up_world() -> None:
    eye, target = np.array([0.0, 0.0, 1.5]), np.array([2.0, 0.0, 1.5])
    pose = s3.look_at(eye, target)
    # looking along world +x with z up: image right is world -y, image down is world -z
    np.testing.assert_allclose(pose[:3, :3], [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], atol=1e-12)
    np.testing.assert_allclose(pose[:3, 3], eye)
    k = s3.default_intrinsics(48, 64)
    uv = project_cv2(np.array([target, target + [0, 0, 0.5], target + [0, -0.5, 0]]), pose, k)
    np.testing.assert_allclose(uv[0], [k[0, 2], k[1, 2]], atol=1e-9)  # the target is the image centre
    assert uv[1, 1] < k[1, 2] - 5  # higher in the world: higher in the image (smaller v)
    assert uv[2, 0] > k[0, 2] + 5  # world -y: to the right
    with pytest.raises(ValueError, match="parallel to up"):
        s3.look_at(eye, eye - [0, 0, 1])


def test_floor_and_wall_depth_are_z_depth_in_closed_form() -> None:
    """Camera 0.8 m up looking along +x, 5.5 m from the far wall: a floor pixel's z-depth is
    h fy / (v - cy) whatever its column (a Euclidean distance would grow off-centre) and the far
    wall, perpendicular to the optical axis, has the same z-depth 5.5 everywhere."""
    scene = empty_room()
    h, w = 48, 64
    k = s3.default_intrinsics(h, w)
    pose = s3.look_at([-2.5, 0.0, 0.8], [0.0, 0.0, 0.8])
    rgb, depth = s3.render(scene, pose, k, h, w)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8 and depth.dtype == np.float32
    assert np.isfinite(depth).all()
    rows = np.arange(h)[(np.arange(h) - k[1, 2]) * 4.0 > 0.8 * k[1, 1]]  # floor nearer than 4 m
    assert len(rows) >= 10
    expect = 0.8 * k[1, 1] / (rows - k[1, 2])
    np.testing.assert_allclose(depth[rows], np.broadcast_to(expect[:, None], (len(rows), w)), rtol=1e-6)
    np.testing.assert_allclose(depth[20:27, 24:40], 5.5, rtol=1e-6)  # around the centre: the far wall
    assert (depth[:20] <= 5.5 + 1e-5).all()  # the far wall is the farthest thing in this view


def test_depth_back_projects_to_points_a_second_camera_sees_at_their_cv2_pixels() -> None:
    """Back-project camera A's depth to 3D (K^-1, pose), project with cv2 into camera B, render B
    with its principal point shifted so that the point falls on a pixel centre: B's depth there is
    the point's z in B when nothing is in front, and never more (occluders are only nearer)."""
    scene = s3.sample_scene(np.random.default_rng(3))
    h, w = 48, 64
    k = s3.default_intrinsics(h, w)
    lo, hi = s3.camera_bounds(scene)
    pose_a = s3.look_at(lo + (hi - lo) * [0.15, 0.3, 0.4], [0.3, -0.2, 0.2])
    pose_b = s3.look_at(lo + (hi - lo) * [0.75, 0.1, 0.9], [-0.2, 0.3, 0.4])
    _, depth_a = s3.render(scene, pose_a, k, h, w)
    vs, us = np.meshgrid(np.linspace(3, h - 4, 6).round(), np.linspace(3, w - 4, 8).round(), indexing="ij")
    us, vs = us.ravel().astype(int), vs.ravel().astype(int)
    z = depth_a[vs, us].astype(np.float64)
    rays = np.linalg.inv(k) @ np.stack([us, vs, np.ones_like(us)])
    world = (pose_a[:3, :3] @ (rays * z) + pose_a[:3, 3:]).T
    np.testing.assert_allclose(project_cv2(world, pose_a, k), np.stack([us, vs], 1), atol=1e-6)
    np.testing.assert_allclose(camera_z(world, pose_a), z, rtol=1e-9)
    uv_b, z_b = project_cv2(world, pose_b, k), camera_z(world, pose_b)
    inside = (z_b > 0) & (uv_b[:, 0] > 0.5) & (uv_b[:, 0] < w - 1.5) & (uv_b[:, 1] > 0.5) & (uv_b[:, 1] < h - 1.5)
    assert inside.sum() >= 20
    seen = []
    for (u, v), zz in zip(uv_b[inside], z_b[inside]):
        kk = k.copy()
        kk[0, 2] += round(u) - u
        kk[1, 2] += round(v) - v
        _, depth_b = s3.render(scene, pose_b, kk, h, w)
        d = float(depth_b[round(v), round(u)])
        assert d <= zz * (1 + 1e-5)  # nothing beyond the surface point A saw
        seen.append(abs(d - zz) <= 1e-5 * zz)
    assert np.mean(seen) >= 0.6, f"only {np.mean(seen):.0%} of the points agree"


def test_red_box_appears_where_cv2_projects_its_centre() -> None:
    red = s3.Object3D("box", "red", (1.0, -0.7, 0.3), (0.3, 0.3, 0.3), plain(PALETTE["red"]))
    blue = s3.Object3D("sphere", "blue", (1.2, 0.9, 0.35), (0.35, 0.35, 0.35), plain(PALETTE["blue"]))
    scene = empty_room(objects=[red, blue])
    h, w = 48, 64
    k = s3.default_intrinsics(h, w)
    pose = s3.look_at([-1.5, 0.0, 1.6], [1.0, 0.0, 0.3])
    rgb, depth = s3.render(scene, pose, k, h, w)
    (ur, vr), (ub, vb) = project_cv2(np.array([red.center, blue.center]), pose, k).round().astype(int)
    assert ur > w / 2 + 5 and ub < w / 2 - 5  # world -y is the image's right: the test's own premise
    r = rgb.astype(int)
    is_red = (r[..., 0] > 2 * r[..., 1]) & (r[..., 0] > 2 * r[..., 2])
    is_blue = (r[..., 2] > 2 * r[..., 0]) & (r[..., 2] > r[..., 1] + 40)
    assert is_red[vr - 1:vr + 2, ur - 1:ur + 2].all() and is_blue[vb - 1:vb + 2, ub - 1:ub + 2].all()
    ys, xs = np.nonzero(is_red)
    assert abs(xs.mean() - ur) < 3 and abs(ys.mean() - vr) < 3 and is_red.sum() > 20
    assert not is_red[:, : w // 2].any() and not is_blue[:, w // 2:].any()
    z_centre = camera_z(np.array([red.center]), pose)[0]
    assert z_centre - 0.3 * np.sqrt(3) < depth[vr, ur] < z_centre  # the box's near side, nearer than its centre


def test_same_seed_same_bytes_and_json_round_trip_renders_identically() -> None:
    a, b = s3.sample_scene(np.random.default_rng(7)), s3.sample_scene(np.random.default_rng(7))
    assert a == b and a != s3.sample_scene(np.random.default_rng(8))
    back = s3.Scene.from_json(json.loads(json.dumps(a.to_json())))
    assert back == a
    k = s3.default_intrinsics(32, 48)
    pose = s3.camera_path("random", np.random.default_rng(1), 3, a)
    f1, d1 = s3.render_path(a, pose, k, 32, 48, supersample=2)
    f2, d2 = s3.render_path(back, pose, k, 32, 48, supersample=2)
    assert f1.shape == (3, 32, 48, 3) and d1.shape == (3, 32, 48)
    assert f1.tobytes() == f2.tobytes() and d1.tobytes() == d2.tobytes()
    g, e = s3.render(a, pose[1], k, 32, 48, supersample=2)
    assert g.tobytes() == f1[1].tobytes() and e.tobytes() == d1[1].tobytes()
    np.testing.assert_array_equal(s3.camera_path("orbit", np.random.default_rng(4), 5, a),
                                  s3.camera_path("orbit", np.random.default_rng(4), 5, b))


def test_supersampling_smooths_colour_and_keeps_the_centre_ray_depth() -> None:
    scene = s3.sample_scene(np.random.default_rng(2))
    k = s3.default_intrinsics(32, 32)
    pose = s3.camera_path("orbit", np.random.default_rng(0), 1, scene)[0]
    f1, d1 = s3.render(scene, pose, k, 32, 32, supersample=1)
    f3, d3 = s3.render(scene, pose, k, 32, 32, supersample=3)
    assert d1.tobytes() == d3.tobytes()
    diff = np.abs(f1.astype(int) - f3.astype(int))
    assert 0 < diff.mean() < 20  # the same picture, edges blended


def test_sampled_scenes_have_distinct_palette_objects_resting_apart_on_the_floor() -> None:
    counts = set()
    for seed in range(12):
        scene = s3.sample_scene(np.random.default_rng(seed))
        hx, hy, height = scene.room
        assert 2.0 <= hx <= 3.5 and 2.0 <= hy <= 3.5 and 2.6 <= height <= 3.2
        objs = scene.objects
        counts.add(len(objs))
        assert 4 <= len(objs) <= 8 and len({o.color for o in objs}) == len(objs)
        for o in objs:
            assert o.color in PALETTE and o.texture.colors[0] == PALETTE[o.color]
            assert o.kind in s3.KINDS and o.texture.pattern in s3.PATTERNS
            assert o.center[2] == pytest.approx(o.half_size[2])  # resting on the floor
            foot = np.hypot(*o.half_size[:2]) if o.kind == "box" else o.half_size[0]
            assert abs(o.center[0]) + foot < hx and abs(o.center[1]) + foot < hy
        for i, p in enumerate(objs):
            for q in objs[:i]:
                gap = np.hypot(p.center[0] - q.center[0], p.center[1] - q.center[1])
                assert gap > max(p.half_size[:2]) + max(q.half_size[:2])  # bounding boxes apart
        for tex in (scene.floor, scene.walls, scene.ceiling):
            lum = [0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in tex.colors]
            assert abs(lum[0] - lum[1]) > 40  # strong local contrast for feature matching
    assert len(counts) >= 3
    assert len(s3.sample_scene(np.random.default_rng(0), num_objects=0).objects) == 0
    with pytest.raises(ValueError, match="num_objects"):
        s3.sample_scene(np.random.default_rng(0), num_objects=9)


def test_rendered_frames_have_features_for_sift() -> None:
    """Camera motion must be measurable by SIFT + PnP: every path's frames have plenty of keypoints
    (measured >= 123 per 128x128 frame over 6 scenes x 4 kinds; a striped wall alone had 0)."""
    k = s3.default_intrinsics(128, 128)
    for i, kind in enumerate(s3.PATH_KINDS):
        scene = s3.sample_scene(np.random.default_rng(20 + i))
        frames, _ = s3.render_path(scene, s3.camera_path(kind, np.random.default_rng(i), 2, scene), k, 128, 128)
        for f in frames:
            keypoints = cv2.SIFT_create().detect(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), None)
            assert len(keypoints) >= 60, f"{kind}: {len(keypoints)} SIFT keypoints"


@pytest.mark.parametrize("kind", s3.PATH_KINDS)
def test_camera_paths_are_rigid_inside_the_room_and_look_at_their_targets(kind: str) -> None:
    t = 9
    h = w = 32
    k = s3.default_intrinsics(h, w)
    for seed in range(4):
        scene = s3.sample_scene(np.random.default_rng(seed))
        poses, targets = s3.camera_path(kind, np.random.default_rng(100 + seed), t, scene, with_targets=True)
        assert poses.shape == (t, 4, 4) and targets.shape == (t, 3) and poses.dtype == np.float64
        r = poses[:, :3, :3]
        np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
        np.testing.assert_array_equal(poses[:, 3], np.broadcast_to([0, 0, 0, 1], (t, 4)))
        lo, hi = s3.camera_bounds(scene)
        eyes = poses[:, :3, 3]
        assert (eyes >= lo - 1e-9).all() and (eyes <= hi + 1e-9).all()
        hx, hy, height = scene.room
        assert (np.abs(eyes[:, 0]) < hx).all() and (np.abs(eyes[:, 1]) < hy).all() and (eyes[:, 2] < height).all()
        for p, tgt in zip(poses, targets):
            assert camera_z(tgt[None], p)[0] > 0.5  # in front of the camera
            np.testing.assert_allclose(project_cv2(tgt, p, k)[0], [k[0, 2], k[1, 2]], atol=1e-6)
        frames, depth = s3.render_path(scene, poses, k, h, w)
        assert np.abs(frames[0].astype(float) - frames[-1]).mean() > 10, "the view barely changes"
        assert (depth[:, h // 2, w // 2] > 0.5).all() and (np.median(depth, axis=(1, 2)) > 0.8).all()
        steps = np.linalg.norm(np.diff(eyes, axis=0), axis=1)
        assert steps.max() <= 1.7 * steps.mean() + 1e-12  # no jump (eased: the peak speed is pi / 2 the mean)
        if kind == "orbit":  # fixed target, fixed height, fixed radius, turning
            np.testing.assert_allclose(targets, np.broadcast_to(targets[0], targets.shape))
            np.testing.assert_allclose(eyes[:, 2], eyes[0, 2])
            radius = np.linalg.norm((eyes - targets)[:, :2], axis=1)
            np.testing.assert_allclose(radius, radius[0], rtol=1e-9)
            assert radius[0] >= 1.0 and steps.sum() > 0.9  # >= 60 degrees of a >= 1 m circle
        elif kind == "dolly":  # fixed rotation, moving along the optical axis
            np.testing.assert_allclose(r, np.broadcast_to(r[0], r.shape), atol=1e-9)
            move = eyes - eyes[0]
            np.testing.assert_allclose(np.cross(move, r[0][:, 2]), 0.0, atol=1e-9)
            assert np.linalg.norm(move[-1]) > 0.5
        elif kind == "pan_tilt":  # fixed position, turning
            np.testing.assert_array_equal(eyes, np.broadcast_to(eyes[0], eyes.shape))
            turn = np.degrees(np.arccos(np.clip((np.trace(r[0].T @ r[-1]) - 1) / 2, -1, 1)))
            assert turn > 30
        else:  # constant speed along 1-4 m, ending >= 1 m from the start
            assert np.linalg.norm(eyes[-1] - eyes[0]) >= 1.0 and 1.0 <= steps.sum() <= 4.0
            np.testing.assert_allclose(steps, steps.mean(), rtol=0.2)  # chords of equal arcs (Bézier time: 10x apart)
    with pytest.raises(ValueError, match="unknown camera path kind"):
        s3.camera_path("zoom", np.random.default_rng(0), t, scene)


def test_rig_poses_compose_body_and_extrinsics() -> None:
    scene = s3.sample_scene(np.random.default_rng(1))
    body = s3.camera_path("random", np.random.default_rng(1), 5, scene)
    right = np.eye(4)  # 0.5 m to the body's right (OpenCV x), turned 90 degrees to look right
    right[:3, :3] = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]
    right[:3, 3] = [0.5, 0.0, 0.0]
    rig = s3.rig_poses(body, np.stack([np.eye(4), right]))
    assert rig.shape == (2, 5, 4, 4)
    np.testing.assert_allclose(rig[0], body)
    for t in range(5):
        np.testing.assert_allclose(rig[1, t], body[t] @ right)
        np.testing.assert_allclose(rig[1, t, :3, 3], body[t, :3, 3] + 0.5 * body[t, :3, 0])
        np.testing.assert_allclose(rig[1, t, :3, 2], body[t, :3, 0], atol=1e-12)  # looks along body right


def test_render_refuses_a_camera_outside_the_room() -> None:
    scene = empty_room()
    k = s3.default_intrinsics(16, 16)
    with pytest.raises(ValueError, match="outside the room"):
        s3.render(scene, s3.look_at([4.0, 0.0, 1.0], [0.0, 0.0, 1.0]), k, 16, 16)
