"""action_control evaluation: autoregressive rollouts over held-out episodes, both model families
(``python -m nemo_ext.cli.eval --ckpt <run>``, ``make recipe=action_control eval CKPT=...``).

**Rollout.** From an episode's first frame, for each chunk of ``task.chunk`` actions the model
generates the next ``chunk`` frames conditioned on the last frame it has (the episode's first frame,
then its own last generated frame): Video2World DiT = the EDM sampler with that frame's latent
frame given (``nemo_ext.eval.generation.dit_denoiser``, the training forward pass); AR = that
frame's token frame (after ``<bov>``) as the prompt, the next token frame generated with the KV
cache and the chunk's action tokens as the cross-attention context. The generated clip is decoded,
its frames appended, its last frame re-encoded as the next condition, for ``K`` chunks (default:
as many as the shortest evaluated episode allows: ``(T - 1) // chunk``). Every episode of a run is
rolled out with the same noise (diffusion: per episode and chunk) for its true and its shuffled
actions, so a model that ignores the actions scores exactly the same on both.

**Episodes.** The run's held-out data (``--split val``, default): the held-out sample world
``<data.sample_dir>_val`` for sample-world runs, ``data.val_path`` otherwise; ``--split train``:
the training data. Whole videos and their ``actions.npy`` (not training clips), resized like the
training data.

**Metrics** per rollout step (= frame index 1..K*chunk; frame 0 is given), averaged over episodes:
PSNR (dB, images in [0, 1]; capped at :data:`PSNR_CAP` when averaging: identical frames are inf)
and SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region, mean over channels) vs
the decoded ground-truth frames; per chunk, with both clips (the chunk's conditioning frame + its
frames; ground truth and prediction) encoded by the run's tokenizer: diffusion ``latent_l2`` (the
RMS difference of the predicted latent frames, in normalized latent units), AR
``token_accuracy`` (the fraction of equal tokens in the predicted token frames).

**Action sensitivity.** The same rollout with each episode's actions shuffled across time
(``--shuffle time``, a fixed permutation from ``--shuffle-seed``) or swapped between episodes
(``--shuffle episodes``); ``psnr_gap_db = psnr(true actions) - psnr(shuffled)`` per episode (mean
over steps), its mean with a 95% bootstrap interval over episodes, the same for SSIM. Verdict:
``learned`` when the PSNR gap exceeds ``--threshold-db`` (default :data:`DEFAULT_THRESHOLD_DB`) and
the interval's lower end is above 0 (no interval below 3 episodes), ``not_learned`` when the gap is
at most the threshold, ``inconclusive`` otherwise. For the procedural action world (json
``variant: action``) a **ground-truth control** replays the episode in the simulator
(``data_prep.sample_world.render_action_episode``) under the shuffled actions: how different the
shuffled future really is (the largest gap a perfect model could show).

**Outputs** in ``<run>/eval/<name>/`` (``--out``): ``report.json``, ``metrics.png`` (metric vs
rollout step; drawn with PIL: matplotlib is not a dependency), ``rollout_<episode>.mp4`` (ground
truth | prediction | prediction with shuffled actions).

Pixel metrics need a decodable tokenizer: the random-weight tiny VAE (``dit_tiny_v2w``) and the
untrained built-in FSQ tokenizer make them meaningless (plumbing only). Use
``model=dit_tiny_v2w_s2d`` (exactly invertible space-to-depth) for small diffusion experiments, a
trained FSQ tokenizer for AR (``python -m nemo_ext.cli.prep train-tokenizer``, then
``model.tokenizer.builtin_weights=<file>``), or real Cosmos tokenizers.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TASK = "action_control"
PSNR_CAP = 100.0  # dB: identical frames (inf) count as this in averages
DEFAULT_THRESHOLD_DB = 0.25
SHUFFLE_MODES = ("time", "episodes")
VERDICTS = ("learned", "not_learned", "inconclusive")


class EvalError(ValueError):
    """A run or its data cannot be evaluated (the message says why)."""


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float64."""
    return ((x.double().clamp(-1, 1) + 1) / 2)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of ``[N, C, H, W]`` batches (inf where the images are equal)."""
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"psnr: expected two [N, C, H, W] batches of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    mse = (pred.double() - target.double()).pow(2).mean(dim=(1, 2, 3))
    out = 10 * torch.log10(data_range ** 2 / mse)
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image of ``[N, C, H, W]`` batches: Gaussian window (``window``,
    ``sigma``; shrunk to the image for small ones), statistics over the valid region, averaged over
    positions and channels. 1 for equal images."""
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"ssim: expected two [N, C, H, W] batches of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    a, b = pred.double(), target.double()
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_kernel(size, sigma, a)

    def filt(x):  # the separable 2D Gaussian (outer(g, g)), valid region, every channel alone
        x = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), g.view(1, 1, 1, size))
        return F.conv2d(x, g.view(1, 1, size, 1)).reshape(n, c, h - size + 1, w - size + 1)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=(1, 2, 3))


def frame_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Videos ``[B, 3, S, H, W]`` in [-1, 1] -> (PSNR [B, S], SSIM [B, S]) per frame."""
    b, c, s, h, w = pred.shape
    p = _unit(pred).transpose(1, 2).reshape(b * s, c, h, w)
    t = _unit(target).transpose(1, 2).reshape(b * s, c, h, w)
    return psnr(p, t).reshape(b, s).numpy(), ssim(p, t).reshape(b, s).numpy()


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of the mean over ``values`` (None below 3 values)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 3:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def action_sensitivity(psnr_true: np.ndarray, psnr_shuffled: np.ndarray, ssim_true: np.ndarray,
                       ssim_shuffled: np.ndarray, threshold_db: float = DEFAULT_THRESHOLD_DB, seed: int = 0) -> dict:
    """Per-episode gaps (mean over steps of ``true - shuffled``; arrays [episodes, steps]) -> the
    sensitivity block of the report, with the verdict (see the module docstring)."""
    cap = lambda x: np.minimum(np.asarray(x, dtype=np.float64), PSNR_CAP)  # noqa: E731
    gap = (cap(psnr_true) - cap(psnr_shuffled)).mean(axis=1)
    sgap = (np.asarray(ssim_true, dtype=np.float64) - np.asarray(ssim_shuffled, dtype=np.float64)).mean(axis=1)
    mean = float(gap.mean())
    ci = bootstrap_ci(gap, seed=seed)
    if mean <= threshold_db:
        verdict = "not_learned"
        why = (f"the shuffled-action rollout is not worse by more than {threshold_db} dB PSNR "
               f"(gap {mean:.3f} dB): the predictions do not depend on the actions measurably")
        if ci is not None and ci[1] < 0:
            why = (f"the shuffled-action rollout scores better (gap {mean:.3f} dB, 95% interval [{ci[0]:.3f}, "
                   f"{ci[1]:.3f}] below 0): the predictions react to the actions, but not as the data does "
                   "(PSNR also favours static or blurred predictions over misplaced motion)")
    elif ci is None or ci[0] > 0:
        verdict = "learned"
        why = (f"PSNR drops by {mean:.3f} dB > {threshold_db} dB with shuffled actions"
               + (f", 95% bootstrap interval over episodes [{ci[0]:.3f}, {ci[1]:.3f}] above 0" if ci else
                  f" (only {len(gap)} episode(s): no interval; evaluate more for one)"))
    else:
        verdict = "inconclusive"
        why = (f"mean PSNR gap {mean:.3f} dB > {threshold_db} dB but the 95% bootstrap interval "
               f"[{ci[0]:.3f}, {ci[1]:.3f}] includes 0: evaluate more episodes")
    return {
        "psnr_gap_db": mean,
        "psnr_gap_ci95": None if ci is None else list(ci),
        "ssim_gap": float(sgap.mean()),
        "ssim_gap_ci95": (lambda c: None if c is None else list(c))(bootstrap_ci(sgap, seed=seed)),
        "psnr_gap_db_per_episode": gap.tolist(),
        "ssim_gap_per_episode": sgap.tolist(),
        "threshold_db": threshold_db,
        "verdict": verdict,
        "explanation": why,
    }


# ------------------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One whole episode: ``frames`` [3, T, H, W] in [-1, 1] (at the run's size) and the
    ``actions`` [T - 1, action_dim] between them."""

    key: str
    index: int  # position in the evaluated split
    frames: torch.Tensor
    actions: torch.Tensor
    caption: str = ""
    fps: Optional[float] = None
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[1]


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def read_episodes(paths: Sequence[str], height: int, width: int, *, num: Optional[int] = None, start: int = 0,
                  resize_mode: str = "crop", action_dim: Optional[int] = None, what: str = "data") -> list[Episode]:
    """Whole episodes (video + ``actions.npy`` + json) of shard paths, ``start`` to ``start + num``."""
    from nemo_ext.data.shards import ShardIndex
    from nemo_ext.data.video import decode_frames, probe_video, resize_and_crop

    episodes: list[Episode] = []
    position = 0
    for path in paths:
        try:
            index = ShardIndex.from_paths(path, required_exts=("mp4", "actions.npy"))
        except Exception as exc:  # noqa: BLE001 - missing / empty / without actions: say which
            raise EvalError(f"cannot read episodes from the {what} at {path}: {exc}") from exc
        try:
            for i in range(len(index)):
                if position < start:
                    position += 1
                    continue
                if num is not None and len(episodes) >= num:
                    break
                meta = json.loads(index.read(i, "json")) if index.has(i, "json") else {}
                data = index.read(i, "mp4")
                total = probe_video(data).num_frames
                frames = resize_and_crop(decode_frames(data, 0, total), height, width, resize_mode)
                actions = np.load(io.BytesIO(index.read(i, "actions.npy")), allow_pickle=False)
                key = index.key(i)
                if actions.ndim != 2 or actions.shape[0] != total - 1:
                    raise EvalError(f"{path}: {key}.actions.npy has shape {actions.shape}; expected [{total - 1}, dims] "
                                    f"(one row per transition of its {total} frames)")
                if action_dim is not None and actions.shape[1] != action_dim:
                    raise EvalError(f"{path}: {key}.actions.npy has {actions.shape[1]} action dims but the run's "
                                    f"task.action_dim={action_dim}")
                fps = float(meta.get("fps") or 0) or None
                episodes.append(Episode(key=key, index=position, frames=_to_video(frames),
                                        actions=torch.from_numpy(actions.astype(np.float32)),
                                        caption=str(meta.get("caption") or ""), fps=fps, meta=meta))
                position += 1
        finally:
            index.close()
        if num is not None and len(episodes) >= num:
            break
    return episodes


def episodes_of_run(cfg, split: str = "val", num: Optional[int] = None, start: int = 0) -> tuple[list[Episode], str]:
    """The run's held-out (``val``) or training (``train``) episodes, and where they came from."""
    from nemo_ext.config.compose import ConfigError
    from nemo_ext.eval.generation import data_split_path

    if split not in ("val", "train"):
        raise EvalError(f"split={split!r}: expected val or train")
    if cfg.data.frame_stride != 1:
        raise EvalError(f"data.frame_stride={cfg.data.frame_stride}: actions are per transition, evaluation needs stride 1")
    try:
        named, _ = data_split_path(cfg, split)
    except ConfigError as exc:
        raise EvalError(f"no held-out episodes: {exc}") from exc
    paths = [p for _, p in named]
    episodes = read_episodes(paths, cfg.data.height, cfg.data.width, num=num, start=start,
                             resize_mode=cfg.data.resize_mode, action_dim=cfg.task.action_dim,
                             what="held-out data" if split == "val" else "training data")
    if not episodes:
        raise EvalError(f"no {'held-out' if split == 'val' else 'training'} episodes in {', '.join(paths)}"
                        + (f" from index {start}" if start else ""))
    return episodes, ", ".join(paths)


def shuffle_actions(actions: torch.Tensor, mode: str = "time", seed: int = 0,
                    ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[E, N, D] actions of E episodes -> shuffled: ``time`` permutes each episode's N rows (a fixed
    permutation per ``(seed, id)``, never the identity when N > 1); ``episodes`` gives each episode
    the actions of another one (a random derangement from ``seed``; needs E >= 2)."""
    e, n, _ = actions.shape
    ids = list(range(e)) if ids is None else list(ids)
    if mode == "time":
        out = actions.clone()
        for j, i in enumerate(ids):
            rng = np.random.default_rng([seed, i])
            perm = np.arange(n)
            while n > 1 and np.array_equal(perm, np.arange(n)):
                perm = rng.permutation(n)
            out[j] = actions[j, torch.from_numpy(perm)]
        return out
    if mode == "episodes":
        if e < 2:
            raise EvalError("--shuffle episodes swaps actions between episodes: evaluate at least 2 (--episodes)")
        rng = np.random.default_rng(seed)
        while True:
            perm = rng.permutation(e)
            if not np.any(perm == np.arange(e)):
                return actions[torch.from_numpy(perm)].clone()
    raise EvalError(f"shuffle={mode!r}: expected one of {list(SHUFFLE_MODES)}")


# ------------------------------------------------------------------------------------------------
# Predictors and the rollout
# ------------------------------------------------------------------------------------------------

# predict(current [B, 3, H, W], chunk actions [B, chunk, D], step k, action prefix [B, (k+1)*chunk, D],
#         episode ids) -> the next chunk's frames [B, 3, chunk, H, W], all in [-1, 1]
Predictor = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, Sequence[int]], torch.Tensor]


def rollout(predict: Predictor, first: torch.Tensor, actions: torch.Tensor, chunk: int, ids: Sequence[int],
            on_chunk: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Roll ``predict`` out from ``first`` [B, 3, H, W] through ``actions`` [B, K * chunk, D]:
    returns [B, 3, 1 + K * chunk, H, W] (frame 0 = ``first``), each chunk conditioned on the last
    frame so far."""
    b, n, _ = actions.shape
    if n % chunk:
        raise ValueError(f"{n} actions are not a whole number of chunks of {chunk}")
    frames = [first.float().cpu()[:, :, None]]
    current = first
    for k in range(n // chunk):
        nxt = predict(current, actions[:, k * chunk:(k + 1) * chunk], k, actions[:, : (k + 1) * chunk], ids)
        nxt = nxt.float().cpu()
        if tuple(nxt.shape) != (b, first.shape[1], chunk, *first.shape[2:]):
            raise RuntimeError(f"the predictor returned {tuple(nxt.shape)}; expected {(b, first.shape[1], chunk, *first.shape[2:])}")
        frames.append(nxt)
        current = nxt[:, :, -1]
        if on_chunk is not None:
            on_chunk()
    return torch.cat(frames, dim=2)


class SimulatorPredictor:
    """The procedural action world's simulator as a predictor (the ground truth for any actions):
    ``render_action_episode`` of each episode's ``(seed, index)`` under the action prefix."""

    def __init__(self, episodes: Sequence[Episode], height: int, width: int, resize_mode: str = "crop"):
        self.episodes = {ep.index: ep for ep in episodes}
        self.size = (height, width, resize_mode)

    @staticmethod
    def supports(episode: Episode) -> bool:
        m = episode.meta
        return m.get("variant") == "action" and all(k in m for k in ("seed", "index", "height", "width"))

    def __call__(self, current, actions, step, prefix, ids):
        from data_prep.sample_world import WorldSpec, render_action_episode
        from nemo_ext.data.video import resize_and_crop

        out = []
        chunk = actions.shape[1]
        for row, i in enumerate(ids):
            m = self.episodes[i].meta
            spec = WorldSpec(num_frames=prefix.shape[1] + 1, height=int(m["height"]), width=int(m["width"]),
                             fps=float(m.get("fps") or 8))
            frames, _, _ = render_action_episode(spec, int(m["seed"]), int(m["index"]), actions=prefix[row].numpy())
            h, w, mode = self.size
            out.append(_to_video(resize_and_crop(frames[-chunk:], h, w, mode)))
        return torch.stack(out)


def _text_context(run, captions: Sequence[str]):
    """The T5 context of the episodes' captions when the task uses instructions, else (None, None)."""
    if not run.text_conditioned or run.module.text_encoder is None:
        return None, None
    return run.module.text_encoder.encode(list(captions), run.device)


def _sample_seed(seed: int, episode: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, episode, step]).generate_state(1)[0])


class DiffusionPredictor:
    """The run's Video2World DiT: the given frame's latent frame kept, the rest sampled with the
    EDM sampler (noise per episode and chunk from ``seed``)."""

    def __init__(self, run, captions: dict, *, steps: int = 35, solver: str = "heun", seed: int = 0,
                 fps: Optional[float] = None, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.run, self.captions, self.steps, self.solver, self.seed, self.fps = run, captions, steps, solver, seed, fps
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.model_calls = 0

    @torch.no_grad()
    def __call__(self, current, actions, step, prefix, ids):
        from nemo_ext.diffusion.sampler import edm_sample, karras_sigmas
        from nemo_ext.eval.generation import dit_denoiser

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
            gen.manual_seed(_sample_seed(self.seed, i, step))
            noise.append(torch.randn(c, t, h, w, generator=gen, device=device))
            cond_noise.append(torch.randn(c, t, h, w, generator=gen, device=device))
        noise, cond_noise = torch.stack(noise), torch.stack(cond_noise)
        context, mask = _text_context(run, [self.captions.get(i, "") for i in ids])
        batch = {"actions": actions.to(device), "context": context, "context_mask": mask}
        calls = [0]
        denoise = dit_denoiser(run, batch, self.fps, cond_latents, cond_noise, calls)
        edm = module.edm
        sigmas = karras_sigmas(self.steps, max(self.sigma_min, edm.cfg.sigma_min), min(self.sigma_max, edm.cfg.sigma_max),
                               device=device)
        keep = torch.zeros(1, 1, t, 1, 1, device=device)
        keep[:, :, :1] = 1.0
        latents = edm_sample(denoise, noise, sigmas, self.solver, keep=(keep, cond_latents))
        self.model_calls += calls[0]
        return module.tokenizer.decode(latents)[:, :, 1:].float()


class ARPredictor:
    """The run's AR model: ``[<bov>] + the given frame's token frame`` continued by one token frame
    with the chunk's action tokens as the cross-attention context (greedy by default)."""

    def __init__(self, run, captions: dict, *, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0):
        self.run, self.captions = run, captions
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.new_tokens = 0

    @torch.no_grad()
    def __call__(self, current, actions, step, prefix, ids):
        from nemo_ext.models.ar.generate import generate

        run = self.run
        module, m, device = run.module, run.cfg.model, run.device
        t, h, w = tuple(run.plan.latent_shape)
        b = current.shape[0]
        given = module.tokenizer.encode(current[:, :, None].to(device))[:, :1]
        prompt = given.reshape(b, -1)
        if m.bov_token:
            prompt = torch.cat([torch.full((b, 1), m.bov_id, dtype=torch.long, device=device), prompt], dim=1)
        context, mask = _text_context(run, [self.captions.get(i, "") for i in ids])
        cond = module.world_model.conditioner({"actions": actions.to(device), "context": context, "context_mask": mask})
        gen = torch.Generator(device=device).manual_seed(_sample_seed(self.seed, ids[0], step))
        new = (t - 1) * h * w
        out = generate(module.world_model.net, prompt, (t, h, w), new, context=cond.context,
                       context_mask=cond.context_mask, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, generator=gen)
        self.new_tokens += new * b
        tokens = (out[:, 1:] if m.bov_token else out).reshape(b, t, h, w)
        return module.tokenizer.decode(tokens)[:, :, 1:].float()


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


def _roundtrip_chunks(roundtrip: Callable, video: torch.Tensor, chunk: int) -> torch.Tensor:
    """``video`` [B, 3, 1 + K * chunk, H, W] with every chunk replaced by its tokenizer round trip
    from the last frame before it (as the rollout conditions on it); frame 0 kept."""
    parts = [video[:, :, :1]]
    for j in range((video.shape[2] - 1) // chunk):
        parts.append(roundtrip(video[:, :, j * chunk: (j + 1) * chunk + 1]))
    return torch.cat(parts, dim=2)


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """Per-episode results: metrics [E, S] per frame (S = K * chunk), code metrics [E, K] per chunk."""

    ids: list
    chunk: int
    chunks: int
    metrics: dict  # name -> np.ndarray
    videos: dict  # episode id -> {"gt", "pred", "shuffled"} uint8 [T, H, W, 3]
    seconds: dict


def evaluate_rollouts(predict: Predictor, episodes: Sequence[Episode], chunk: int, *, chunks: Optional[int] = None,
                      shuffle: str = "time", shuffle_seed: int = 0, batch_size: int = 4,
                      code_fn: Optional[tuple[str, Callable]] = None, simulator: Optional[Predictor] = None,
                      roundtrip: Optional[Callable] = None, videos: int = 0, progress: bool = False) -> Rollouts:
    """Roll ``predict`` out over ``episodes`` with their true and their shuffled actions; metrics vs
    the episodes' frames; with ``simulator``, the ground-truth control under the shuffled actions;
    with ``roundtrip`` (:func:`tokenizer_roundtrip`), the tokenizer's ceiling: the episodes' frames
    (and the simulator's shuffled-action replay) through the tokenizer, chunk by chunk."""
    from tqdm import tqdm

    from nemo_ext.eval.generation import to_frames

    if not episodes:
        raise EvalError("no episodes to evaluate")
    most = min((ep.num_frames - 1) // chunk for ep in episodes)
    if most < 1:
        short = min(episodes, key=lambda ep: ep.num_frames)
        raise EvalError(f"episode {short.key} has {short.num_frames} frames: a rollout needs at least 1 + {chunk} "
                        f"(task.chunk) frames")
    k = most if chunks is None else chunks
    if not 1 <= k <= most:
        raise EvalError(f"--steps {chunks}: the evaluated episodes allow 1 to {most} chunks of {chunk} actions")
    n = k * chunk
    ids = [ep.index for ep in episodes]
    true = torch.stack([ep.actions[:n] for ep in episodes])
    shuffled = shuffle_actions(true, shuffle, shuffle_seed, ids)
    code_name = code_fn[0] if code_fn else None
    parts: dict[str, list] = {}
    vids: dict = {}
    secs = {"rollout_true": 0.0, "rollout_shuffled": 0.0, "ground_truth_control": 0.0, "metrics": 0.0}
    rollouts_per_batch = 2 + 2 * (simulator is not None)
    bar = tqdm(total=math.ceil(len(episodes) / batch_size) * k * rollouts_per_batch, disable=not progress,
               desc="rollout", unit="chunk")
    try:
        for s in range(0, len(episodes), batch_size):
            eps = episodes[s:s + batch_size]
            bid = ids[s:s + batch_size]
            gt = torch.stack([ep.frames[:, : n + 1] for ep in eps])
            outs = {}
            for name, acts, key in (("pred", true, "rollout_true"), ("shuffled", shuffled, "rollout_shuffled")):
                t0 = time.perf_counter()
                outs[name] = rollout(predict, gt[:, :, 0], acts[s:s + batch_size], chunk, bid, bar.update)
                secs[key] += time.perf_counter() - t0
            if simulator is not None:
                t0 = time.perf_counter()
                outs["control"] = rollout(simulator, gt[:, :, 0], shuffled[s:s + batch_size], chunk, bid, bar.update)
                outs["control_true"] = rollout(simulator, gt[:, :, 0], true[s:s + batch_size], chunk, bid, bar.update)
                secs["ground_truth_control"] += time.perf_counter() - t0
            if roundtrip is not None:
                t0 = time.perf_counter()
                outs["ceiling"] = _roundtrip_chunks(roundtrip, gt, chunk)
                if simulator is not None:
                    outs["ceiling_shuffled"] = _roundtrip_chunks(roundtrip, outs["control"], chunk)
                secs["tokenizer_ceiling"] = secs.get("tokenizer_ceiling", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, video in outs.items():
                p, q = frame_metrics(video[:, :, 1:], gt[:, :, 1:])
                parts.setdefault(f"psnr_{name}", []).append(p)
                parts.setdefault(f"ssim_{name}", []).append(q)
                if code_fn is not None and name in ("pred", "shuffled"):
                    per_chunk = [code_fn[1](video[:, :, j * chunk: (j + 1) * chunk + 1],
                                            gt[:, :, j * chunk: (j + 1) * chunk + 1]) for j in range(k)]
                    parts.setdefault(f"{code_name}_{name}", []).append(np.stack(per_chunk, axis=1))
            secs["metrics"] += time.perf_counter() - t0
            for row, i in enumerate(bid):
                if len(vids) < videos:
                    vids[i] = {name: to_frames(outs[name][row] if name != "gt" else gt[row])
                               for name in ("gt", "pred", "shuffled")}
    finally:
        bar.close()
    metrics = {name: np.concatenate(chunks_, axis=0) for name, chunks_ in parts.items()}
    return Rollouts(ids=ids, chunk=chunk, chunks=k, metrics=metrics, videos=vids, seconds=secs)


@torch.no_grad()
def teacher_forced_losses(run, episodes: Sequence[Episode], chunk: int, shuffled: torch.Tensor, *,
                          chunks: int, seed: int = 0) -> dict:
    """The training loss on ground-truth clips (no rollout): each of the first ``chunks`` chunks of
    every episode as a clip (its first frame + ``chunk`` frames) with the true and with the
    ``shuffled`` actions [E, N, D], through the run's own ``prepare_microbatch`` (validation mode)
    and ``forward_step``: diffusion the EDM denoising loss, AR the next-token cross-entropy. Both
    passes draw the same noise (the sample seed of episode and chunk), so a model that ignores the
    actions scores exactly the same; one that uses them has the lower loss with the true actions,
    even while its samples are still poor. ``loss_gap`` = shuffled - true (mean over episodes, with
    a bootstrap interval)."""
    module = run.module
    per_episode = {"true": np.zeros(len(episodes)), "shuffled": np.zeros(len(episodes))}
    for e, ep in enumerate(episodes):
        for k in range(chunks):
            for name, acts in (("true", ep.actions), ("shuffled", shuffled[e])):
                raw = {"video": ep.frames[None, :, k * chunk: (k + 1) * chunk + 1],
                       "actions": acts[None, k * chunk: (k + 1) * chunk].float(), "caption": [ep.caption],
                       "sample_seed": torch.tensor([_sample_seed(seed, ep.index, k)])}
                if ep.fps:
                    raw["fps"] = torch.tensor([float(ep.fps)])
                mb = module.prepare_microbatch(raw, 0, validation=True)
                out, loss_fn = module.forward_step(iter([mb]), module.world_model)
                per_episode[name][e] += float(loss_fn(out)[0]) / chunks
    gaps = per_episode["shuffled"] - per_episode["true"]
    ci = bootstrap_ci(gaps.tolist(), seed=seed)
    return {"loss_true": float(per_episode["true"].mean()), "loss_shuffled": float(per_episode["shuffled"].mean()),
            "loss_gap": float(gaps.mean()), "loss_gap_ci95": list(ci) if ci else None,
            "clips": len(episodes) * chunks, "per_episode_gap": gaps.tolist()}


def _mean(x: np.ndarray, cap: bool = False) -> list:
    x = np.asarray(x, dtype=np.float64)
    if cap:
        x = np.minimum(x, PSNR_CAP)
    return x.mean(axis=0).tolist()


def _reference_means(m: dict, true: str, shuffled: Optional[str], threshold_db: float, seed: int) -> dict:
    """Mean PSNR (capped) / SSIM of a reference rollout ``true`` (e.g. the simulator) and, when
    given, of its shuffled-action twin with the gap between them."""
    out = {"psnr_true_actions": float(np.minimum(m[f"psnr_{true}"], PSNR_CAP).mean()),
           "ssim_true_actions": float(m[f"ssim_{true}"].mean())}
    if shuffled is not None:
        gap = action_sensitivity(m[f"psnr_{true}"], m[f"psnr_{shuffled}"], m[f"ssim_{true}"], m[f"ssim_{shuffled}"],
                                 threshold_db, seed)
        out.update(psnr_shuffled_actions=float(np.minimum(m[f"psnr_{shuffled}"], PSNR_CAP).mean()),
                   ssim_shuffled_actions=float(m[f"ssim_{shuffled}"].mean()), psnr_gap_db=gap["psnr_gap_db"],
                   psnr_gap_ci95=gap["psnr_gap_ci95"], ssim_gap=gap["ssim_gap"])
    return out


def summarize(r: Rollouts, episodes: Sequence[Episode], threshold_db: float = DEFAULT_THRESHOLD_DB,
              seed: int = 0) -> dict:
    """The metric part of the report: per-step means, overall means, per-episode means,
    action sensitivity and the ground-truth control."""
    m = r.metrics
    code = next((n[: -len("_pred")] for n in m if n.endswith("_pred") and not n.startswith(("psnr", "ssim"))), None)
    per_step = {"frame": list(range(1, r.chunks * r.chunk + 1))}
    for name in ("psnr", "ssim"):
        for which, label in (("pred", ""), ("shuffled", "_shuffled"), ("control", "_ground_truth_shuffled")):
            if f"{name}_{which}" in m:
                per_step[f"{name}{label}"] = _mean(m[f"{name}_{which}"], cap=name == "psnr")
    per_chunk = {"chunk": list(range(1, r.chunks + 1)), "last_frame": [(j + 1) * r.chunk for j in range(r.chunks)]}
    if code:
        per_chunk[code] = _mean(m[f"{code}_pred"])
        per_chunk[f"{code}_shuffled"] = _mean(m[f"{code}_shuffled"])
    means = {}
    for key, values in per_step.items():
        if key != "frame":
            means[key] = float(np.mean(values))
    for key, values in per_chunk.items():
        if key not in ("chunk", "last_frame"):
            means[key] = float(np.mean(values))
    sens = action_sensitivity(m["psnr_pred"], m["psnr_shuffled"], m["ssim_pred"], m["ssim_shuffled"],
                              threshold_db, seed)
    if code:
        sign = 1.0 if code == "token_accuracy" else -1.0  # higher accuracy / lower latent error is better
        gap = sign * (np.asarray(m[f"{code}_pred"]) - np.asarray(m[f"{code}_shuffled"])).mean(axis=1)
        sens[f"{code}_gap"] = float(gap.mean())
        sens[f"{code}_gap_note"] = ("true minus shuffled" if sign > 0 else "shuffled minus true") + ": positive = the true actions do better"
    control = None
    if "psnr_control" in m:
        control = {
            "what": "the simulator (data_prep.sample_world.render_action_episode) replaying each episode under the "
                    "shuffled actions (and, as a reference, the true ones) vs the episode's decoded frames: how "
                    "different the shuffled future really is, i.e. the gap a perfect model would show",
            **_reference_means(m, "control_true", "control", threshold_db, seed),
        }
    ceiling = None
    if "psnr_ceiling" in m:
        ceiling = {
            "what": "the episodes' frames through the run's tokenizer (encode -> decode, chunk by chunk from the "
                    "frame before it): the best rollout any model with this tokenizer can score; with the "
                    "simulator, its shuffled-action replay through the tokenizer: the gap such a model would show",
            **_reference_means(m, "ceiling", "ceiling_shuffled" if "psnr_ceiling_shuffled" in m else None,
                               threshold_db, seed),
        }
    per_episode = []
    for row, ep in enumerate(episodes):
        item = {"key": ep.key, "index": ep.index, "num_frames": ep.num_frames,
                "psnr": float(np.minimum(m["psnr_pred"][row], PSNR_CAP).mean()),
                "psnr_shuffled": float(np.minimum(m["psnr_shuffled"][row], PSNR_CAP).mean()),
                "ssim": float(m["ssim_pred"][row].mean()), "ssim_shuffled": float(m["ssim_shuffled"][row].mean())}
        if code:
            item[code] = float(m[f"{code}_pred"][row].mean())
            item[f"{code}_shuffled"] = float(m[f"{code}_shuffled"][row].mean())
        if control:
            item["psnr_ground_truth_shuffled"] = float(np.minimum(m["psnr_control"][row], PSNR_CAP).mean())
        per_episode.append(item)
    return {"per_step": per_step, "per_chunk": per_chunk, "means": means, "action_sensitivity": sens,
            "ground_truth_control": control, "tokenizer_ceiling": ceiling, "episodes": per_episode}


# ------------------------------------------------------------------------------------------------
# Outputs: plot, videos, report
# ------------------------------------------------------------------------------------------------

_COLORS = {"psnr": (31, 119, 180), "psnr_shuffled": (214, 39, 40), "psnr_ground_truth_shuffled": (120, 120, 120),
           "ssim": (31, 119, 180), "ssim_shuffled": (214, 39, 40), "ssim_ground_truth_shuffled": (120, 120, 120)}
_LABELS = {"": "prediction (true actions)", "_shuffled": "prediction (shuffled actions)",
           "_ground_truth_shuffled": "ground truth under shuffled actions"}


def plot_metrics(path, per_step: dict, chunk: int, title: str = "") -> Path:
    """metrics.png: PSNR and SSIM vs rollout step (frame), one line per rollout, chunk boundaries
    dotted. Drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panel_w, panel_h, pad_l, pad_r, pad_t, pad_b = 640, 300, 60, 20, 36, 40
    img = Image.new("RGB", (panel_w, 2 * panel_h + 60), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    x = per_step["frame"]
    for p, (metric, unit) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        top = 30 + p * panel_h
        series = {k: v for k, v in per_step.items() if k == metric or k.startswith(metric + "_")}
        values = [v for s in series.values() for v in s if math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        margin = 0.05 * (hi - lo)
        lo, hi = lo - margin, hi + margin
        x0, x1, y0, y1 = pad_l, panel_w - pad_r, top + pad_t, top + panel_h - pad_b
        xmin, xmax = min(x), max(max(x), min(x) + 1)

        def px(v, xmin=xmin, xmax=xmax, x0=x0, x1=x1):
            return x0 + (v - xmin) / (xmax - xmin) * (x1 - x0)

        def py(v, lo=lo, hi=hi, y0=y0, y1=y1):
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 14), unit + " vs rollout step (frame)", fill="black", font=font)
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            draw.line([x0 - 4, py(v), x0, py(v)], fill="black")
            draw.text((4, py(v) - 6), f"{v:.3g}", fill="black", font=font)
        for f in x:
            if f % chunk == 0:
                draw.line([px(f), y0, px(f), y1], fill=(200, 200, 200))
                draw.text((px(f) - 6, y1 + 4), str(f), fill="black", font=font)
        for j, (name, vals) in enumerate(series.items()):
            color = _COLORS.get(name, (0, 0, 0))
            pts = [(px(a), py(min(max(b, lo), hi))) for a, b in zip(x, vals) if math.isfinite(b)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for q in pts:
                draw.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=color)
            label = _LABELS.get(name[len(metric):], name)
            draw.line([x1 - 250, y0 + 10 + 14 * j, x1 - 230, y0 + 10 + 14 * j], fill=color, width=2)
            draw.text((x1 - 225, y0 + 4 + 14 * j), label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_videos(out_dir: Path, videos: dict, episodes: Sequence[Episode], fps: float, codec: str = "h264") -> list[str]:
    """``rollout_<episode>.mp4``: ground truth | prediction | prediction with shuffled actions."""
    from nemo_ext.eval.generation import write_mp4

    keys = {ep.index: ep.key for ep in episodes}
    written = []
    for i, v in videos.items():
        panels = [v[name] for name in ("gt", "pred", "shuffled") if name in v]
        frames = np.concatenate(panels, axis=2)
        path = write_mp4(out_dir / f"rollout_{keys.get(i, i)}.mp4", frames, fps, codec=codec)
        written.append(path.name)
    return written


# ------------------------------------------------------------------------------------------------
# The command line (python -m nemo_ext.cli.eval dispatches here for action_control runs)
# ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("action_control")
    g.add_argument("--episodes", type=int, default=8, help="episodes to evaluate (default 8; 0 = all)")
    g.add_argument("--start", type=int, default=0, help="index of the first episode")
    g.add_argument("--split", default="val", choices=["val", "train"],
                   help="val: held-out data (<data.sample_dir>_val or data.val_path); train: the training data")
    g.add_argument("--steps", type=int, default=None,
                   help="rollout length in chunks of task.chunk actions (default: as many as the episodes allow)")
    g.add_argument("--shuffle", default="time", choices=list(SHUFFLE_MODES),
                   help="action sensitivity: permute each episode's actions across time, or swap episodes' actions")
    g.add_argument("--shuffle-seed", type=int, default=0)
    g.add_argument("--threshold-db", type=float, default=DEFAULT_THRESHOLD_DB,
                   help=f"verdict 'learned' needs a PSNR gap above this (default {DEFAULT_THRESHOLD_DB} dB)")
    g.add_argument("--batch-size", type=int, default=4, help="episodes rolled out together")
    g.add_argument("--videos", type=int, default=2, help="rollout mp4s to write (the first N episodes)")
    g.add_argument("--no-control", action="store_true", help="skip the simulator's ground-truth control")
    g.add_argument("--no-ceiling", action="store_true",
                   help="skip the tokenizer ceiling (the ground truth through the tokenizer)")
    d = p.add_argument_group("diffusion")
    d.add_argument("--sampler-steps", type=int, default=35, help="EDM sampler steps per chunk")
    d.add_argument("--solver", default="heun", choices=["heun", "euler"])
    a = p.add_argument_group("autoregressive")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-k", type=int, default=None)
    a.add_argument("--top-p", type=float, default=None)


def _check_run(run) -> None:
    cfg = run.cfg
    if cfg.task.name != TASK:
        raise EvalError(f"{run.ckpt} is a {cfg.task.name!r} run, not an action_control one")
    m = cfg.model
    given = m.condition_frames if run.family == "ar" else (m.condition_latent_frames if m.video2world else 0)
    if given != 1:
        what = "model.condition_frames" if run.family == "ar" else "model.condition_latent_frames (model.video2world)"
        raise EvalError(f"the rollout conditions each chunk on one frame: {what} must be 1, the run has {given}")
    if cfg.data.num_frames != cfg.task.chunk + 1:
        raise EvalError(f"data.num_frames={cfg.data.num_frames} but task.chunk={cfg.task.chunk}: a clip is 1 + chunk frames")


def run_eval(args) -> int:
    """``python -m nemo_ext.cli.eval`` for an action_control run (called inside the CLI's error handling)."""
    from nemo_ext.eval import generation as g

    start = time.perf_counter()
    with g.generation_world(args.device, seed=args.seed):
        t0 = time.perf_counter()
        run = g.load_run(args.ckpt, weights=args.weights, device=args.device, overrides=args.overrides,
                         recipe=args.recipe, family=args.family, model=args.model, weights_from=args.weights_from)
        load_s = time.perf_counter() - t0
        _check_run(run)
        cfg = run.cfg
        t0 = time.perf_counter()
        episodes, source = episodes_of_run(cfg, args.split, num=args.episodes or None, start=args.start)
        read_s = time.perf_counter() - t0
        captions = {ep.index: ep.caption for ep in episodes}
        fps = cfg.data.fps or episodes[0].fps or g.data_fps(cfg)
        if run.family == "diffusion":
            predictor = DiffusionPredictor(run, captions, steps=args.sampler_steps, solver=args.solver, seed=args.seed,
                                           fps=fps)
            sampling = {"sampler_steps": args.sampler_steps, "solver": args.solver, "guidance": 1.0}
        else:
            predictor = ARPredictor(run, captions, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed)
            sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        simulator = None
        if not args.no_control and all(SimulatorPredictor.supports(ep) for ep in episodes):
            simulator = SimulatorPredictor(episodes, cfg.data.height, cfg.data.width, cfg.data.resize_mode)
        result = evaluate_rollouts(predictor, episodes, cfg.task.chunk, chunks=args.steps, shuffle=args.shuffle,
                                   shuffle_seed=args.shuffle_seed, batch_size=args.batch_size, code_fn=code_metric(run),
                                   simulator=simulator, roundtrip=None if args.no_ceiling else tokenizer_roundtrip(run),
                                   videos=args.videos, progress=not args.no_progress)
        t0 = time.perf_counter()
        n = result.chunks * result.chunk
        ids = [ep.index for ep in episodes]
        shuffled = shuffle_actions(torch.stack([ep.actions[:n] for ep in episodes]), args.shuffle, args.shuffle_seed, ids)
        teacher = teacher_forced_losses(run, episodes, result.chunk, shuffled, chunks=result.chunks, seed=args.seed)
        teacher_s = time.perf_counter() - t0
    summary = summarize(result, episodes, args.threshold_db, seed=args.shuffle_seed)
    summary["action_sensitivity"]["teacher_forced"] = teacher

    if args.out:
        out_dir = Path(args.out)
    else:
        base = run.run_dir / "eval" if run.run_dir is not None else Path("eval")
        step = f"step{run.step}" if run.step is not None else run.ckpt.name
        out_dir = base / (args.name or f"{step}_{args.split}_{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    title = (f"{cfg.model.name} step {run.step} ({run.weights}), {len(episodes)} {args.split} episode(s), "
             f"{result.chunks} x {result.chunk} steps; sensitivity: {summary['action_sensitivity']['verdict']}")
    plot = plot_metrics(out_dir / "metrics.png", summary["per_step"], result.chunk, title)
    videos = write_videos(out_dir, result.videos, episodes, fps or 8.0)
    write_s = time.perf_counter() - t0
    stats = {}
    if isinstance(predictor, DiffusionPredictor):
        stats["model_calls"] = predictor.model_calls
    else:
        stats["generated_tokens"] = predictor.new_tokens
    report = {
        "task": TASK,
        "family": run.family,
        "model": cfg.model.name,
        "checkpoint": str(run.ckpt),
        "weights_from": args.weights_from,  # another checkpoint's weights in the run's model (e.g. the base)
        "run_dir": str(run.run_dir) if run.run_dir else None,
        "step": run.step,
        "weights": run.weights,
        "tokenizer": _tokenizer_note(cfg),
        "config": {
            "split": args.split, "data": source, "episodes": len(episodes), "start": args.start,
            "chunk": result.chunk, "chunks": result.chunks, "rollout_frames": result.chunks * result.chunk,
            "shuffle": args.shuffle, "shuffle_seed": args.shuffle_seed, "seed": args.seed,
            "threshold_db": args.threshold_db, "psnr_cap_db": PSNR_CAP, "batch_size": args.batch_size,
            "height": cfg.data.height, "width": cfg.data.width, "fps": fps, "overrides": list(args.overrides),
            **sampling,
        },
        **summary,
        "timings": {"load_s": load_s, "read_episodes_s": read_s, "teacher_forced_s": teacher_s, **{f"{k}_s": v for k, v in result.seconds.items()},
                    "write_s": write_s, "total_s": time.perf_counter() - start, "device": str(run.device), **stats},
        "outputs": {"metrics_png": plot.name, "videos": videos,
                    "video_panels": ["ground truth", "prediction", "prediction with shuffled actions"]},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    _print_summary(report, out_dir)
    return 0


def _tokenizer_note(cfg) -> str:
    tok = cfg.model.tokenizer
    if cfg.family == "diffusion":
        if getattr(tok, "kind", "vae") == "space_to_depth":
            return "space_to_depth (exactly invertible): pixel metrics are meaningful"
        if not tok.path:
            return "tiny random-weight VAE: pixel metrics are plumbing only (use model=dit_tiny_v2w_s2d or a real tokenizer)"
        return f"vae at {tok.path}"
    if tok.path:
        return f"Cosmos discrete tokenizer at {tok.path}"
    if tok.builtin_weights:
        return f"built-in FSQ tokenizer, trained weights {tok.builtin_weights}"
    return ("built-in FSQ tokenizer with seed-0 (untrained) weights: pixel metrics are plumbing only (train one: "
            "python -m nemo_ext.cli.prep train-tokenizer)")


def _print_summary(report: dict, out_dir: Path) -> None:
    means, sens = report["means"], report["action_sensitivity"]
    c = report["config"]
    print(f"{report['family']} {report['model']} ({report['weights']} weights of {report['checkpoint']}); "
          f"tokenizer: {report['tokenizer']}")
    print(f"rollout: {c['episodes']} {c['split']} episode(s), {c['chunks']} chunk(s) of {c['chunk']} actions "
          f"({c['rollout_frames']} frames), shuffle={c['shuffle']} (seed {c['shuffle_seed']})")
    code = "latent_l2" if "latent_l2" in means else "token_accuracy"
    print(f"true actions:     PSNR {means['psnr']:.3f} dB, SSIM {means['ssim']:.4f}, {code} {means[code]:.4f}")
    print(f"shuffled actions: PSNR {means['psnr_shuffled']:.3f} dB, SSIM {means['ssim_shuffled']:.4f}, "
          f"{code} {means[code + '_shuffled']:.4f}")
    ci = sens["psnr_gap_ci95"]
    print(f"action sensitivity: PSNR gap {sens['psnr_gap_db']:.3f} dB"
          + (f" (95% CI [{ci[0]:.3f}, {ci[1]:.3f}])" if ci else "")
          + f", SSIM gap {sens['ssim_gap']:.4f} -> {sens['verdict']}")
    tf = sens["teacher_forced"]
    ci = tf["loss_gap_ci95"]
    print(f"teacher-forced (training loss on ground-truth clips): {tf['loss_true']:.4f} with the true actions, "
          f"{tf['loss_shuffled']:.4f} shuffled: gap {tf['loss_gap']:+.4f}" + (f" (95% CI [{ci[0]:.4f}, {ci[1]:.4f}])" if ci else ""))
    ctrl = report.get("ground_truth_control")
    if ctrl:
        print(f"ground-truth control (simulator): PSNR {ctrl['psnr_true_actions']:.3f} dB with the true actions, "
              f"{ctrl['psnr_shuffled_actions']:.3f} dB with the shuffled ones (a perfect model's gap: "
              f"{ctrl['psnr_gap_db']:.3f} dB)")
    ceil = report.get("tokenizer_ceiling")
    if ceil:
        print(f"tokenizer ceiling (ground truth through the tokenizer): PSNR {ceil['psnr_true_actions']:.3f} dB"
              + (f", simulator's shuffled replay {ceil['psnr_shuffled_actions']:.3f} dB (gap {ceil['psnr_gap_db']:.3f} dB)"
                 if "psnr_gap_db" in ceil else ""))
    t = report["timings"]
    print(f"timing: load {t['load_s']:.2f} s, rollouts {t['rollout_true_s'] + t['rollout_shuffled_s']:.2f} s, "
          f"total {t['total_s']:.2f} s (device {t['device']})")
    print(f"wrote {out_dir.resolve()}/report.json, metrics.png"
          + (", " + ", ".join(report["outputs"]["videos"]) if report["outputs"]["videos"] else ""))
