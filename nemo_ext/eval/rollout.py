"""Chunked rollouts of a run's model over held-out episodes, one path per family, for every task.

**Rollout.** From an episode's first frame, for each chunk the model generates the next ``chunk``
frames conditioned on the last frame it has (the episode's first frame, then its own last generated
frame) and on the chunk's conditioning (a task signal cut to the chunk, e.g. its ``task.chunk``
actions; or the whole episode's, e.g. its instruction). Video2World DiT = the EDM sampler with that
frame's latent frame given (:func:`nemo_ext.eval.generation.sample_dit`, the sampling of ``make
sample``); AR = that frame's token frame (after ``<bov>``) as the prompt, the next token frame
generated with the KV cache (:func:`nemo_ext.eval.generation.sample_ar`). The generated clip is
decoded, its frames appended, its last frame re-encoded as the next condition. Every episode is
rolled out with the same noise (per episode and chunk) under its true and its permuted conditioning,
so a model that ignores the conditioning scores exactly the same on both.

**Controls** permute the evaluated signal: ``time`` (each episode's rows in a fixed random order;
per-transition signals only) or ``episodes`` (each episode gets another episode's: a derangement).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nemo_ext.eval.episodes import Episode, EvalError
from nemo_ext.eval.metrics import frame_metrics

# time: each episode's rows shuffled in time; reverse: played backwards (a camera path driven the other
# way); episodes: another episode's signal
CONTROL_MODES = ("time", "episodes", "reverse")


def sample_seed(seed: int, episode: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, episode, step]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# Controls: a permuted signal
# ------------------------------------------------------------------------------------------------


def permute_time(values: torch.Tensor, seed: int, ids: Sequence[int]) -> torch.Tensor:
    """[E, N, D] -> each episode's N rows permuted (a fixed permutation per ``(seed, id)``, never the
    identity when N > 1)."""
    e, n = values.shape[:2]
    out = values.clone()
    for j, i in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        perm = np.arange(n)
        while n > 1 and np.array_equal(perm, np.arange(n)):
            perm = rng.permutation(n)
        out[j] = values[j, torch.from_numpy(perm)]
    return out


def derangement(e: int, seed: int) -> np.ndarray:
    """A random permutation of ``e`` >= 2 episodes that moves every one."""
    if e < 2:
        raise EvalError("the episodes control swaps conditioning between episodes: evaluate at least 2 (--episodes)")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(e)
        if not np.any(perm == np.arange(e)):
            return perm


def permute(values, mode: str, seed: int = 0, ids: Optional[Sequence[int]] = None):
    """``values`` of E episodes (a tensor [E, ...] or a list) under control ``mode``."""
    n = len(values)
    ids = list(range(n)) if ids is None else list(ids)
    if mode == "time":
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise EvalError("the time control permutes per-transition signals ([episodes, steps, dims]); use episodes")
        return permute_time(values, seed, ids)
    if mode == "reverse":
        if not isinstance(values, torch.Tensor) or values.dim() < 2:
            raise EvalError("the reverse control reverses per-frame or per-transition signals ([episodes, steps, ...])")
        return values.flip(1).clone()
    if mode == "episodes":
        perm = derangement(n, seed)
        return values[torch.from_numpy(perm)].clone() if isinstance(values, torch.Tensor) else [values[i] for i in perm]
    raise EvalError(f"control={mode!r}: expected one of {list(CONTROL_MODES)}")


# ------------------------------------------------------------------------------------------------
# Conditioning per chunk
# ------------------------------------------------------------------------------------------------


def chunk_condition(values: dict, aligns: dict, k: int, chunk: int, rows: slice) -> dict:
    """The conditioning of chunk ``k`` for episodes ``rows``: per-transition signals cut to the chunk
    (and ``<key>_prefix``: every row up to its end), per-frame signals to its frames, the others whole."""
    out = {}
    for key, v in values.items():
        v = v[rows]
        align = aligns.get(key)
        if align == "transitions":
            out[key] = v[:, k * chunk:(k + 1) * chunk]
            out[f"{key}_prefix"] = v[:, :(k + 1) * chunk]
        elif align == "frames":
            out[key] = v[:, k * chunk:(k + 1) * chunk + 1]
        else:
            out[key] = v
    return out


# predict(current [B, 3, H, W], cond: the chunk's conditioning (chunk_condition; "caption": list of str),
#         step k, episode ids) -> the next chunk's frames [B, 3, chunk, H, W], all in [-1, 1]
Predictor = Callable[[torch.Tensor, dict, int, Sequence[int]], torch.Tensor]


def rollout(predict: Predictor, first: torch.Tensor, values: dict, aligns: dict, chunk: int, chunks: int,
            ids: Sequence[int], rows: slice, on_chunk: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Roll ``predict`` out from ``first`` [B, 3, H, W] for ``chunks`` chunks: returns
    [B, 3, 1 + chunks * chunk, H, W] (frame 0 = ``first``)."""
    b = first.shape[0]
    frames = [first.float().cpu()[:, :, None]]
    current = first
    for k in range(chunks):
        nxt = predict(current, chunk_condition(values, aligns, k, chunk, rows), k, ids).float().cpu()
        if tuple(nxt.shape) != (b, first.shape[1], chunk, *first.shape[2:]):
            raise RuntimeError(f"the predictor returned {tuple(nxt.shape)}; expected {(b, first.shape[1], chunk, *first.shape[2:])}")
        frames.append(nxt)
        current = nxt[:, :, -1]
        if on_chunk is not None:
            on_chunk()
    return torch.cat(frames, dim=2)


# ------------------------------------------------------------------------------------------------
# The families' predictors (the sampling of make sample)
# ------------------------------------------------------------------------------------------------


def model_batch(run, cond: dict) -> dict:
    """The model batch of a chunk's conditioning: tensors on the device, and the captions' T5 context
    where the run is text-conditioned (else no context: the task conditioner fills its own)."""
    device = run.device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
    if run.text_conditioned and run.module.text_encoder is not None:
        batch["context"], batch["context_mask"] = run.module.text_encoder.encode(list(cond["caption"]), device)
    else:
        batch["context"] = batch["context_mask"] = None
    return batch


class DiffusionPredictor:
    """The run's Video2World DiT: the given frame's latent frame kept, the rest sampled with the
    EDM sampler (noise per episode and chunk from ``seed``)."""

    def __init__(self, run, *, steps: int = 35, solver: str = "heun", seed: int = 0, fps: Optional[float] = None,
                 guidance: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.run, self.steps, self.solver, self.seed, self.fps = run, steps, solver, seed, fps
        self.guidance, self.sigma_min, self.sigma_max = guidance, sigma_min, sigma_max
        self.model_calls = 0

    @torch.no_grad()
    def __call__(self, current, cond, step, ids):
        from nemo_ext.eval.generation import sample_dit

        run = self.run
        module, device = run.module, run.device
        c, t, h, w = run.plan.latent_shape
        b = current.shape[0]
        given = module.tokenizer.encode(current[:, :, None].to(device))[:, :, :1].float()
        cond_latents = torch.zeros(b, c, t, h, w, device=device)
        cond_latents[:, :, :1] = given
        noise, cond_noise = [], []
        gen = torch.Generator(device=device)
        for i in ids:
            gen.manual_seed(sample_seed(self.seed, i, step))
            noise.append(torch.randn(c, t, h, w, generator=gen, device=device))
            cond_noise.append(torch.randn(c, t, h, w, generator=gen, device=device))
        calls = [0]
        uncond = model_batch(run, {**cond, "caption": [""] * b}) if self.guidance != 1.0 else None
        latents = sample_dit(run, model_batch(run, cond), torch.stack(noise), cond_latents=cond_latents,
                             cond_noise=torch.stack(cond_noise), given_frames=1, steps=self.steps, solver=self.solver,
                             guidance=self.guidance, uncond_batch=uncond, fps=self.fps, sigma_min=self.sigma_min,
                             sigma_max=self.sigma_max, calls=calls)
        self.model_calls += calls[0]
        return module.tokenizer.decode(latents)[:, :, 1:].float()


class ARPredictor:
    """The run's AR model: ``[<bov>] + the given frame's token frame`` continued by the rest of the
    token grid with the chunk's conditioning as the cross-attention context (greedy by default)."""

    def __init__(self, run, *, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: int = 0):
        self.run = run
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.new_tokens = 0

    @torch.no_grad()
    def __call__(self, current, cond, step, ids):
        from nemo_ext.eval.generation import sample_ar

        run = self.run
        module, device = run.module, run.device
        t, h, w = tuple(run.plan.latent_shape)
        given = module.tokenizer.encode(current[:, :, None].to(device))[:, :1]
        gen = torch.Generator(device=device).manual_seed(sample_seed(self.seed, ids[0], step))
        tokens = sample_ar(run, given, model_batch(run, cond), temperature=self.temperature, top_k=self.top_k,
                           top_p=self.top_p, generator=gen)
        self.new_tokens += (t - 1) * h * w * current.shape[0]
        return module.tokenizer.decode(tokens)[:, :, 1:].float()


def predictor_of(run, args, fps: Optional[float]) -> tuple[Predictor, dict]:
    """The run's family predictor from the eval CLI's sampling options, and those options."""
    if run.family == "diffusion":
        guidance = getattr(args, "guidance", 1.0)
        return (DiffusionPredictor(run, steps=args.sampler_steps, solver=args.solver, seed=args.seed, fps=fps,
                                   guidance=guidance),
                {"sampler_steps": args.sampler_steps, "solver": args.solver, "guidance": guidance})
    return (ARPredictor(run, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
            {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p})


def code_metric(run) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], np.ndarray]]:
    """(name, fn(pred clips, gt clips) -> [B]) on clips ``[B, 3, 1 + chunk, H, W]``: both encoded
    with the run's tokenizer, compared on the predicted (not given) latent / token frames."""
    tok, device = run.module.tokenizer, run.device
    if run.family == "ar":
        def accuracy(pred, gt):
            a, b = tok.encode(pred.to(device))[:, 1:], tok.encode(gt.to(device))[:, 1:]
            return (a == b).double().flatten(1).mean(dim=1).cpu().numpy()

        return "token_accuracy", accuracy

    def latent_l2(pred, gt):
        a, b = tok.encode(pred.to(device))[:, :, 1:].double(), tok.encode(gt.to(device))[:, :, 1:].double()
        return (a - b).pow(2).flatten(1).mean(dim=1).sqrt().cpu().numpy()

    return "latent_l2", latent_l2


def tokenizer_roundtrip(run) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(clips [B, 3, 1 + chunk, H, W] in [-1, 1]) -> decode(encode(clips)) [B, 3, chunk, H, W]: what
    the run's tokenizer keeps of the predicted frames (a model that predicts the codes of the true
    future perfectly decodes exactly this)."""
    tok, device = run.module.tokenizer, run.device

    @torch.no_grad()
    def roundtrip(clips: torch.Tensor) -> torch.Tensor:
        return tok.decode(tok.encode(clips.to(device)))[:, :, 1:].float().cpu()

    return roundtrip


def roundtrip_chunks(roundtrip: Callable, video: torch.Tensor, chunk: int) -> torch.Tensor:
    """``video`` [B, 3, 1 + K * chunk, H, W] with every chunk replaced by its tokenizer round trip
    from the last frame before it (as the rollout conditions on it); frame 0 kept."""
    parts = [video[:, :, :1]]
    for j in range((video.shape[2] - 1) // chunk):
        parts.append(roundtrip(video[:, :, j * chunk: (j + 1) * chunk + 1]))
    return torch.cat(parts, dim=2)


# ------------------------------------------------------------------------------------------------
# Rollouts over episodes
# ------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """Per-episode results: metrics [E, S] per frame (S = K * chunk), code metrics [E, K] per chunk;
    ``outputs[name]`` the rolled-out videos of the first episodes (for videos and task metrics)."""

    ids: list
    chunk: int
    chunks: int
    metrics: dict  # name -> np.ndarray
    videos: dict  # episode id -> {"gt", "pred", "control"} uint8 [T, H, W, 3]
    seconds: dict
    conditioning: dict  # "true" / "control": the evaluated signal's values per episode


def rollout_chunks(episodes: Sequence[Episode], chunk: int, chunks: Optional[int], needs: int = 1) -> int:
    """The number of chunks to roll out: ``chunks``, or as many as the shortest episode allows."""
    if not episodes:
        raise EvalError("no episodes to evaluate")
    most = min((ep.num_frames - 1) // chunk for ep in episodes)
    if most < needs:
        short = min(episodes, key=lambda ep: ep.num_frames)
        raise EvalError(f"episode {short.key} has {short.num_frames} frames: a rollout needs at least 1 + {chunk} frames")
    k = most if chunks is None else chunks
    if not 1 <= k <= most:
        raise EvalError(f"--steps {chunks}: the evaluated episodes allow 1 to {most} chunks of {chunk} frames")
    return k


def episode_values(episodes: Sequence[Episode], aligns: dict, frames: int) -> dict:
    """The episodes' signals as batches: tensors cut to the rolled-out ``frames`` (per transition:
    ``frames - 1`` rows), captions as a list."""
    values = {"caption": [ep.caption for ep in episodes]}
    for key, align in aligns.items():
        rows = frames - 1 if align == "transitions" else frames if align == "frames" else None
        values[key] = torch.stack([ep.signals[key][:rows] if rows is not None else ep.signals[key] for ep in episodes])
    return values


def evaluate_rollouts(predict: Predictor, episodes: Sequence[Episode], chunk: int, aligns: dict, signal: str, *,
                      chunks: Optional[int] = None, control: str = "time", control_seed: int = 0, batch_size: int = 4,
                      code_fn: Optional[tuple[str, Callable]] = None, simulator: Optional[Predictor] = None,
                      roundtrip: Optional[Callable] = None, videos: int = 0, keep: int = 0,
                      progress: bool = False) -> Rollouts:
    """Roll ``predict`` out over ``episodes`` with their true and their permuted ``signal`` (control
    ``control``); metrics vs the episodes' frames; with ``simulator``, the ground-truth replay under
    both; with ``roundtrip`` (:func:`tokenizer_roundtrip`), the tokenizer's ceiling: the episodes'
    frames (and the simulator's control replay) through the tokenizer, chunk by chunk. ``keep``: the
    first episodes whose rolled-out videos are returned (for task metrics), besides ``videos``."""
    from tqdm import tqdm

    from nemo_ext.eval.generation import to_frames

    k = rollout_chunks(episodes, chunk, chunks)
    n = k * chunk
    ids = [ep.index for ep in episodes]
    true = episode_values(episodes, aligns, n + 1)
    permuted = dict(true)
    permuted[signal] = permute(true[signal], control, control_seed, ids)
    code_name = code_fn[0] if code_fn else None
    parts: dict[str, list] = {}
    vids: dict = {}
    secs = {"rollout_true": 0.0, "rollout_control": 0.0, "ground_truth_control": 0.0, "metrics": 0.0}
    per_batch = 2 + 2 * (simulator is not None)
    bar = tqdm(total=math.ceil(len(episodes) / batch_size) * k * per_batch, disable=not progress, desc="rollout",
               unit="chunk")
    try:
        for s in range(0, len(episodes), batch_size):
            rows = slice(s, s + batch_size)
            eps = episodes[rows]
            bid = ids[rows]
            gt = torch.stack([ep.frames[:, : n + 1] for ep in eps])
            outs = {}
            for name, values, key in (("pred", true, "rollout_true"), ("control", permuted, "rollout_control")):
                t0 = time.perf_counter()
                outs[name] = rollout(predict, gt[:, :, 0], values, aligns, chunk, k, bid, rows, bar.update)
                secs[key] += time.perf_counter() - t0
            if simulator is not None:
                t0 = time.perf_counter()
                outs["simulator_control"] = rollout(simulator, gt[:, :, 0], permuted, aligns, chunk, k, bid, rows,
                                                    bar.update)
                outs["simulator"] = rollout(simulator, gt[:, :, 0], true, aligns, chunk, k, bid, rows, bar.update)
                secs["ground_truth_control"] += time.perf_counter() - t0
            if roundtrip is not None:
                t0 = time.perf_counter()
                outs["ceiling"] = roundtrip_chunks(roundtrip, gt, chunk)
                if simulator is not None:
                    outs["ceiling_control"] = roundtrip_chunks(roundtrip, outs["simulator_control"], chunk)
                secs["tokenizer_ceiling"] = secs.get("tokenizer_ceiling", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, video in outs.items():
                p, q = frame_metrics(video[:, :, 1:], gt[:, :, 1:])
                parts.setdefault(f"psnr_{name}", []).append(p)
                parts.setdefault(f"ssim_{name}", []).append(q)
                if code_fn is not None and name in ("pred", "control"):
                    per_chunk = [code_fn[1](video[:, :, j * chunk: (j + 1) * chunk + 1],
                                            gt[:, :, j * chunk: (j + 1) * chunk + 1]) for j in range(k)]
                    parts.setdefault(f"{code_name}_{name}", []).append(np.stack(per_chunk, axis=1))
            secs["metrics"] += time.perf_counter() - t0
            for row, i in enumerate(bid):
                if len(vids) < max(videos, keep):
                    vids[i] = {name: to_frames(outs[name][row] if name != "gt" else gt[row])
                               for name in ("gt", "pred", "control")}
    finally:
        bar.close()
    metrics = {name: np.concatenate(chunks_, axis=0) for name, chunks_ in parts.items()}
    return Rollouts(ids=ids, chunk=chunk, chunks=k, metrics=metrics, videos=vids, seconds=secs,
                    conditioning={"true": true[signal], "control": permuted[signal]})


def base_metrics(predict: Predictor, episodes: Sequence[Episode], aligns: dict, chunk: int, chunks: int,
                 batch_size: int, videos: Optional[dict] = None) -> dict:
    """``psnr_base`` / ``ssim_base`` [E, S]: ``predict`` (the base model) rolled out with the true
    conditioning, as :func:`evaluate_rollouts` rolls out the run's model; its videos are added to
    ``videos`` (episode id -> panels, as ``base``) for the episodes already there."""
    from nemo_ext.eval.generation import to_frames

    n = chunks * chunk
    true = episode_values(episodes, aligns, n + 1)
    ids = [ep.index for ep in episodes]
    parts = []
    for s in range(0, len(episodes), batch_size):
        rows = slice(s, s + batch_size)
        gt = torch.stack([ep.frames[:, : n + 1] for ep in episodes[rows]])
        video = rollout(predict, gt[:, :, 0], true, aligns, chunk, chunks, ids[rows], rows)
        parts.append(frame_metrics(video[:, :, 1:], gt[:, :, 1:]))
        for row, i in enumerate(ids[rows]):
            if videos is not None and i in videos:
                videos[i]["base"] = to_frames(video[row])
    return {"psnr_base": np.concatenate([p for p, _ in parts]), "ssim_base": np.concatenate([q for _, q in parts])}


@torch.no_grad()
def teacher_forced_losses(run, episodes: Sequence[Episode], chunk: int, aligns: dict, signal: str, control_values, *,
                          chunks: int, seed: int = 0) -> dict:
    """The training loss on ground-truth clips (no rollout): each of the first ``chunks`` chunks of
    every episode as a clip (its first frame + ``chunk`` frames) with the true and with the permuted
    ``signal`` (``control_values``), through the run's own ``prepare_microbatch`` (validation mode) and
    ``forward_step``: diffusion the EDM denoising loss, AR the next-token cross-entropy. Both passes
    draw the same noise (the sample seed of episode and chunk), so a model that ignores the signal scores
    exactly the same; one that uses it has the lower loss with the true one, even while its samples are
    still poor. ``loss_gap`` = control - true (mean over episodes, with a bootstrap interval)."""
    from nemo_ext.eval.metrics import bootstrap_ci

    module = run.module
    frames = chunks * chunk + 1
    true = episode_values(episodes, aligns, frames)
    permuted = dict(true)
    permuted[signal] = control_values
    per_episode = {"true": np.zeros(len(episodes)), "control": np.zeros(len(episodes))}
    for e, ep in enumerate(episodes):
        for k in range(chunks):
            for name, values in (("true", true), ("control", permuted)):
                cond = chunk_condition(values, aligns, k, chunk, slice(e, e + 1))
                raw = {"video": ep.frames[None, :, k * chunk: (k + 1) * chunk + 1],
                       "sample_seed": torch.tensor([sample_seed(seed, ep.index, k)]),
                       **{key: (v.float() if isinstance(v, torch.Tensor) else v) for key, v in cond.items()
                          if not key.endswith("_prefix")}}
                if ep.fps:
                    raw["fps"] = torch.tensor([float(ep.fps)])
                mb = module.prepare_microbatch(raw, 0, validation=True)
                out, loss_fn = module.forward_step(iter([mb]), module.world_model)
                per_episode[name][e] += float(loss_fn(out)[0]) / chunks
    gaps = per_episode["control"] - per_episode["true"]
    ci = bootstrap_ci(gaps.tolist(), seed=seed)
    return {"loss_true": float(per_episode["true"].mean()), "loss_control": float(per_episode["control"].mean()),
            "loss_gap": float(gaps.mean()), "loss_gap_ci95": list(ci) if ci else None,
            "clips": len(episodes) * chunks, "per_episode_gap": gaps.tolist()}
