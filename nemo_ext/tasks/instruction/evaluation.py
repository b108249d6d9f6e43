"""instruction's evaluation on the shared core (``make recipe=instruction eval CKPT=...``).

From each held-out episode's first frame the model generates the clip under its own instruction and,
as the control, under another episode's (``--control episodes``), and with ``--base`` the base model
under its own: PSNR/SSIM against the ground truth, the paired gaps and the shared verdict (margin
0.25 dB), the teacher-forced loss gap (true vs swapped instruction: the measure for real data, where no
simulator exists).

**Instruction following** (the procedural instruction world, json ``command``): in the last generated
frame the named object is found by colour segmentation (OpenCV: the pixels within
:data:`COLOUR_TOLERANCE` of its palette colour, the largest connected component's centroid); success
when its displacement from the first frame lies within :data:`SUCCESS_FRAC` of the move distance of the
commanded one. Per
rollout also the observed direction (the displacement from the first frame, or ``none`` below
:data:`SUCCESS_FRAC` of the move): a confusion table commanded x observed per evaluation, success per
instruction, the held-out colour-direction pairs reported apart, the same estimator on the
ground-truth video as the ceiling row, and a second verdict on the success gaps (margin
:data:`SUCCESS_MARGIN`). The simulator (:func:`~nemo_ext.tasks.instruction.world.render_instruction_episode`)
gives the ground truth under the swapped instruction.

**Review page** (``review.html``): for people. Per episode, the instruction and two generated videos in
a random order, one under that instruction, one under another episode's; the rater clicks the one that
follows the instruction; "Save" writes the choices as JSON (a download, and shown on the page).
``review_key.json`` beside it says which video was which (kept out of the page).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from nemo_ext.eval.core import Evaluation, register_evaluation, require_one_given_frame
from nemo_ext.eval.episodes import Episode, to_video

COLOUR_TOLERANCE = 45  # max |channel - palette| of an object's pixels
SUCCESS_FRAC = 0.3  # success: final centre within this fraction of the move distance of the target
SUCCESS_MARGIN = 0.05  # the success-rate verdict's margin (absolute rate)
MIN_AREA_FRAC = 0.002  # the smallest component taken for an object, as a fraction of the frame


def object_centre(frame: np.ndarray, rgb: Sequence[int]) -> Optional[tuple[float, float]]:
    """Centroid (x, y) of the largest component of ``frame``'s pixels near colour ``rgb``."""
    import cv2

    lo = np.clip(np.asarray(rgb) - COLOUR_TOLERANCE, 0, 255).astype(np.uint8)
    hi = np.clip(np.asarray(rgb) + COLOUR_TOLERANCE, 0, 255).astype(np.uint8)
    mask = cv2.inRange(np.ascontiguousarray(frame), lo, hi)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < MIN_AREA_FRAC * frame.shape[0] * frame.shape[1]:
        return None
    return float(centroids[k][0]) + 0.5, float(centroids[k][1]) + 0.5  # pixel i covers [i, i + 1)


def judge(video: np.ndarray, meta: dict, scale: tuple[float, float]) -> dict:
    """Did ``video`` (uint8 [T, H, W, 3]) do the episode's command? ``scale``: (x, y) from the world's
    pixels to the video's."""
    from nemo_ext.tasks.instruction.world import DIRECTIONS

    cmd = meta["command"]
    target = meta["objects"][meta["target"]]
    sx, sy = scale
    move = meta["move_px"] * min(sx, sy)
    start = object_centre(video[0], target["rgb"])
    end = object_centre(video[-1], target["rgb"])
    if end is None:
        return {"found": False, "success": False, "observed": "lost", "error_px": None}
    # the displacement against the commanded one (a shape's centroid is not its centre: a triangle's sits
    # lower; the offset cancels); without the first frame's object, the end point against the goal
    goal = np.array([(target["end"][0] - target["position"][0]) * sx, (target["end"][1] - target["position"][1]) * sy])
    if start is not None:
        d = np.array([end[0] - start[0], end[1] - start[1]])
    else:
        d = np.array([end[0] - target["position"][0] * sx, end[1] - target["position"][1] * sy])
    error = float(np.hypot(*(d - goal)))
    observed = "none"
    if start is not None and np.hypot(*d) >= SUCCESS_FRAC * move:
        observed = max(DIRECTIONS, key=lambda k: float(np.dot(d, DIRECTIONS[k])))
    return {"found": True, "success": error <= SUCCESS_FRAC * move, "observed": observed, "error_px": error,
            "commanded": cmd["direction"]}


def _rate(items: list) -> Optional[float]:
    return float(np.mean([x["success"] for x in items])) if items else None


def task_metrics(result, episodes: Sequence[Episode], run, args) -> Optional[dict]:
    from nemo_ext.eval.metrics import paired_gap, verdict
    from nemo_ext.tasks.instruction.world import DIRECTIONS

    if not all("command" in ep.meta for ep in episodes):
        return None  # real data: the PSNR and teacher-forced gaps are the measure
    judged = {name: [] for name in ("ground_truth", "pred", "control", "base")}
    for ep in episodes:
        v = result.videos[ep.index]
        scale = (v["gt"].shape[2] / ep.meta["width"], v["gt"].shape[1] / ep.meta["height"])
        for name in judged:
            if name == "ground_truth":
                judged[name].append(judge(v["gt"], ep.meta, scale))
            elif name in v:
                judged[name].append(judge(v[name], ep.meta, scale))
    held = [bool(ep.meta.get("held_out_pair")) for ep in episodes]
    rates = {}
    for name, items in judged.items():
        if not items:
            continue
        rates[name] = {"success": _rate(items), "found": float(np.mean([x["found"] for x in items])),
                       "seen_pairs": _rate([x for x, h in zip(items, held) if not h]),
                       "held_out_pairs": _rate([x for x, h in zip(items, held) if h])}
    confusion = {}
    for name in ("ground_truth", "pred", "control"):
        table = {d: {o: 0 for o in (*DIRECTIONS, "none", "lost")} for d in DIRECTIONS}
        for ep, x in zip(episodes, judged[name]):
            table[ep.meta["command"]["direction"]][x["observed"]] += 1
        confusion[name] = table
    per_instruction = {}
    for ep, x in zip(episodes, judged["pred"]):
        key = f"{ep.meta['command']['color']} {ep.meta['command']['direction']}"
        per_instruction.setdefault(key, []).append(x["success"])
    success = lambda name: np.array([x["success"] for x in judged[name]], dtype=np.float64)  # noqa: E731
    gaps = {"control": paired_gap(success("pred"), success("control"), seed=args.control_seed),
            "base model": paired_gap(success("pred"), success("base"), seed=args.control_seed) if judged["base"] else None}
    state = verdict(gaps, margin=SUCCESS_MARGIN, unit_name="success rate")
    return {
        "what": "instruction following in the procedural world: the named object, found by colour segmentation in the "
                f"last frame, within {SUCCESS_FRAC} x the move distance of its commanded end position",
        "success_rate": rates, "confusion": confusion,
        "per_instruction": {k: float(np.mean(v)) for k, v in sorted(per_instruction.items())},
        "held_out_pairs": int(sum(held)), "success_gap_vs_control": gaps["control"],
        "success_gap_vs_base": gaps["base model"], "success_verdict": state,
        "headline": (f"instruction following: success {rates['pred']['success']:.2f} with the true instruction, "
                     f"{rates['control']['success']:.2f} with a swapped one"
                     + (f", {rates['base']['success']:.2f} base" if "base" in rates else "")
                     + f"; ground truth {rates['ground_truth']['success']:.2f}; held-out pairs "
                       f"{rates['pred']['held_out_pairs'] if rates['pred']['held_out_pairs'] is not None else 'n/a'}"
                     + f" -> {state['verdict']}"),
    }


def write_review_page(out_dir: Path, result, episodes: Sequence[Episode], fps: float, args) -> dict:
    """review.html + review_key.json + the clips they show (VP9 in mp4: what headless browsers play)."""
    from nemo_ext.eval.generation import write_mp4

    rng = np.random.default_rng(args.control_seed + 17)
    clips = out_dir / "review"
    clips.mkdir(exist_ok=True)
    items, key = [], []
    permuted = list(result.conditioning["control"])
    for row, ep in enumerate(episodes):
        v = result.videos.get(ep.index)
        if v is None:
            continue
        first_is_true = bool(rng.integers(2))
        pair = [("pred", "true"), ("control", "swapped")]
        if not first_is_true:
            pair.reverse()
        files = []
        for slot, (name, _) in zip("ab", pair):
            path = write_mp4(clips / f"{ep.key}_{slot}.mp4", v[name], fps, codec="vp9")
            files.append(f"review/{path.name}")
        items.append({"id": ep.key, "instruction": ep.caption, "videos": files})
        key.append({"id": ep.key, "true_video": "a" if first_is_true else "b", "swapped_instruction": permuted[row]})
    page = out_dir / "review.html"
    page.write_text(_PAGE.replace("__ITEMS__", html.escape(json.dumps(items), quote=False)))
    (out_dir / "review_key.json").write_text(json.dumps(key, indent=1) + "\n")
    return {"review_page": page.name, "review_key": "review_key.json", "review_items": len(items)}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>instruction following: review</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}.item{border:1px solid #ccc;padding:1em;margin:1em 0}
.pair{display:flex;gap:1em}.choice{flex:1;text-align:center}video{width:100%;image-rendering:pixelated}
button.chosen{background:#8c8;font-weight:bold}</style></head>
<body><h1>Which video follows the instruction?</h1>
<p>For every instruction, click the video that does what it says (the order is random). Then press Save:
your choices are shown below and downloaded as <code>review_choices.json</code>.</p>
<div id="items"></div><button id="save">Save</button><pre id="result"></pre>
<script id="data" type="application/json">__ITEMS__</script>
<script>
const items = JSON.parse(document.getElementById("data").textContent);
const choices = {};
const root = document.getElementById("items");
items.forEach((item, n) => {
  const div = document.createElement("div"); div.className = "item"; div.id = "item-" + item.id;
  const title = document.createElement("p"); title.textContent = (n + 1) + ". " + item.instruction; div.appendChild(title);
  const pair = document.createElement("div"); pair.className = "pair";
  ["a", "b"].forEach((slot, k) => {
    const cell = document.createElement("div"); cell.className = "choice";
    const video = document.createElement("video"); video.src = item.videos[k]; video.controls = true; video.loop = true;
    video.muted = true; video.autoplay = true; cell.appendChild(video);
    const button = document.createElement("button"); button.textContent = "video " + slot.toUpperCase();
    button.className = "pick"; button.dataset.item = item.id; button.dataset.slot = slot;
    button.onclick = () => { choices[item.id] = slot;
      div.querySelectorAll("button.pick").forEach(b => b.classList.toggle("chosen", b === button)); };
    cell.appendChild(button); pair.appendChild(cell);
  });
  div.appendChild(pair); root.appendChild(div);
});
document.getElementById("save").onclick = () => {
  const out = {answered: Object.keys(choices).length, total: items.length,
               choices: items.map(i => ({id: i.id, instruction: i.instruction, chosen: choices[i.id] || null}))};
  const text = JSON.stringify(out, null, 1);
  document.getElementById("result").textContent = text;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
  link.download = "review_choices.json"; link.click();
};
</script></body></html>
"""


class SimulatorPredictor:
    """The instruction world's ground truth under any instruction (the episode's scene re-rendered),
    chunk by chunk of ``chunk`` frames."""

    def __init__(self, episodes: Sequence[Episode], height: int, width: int, chunk: int, resize_mode: str = "crop"):
        self.episodes = {ep.index: ep for ep in episodes}
        self.size = (height, width, resize_mode)
        self.chunk = chunk

    @staticmethod
    def supports(episode: Episode) -> bool:
        m = episode.meta
        return m.get("variant") == "instruction" and all(k in m for k in ("seed", "index", "height", "width"))

    def __call__(self, current, cond, step, ids):
        from nemo_ext.data.video import resize_and_crop
        from nemo_ext.tasks.instruction.world import render_instruction_episode
        from nemo_ext.worlds import WorldSpec

        out = []
        h, w, mode = self.size
        frames_of = slice(1 + step * self.chunk, 1 + (step + 1) * self.chunk)
        for row, i in enumerate(ids):
            m = self.episodes[i].meta
            spec = WorldSpec(num_frames=int(m["num_frames"]), height=int(m["height"]), width=int(m["width"]),
                             fps=float(m.get("fps") or 8))
            frames, _ = render_instruction_episode(spec, int(m["seed"]), int(m["index"]), bool(m.get("held_out")),
                                                   instruction=cond["caption"][row])
            out.append(to_video(resize_and_crop(frames[frames_of], h, w, mode)))
        return torch.stack(out)


def simulator(episodes, cfg):
    if not all(SimulatorPredictor.supports(ep) for ep in episodes):
        return None
    return SimulatorPredictor(episodes, cfg.data.height, cfg.data.width, cfg.data.num_frames - 1, cfg.data.resize_mode)


INSTRUCTION_EVALUATION = register_evaluation(Evaluation(
    task="instruction",
    description="rollouts from the first frame under the true vs another episode's instruction (and the base model): "
                "PSNR / SSIM, instruction-following success by colour segmentation (confusion table, held-out "
                "colour-direction pairs apart, the ground truth as the ceiling row), the teacher-forced loss gap, and a "
                "review page for people",
    signal="caption",
    controls=("episodes",),
    margin_db=0.25,
    check_run=require_one_given_frame,
    simulator=simulator,
    task_metrics=task_metrics,
    write_outputs=write_review_page,
    panels=("ground truth", "prediction", "prediction under another episode's instruction"),
    control_label="swapped instruction",
))
