"""Generation from a trained run, both model families (``python -m nemo_ext.cli.sample``).

One path for both families:

1. **The run.** ``load_run`` reads the run's resolved ``config.yaml`` (a run dir, a checkpoint dir,
   or ``.../last``; ``last`` alone is the newest run of a recipe/family/model), builds the family's
   Lightning module with the training code (``build_world_model`` in a one-process megatron world,
   TP1/PP1, the run's precision) and loads the checkpoint's weights the way ``trainer.init_from``
   does, then the EMA weights over them when the checkpoint has them (``weights="auto"``).
2. **The conditioning clip.** ``clip_from_video`` (the first frames of an mp4) or ``clip_from_data``
   (clip ``N`` of the run's held-out or training data, through the training dataset code, with the
   task's sidecars): a ``num_frames`` clip at the run's size, in [-1, 1]. The family keeps the first
   ``model.condition_frames`` token frames (AR) or ``model.condition_latent_frames`` latent frames
   (Video2World DiT) of its encoding; the tokenizers are causal, so a video shorter than the clip
   only needs those frames (the rest is padded with its last frame and never used).
3. **Generation.** ``generate_diffusion``: the EDM sampler of ``nemo_ext.diffusion.sampler`` over the
   DiT, whose denoiser is the training forward pass (preconditioning, the task conditioner,
   Video2World's ``DiffusionModule._video2world_input``), with classifier-free guidance against
   the empty prompt. ``generate_ar``: ``nemo_ext.models.ar.generate.generate`` (KV cache) continues
   ``[<bov>] + conditioning tokens`` to the full token grid. Both decode with the run's tokenizer.
4. **Output.** ``write_mp4``: H.264 (or VP9) through PyAV, optionally the ground truth beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from nemo_ext.config.compose import ConfigError

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "raw")
SPLITS = ("auto", "val", "train")


# ------------------------------------------------------------------------------------------------
# The run: config, world, model, weights
# ------------------------------------------------------------------------------------------------


def load_run_config(path, overrides: Sequence[str] = ()):
    """A run's resolved ``config.yaml`` as the typed RecipeConfig (the model and task schemas of its
    family and task), with dotted ``key=value`` overrides; raises ConfigError naming a bad key."""
    from omegaconf import OmegaConf

    from nemo_ext.config.compose import _hydra_message
    from nemo_ext.config.schema import MODEL_SCHEMAS, RecipeConfig
    from nemo_ext.tasks import get_task

    try:
        raw = OmegaConf.load(path)
        family = raw.get("family", "diffusion")
        if family not in MODEL_SCHEMAS:
            raise ConfigError(f"{path}: family={family!r} has no model schema")
        model = OmegaConf.merge(OmegaConf.structured(MODEL_SCHEMAS[family][1]), raw.model)
        task = OmegaConf.merge(OmegaConf.structured(get_task(raw.task.name).config_cls), raw.task)
        rest = {k: raw[k] for k in raw if k not in ("model", "task")}
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), rest)
        cfg.model, cfg.task = model, task
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf errors name the key
        raise ConfigError(f"{path}: {_hydra_message(exc)}") from exc


def resolve_last(recipe: str, family: str, model: Optional[str] = None) -> Path:
    """``CKPT=last``: the newest complete ``checkpoints/last`` among the runs of ``recipe`` /
    ``family`` / ``model`` (the recipe's default model when None): ``runs/<recipe>/<family>_<model>/``."""
    from nemo_ext.config.compose import compose, to_typed
    from nemo_ext.config.plan import run_dir_for

    cfg = to_typed(compose(recipe, family, [f"model={model}"] if model else []))
    base = run_dir_for(cfg).parent
    found = [p for p in base.glob("**/checkpoints/last") if (p / "metadata.json").is_file()] if base.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"CKPT=last: no run with a checkpoint under {base} (recipe={recipe}, family={family}, "
            f"model={cfg.model.name}); train one first or pass a run / checkpoint directory")
    return max(found, key=lambda p: (p.resolve() / "metadata.json").stat().st_mtime)


def find_run_dir(ckpt: Path) -> Optional[Path]:
    """The run directory of a checkpoint ``<run>/checkpoints/step_<N>`` (None for a loose one)."""
    if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").is_file():
        return ckpt.parent.parent
    return None


@contextlib.contextmanager
def generation_world(device: str = "auto", seed: int = 0):
    """A one-process megatron world, TP1/PP1 (the one already set up in this process if any)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_ext.config.schema import ParallelConfig
    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--device gpu but no CUDA GPU is visible")
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"generation runs one model replica (TP1/PP1/CP1); this process has TP/PP/CP {sizes}")
        yield
        return
    created = not dist.is_initialized()
    if created:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError("generation runs in one process: do not start it with torchrun")
        for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(var, value)
        cuda = device == "gpu" or (device == "auto" and torch.cuda.is_available())
        init_distributed("cuda" if cuda else "cpu")
    init_model_parallel(ParallelConfig(), seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@dataclass
class LoadedRun:
    cfg: Any  # the run's RecipeConfig, adjusted for generation (TP1/PP1, video data, num_frames)
    plan: Any  # its RunPlan (latent_shape: the clip's latent shape / token grid)
    module: Any  # the family's Lightning module: world_model, tokenizer, text_encoder (, edm)
    ckpt: Path
    run_dir: Optional[Path]
    weights: str  # "ema" | "raw": what was loaded
    step: Optional[int]
    trained_from: Optional[str] = None  # the run's own trainer.init_from (the base it was post-trained from)

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def device(self) -> torch.device:
        return self.module.compute_device

    @property
    def text_conditioned(self) -> bool:
        """Whether generation feeds a T5 context: the task must read text (action_control without
        an instruction does not: its context is zeros) and the model must attend to it."""
        if not self.module.task.uses_text(self.cfg.task):
            return False
        return self.family == "diffusion" or bool(self.cfg.model.cross_attention)

    def condition_frames(self) -> int:
        """Token / latent frames given to the model (kept from the conditioning clip)."""
        m = self.cfg.model
        if self.family == "ar":
            return m.condition_frames
        return m.condition_latent_frames if m.video2world else 0

    def condition_pixel_frames(self) -> int:
        """Pixel frames the conditioning needs (the tokenizers are causal: the first K token
        frames depend on the first 1 + (K - 1) * temporal_compression frames only)."""
        k = self.condition_frames()
        return 0 if k == 0 else 1 + (k - 1) * self.cfg.model.tokenizer.temporal_compression


def load_run(ckpt: str, *, weights: str = "auto", device: str = "auto", num_frames: Optional[int] = None,
             overrides: Sequence[str] = (), recipe: Optional[str] = None, family: Optional[str] = None,
             model: Optional[str] = None, weights_from: Optional[str] = None) -> LoadedRun:
    """Build a run's model for generation and load a checkpoint's weights (call it inside
    :func:`generation_world`).

    ``ckpt``: a run dir, a checkpoint dir, ``.../last``, or ``last`` (the newest run of ``recipe``
    (default general) / ``family`` / ``model``). The config is the run's ``config.yaml``; a checkpoint
    outside a run (``convert import``) takes the recipe's config composed with ``recipe`` / ``family`` /
    ``model``.
    ``weights``: auto (EMA when the checkpoint has it) | ema | raw. ``overrides``: dotted config
    keys (e.g. ``model.tokenizer.path=...``). ``weights_from``: build ``ckpt``'s model but load
    another checkpoint's weights, e.g. the base model a run was post-trained from: the modules it
    lacks (a task's conditioner, zero-initialized so that step 0 is the base model) keep their
    init, so generation is the base model's."""
    from megatron.core import dist_checkpointing

    from nemo_ext.config.plan import make_plan
    from nemo_ext.config.schema import ParallelConfig
    from nemo_ext.training.checkpoint import resolve_checkpoint
    from nemo_ext.training.run import family_module

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {list(WEIGHTS)}")
    if ckpt == "last":
        ckpt = str(resolve_last(recipe or "general", family or "diffusion", model))
    path = resolve_checkpoint(ckpt)
    run_dir = find_run_dir(path)
    if run_dir is not None:
        cfg = load_run_config(run_dir / "config.yaml", overrides)
    elif recipe:
        from nemo_ext.config.compose import compose, to_typed

        cfg = to_typed(compose(recipe, family or "diffusion", ([f"model={model}"] if model else []) + list(overrides)))
    else:
        raise ConfigError(f"{path} is not inside a run directory (no <run>/config.yaml): pass --recipe "
                          "(and --family / --model) to say which model it holds")

    trained_from = cfg.trainer.init_from
    # Generation settings: one model replica, decoded video in, this device.
    cfg.parallel = ParallelConfig()
    cfg.data = dataclasses.replace(cfg.data, kind="video", backend="pyav", micro_batch_size=1, global_batch_size=1,
                                   num_frames=num_frames or cfg.data.num_frames)
    if weights_from is not None:
        path = resolve_checkpoint(weights_from)
    cfg.trainer = dataclasses.replace(cfg.trainer, device=device, init_from=str(path), ema_decay=None)
    plan = make_plan(cfg, world_size=1)

    meta = dist_checkpointing.load_content_metadata(str(path)) or {}
    saved_family = (meta.get("model") or {}).get("family", cfg.family)
    if saved_family != cfg.family:
        raise ConfigError(f"{path} holds a {saved_family} model, the config a {cfg.family} one")
    if weights == "ema" and not meta.get("ema"):
        raise ValueError(f"{path} has no EMA weights (train with trainer.ema_decay to keep them); use --weights raw")

    module = family_module(cfg.family)(cfg, plan)
    module.configure_model()  # build_world_model + the trainer.init_from weight loading
    chosen = "raw"
    if meta.get("ema") and weights in ("auto", "ema"):
        _load_ema(module, path)
        chosen = "ema"
    module.to(module.compute_device)
    module.world_model.eval()
    number = path.name[len("step_"):]
    step = int(number) if path.name.startswith("step_") and number.isdigit() else None
    logger.info("loaded %s weights of %s (%s, model=%s)", chosen, path, cfg.family, cfg.model.name)
    return LoadedRun(cfg=cfg, plan=plan, module=module, ckpt=path, run_dir=run_dir, weights=chosen, step=step,
                     trained_from=trained_from)


def _load_ema(module, ckpt: Path) -> None:
    """Overwrite the trained weights with the checkpoint's EMA (``ema.<key>`` sharded tensors)."""
    from megatron.core import dist_checkpointing

    from nemo_ext.training.ema import WeightEMA

    import torch.distributed.checkpoint as dcp

    ema = WeightEMA(module.world_model, 0.5)  # the decay is irrelevant: only the stored average is read
    template = ema.sharded_state_dict(module.sharded_state_dict())
    # a base checkpoint (load_run's weights_from) lacks the task's new modules: they keep their init
    available = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    template = {k: v for k, v in template.items() if any(a.startswith(v.key) for a in available)}
    loaded = dist_checkpointing.load({"ema": template}, str(ckpt))["ema"]
    module.load_megatron_state_dict(loaded, strict=False)


# ------------------------------------------------------------------------------------------------
# The conditioning clip
# ------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """A clip at the run's size: ``video`` [1, 3, F, H, W] in [-1, 1] (None: no conditioning video),
    of which the first ``real_frames`` are real (the rest repeat the last one)."""

    video: Optional[torch.Tensor]
    real_frames: int
    caption: str = ""
    fps: Optional[float] = None
    extras: dict = field(default_factory=dict)  # the task's batch entries (sidecars), batched
    name: str = "prompt"  # for output file names

    @property
    def complete(self) -> bool:
        return self.video is not None and self.real_frames == self.video.shape[2]


def clip_from_video(run: LoadedRun, path) -> Clip:
    """The first frames of an mp4 (every ``data.frame_stride``-th), resized like training data."""
    from nemo_ext.data.video import decode_frames, probe_video, resize_and_crop

    d = run.cfg.data
    data = Path(path).read_bytes()
    info = probe_video(data)
    available = (info.num_frames - 1) // d.frame_stride + 1
    need = max(1, run.condition_pixel_frames())
    if available < need:
        raise ValueError(f"{path} has {available} frames (stride {d.frame_stride}); the model's conditioning "
                         f"needs {need}")
    n = min(available, d.num_frames)
    frames = resize_and_crop(decode_frames(data, 0, n, d.frame_stride), d.height, d.width, d.resize_mode)
    if n < d.num_frames:
        frames = np.concatenate([frames, np.repeat(frames[-1:], d.num_frames - n, axis=0)])
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)[None]
    return Clip(video=video, real_frames=n, fps=(info.fps / d.frame_stride) or None, name=Path(path).stem)


def data_split_path(cfg, split: str = "auto") -> tuple[list[tuple[str, str]], str]:
    """([(name, shards)], which) of ``--from-data``: ``val`` = data.val_path or the held-out sample
    world (generated when missing), ``train`` = the training data; ``auto``: val where there is
    held-out data, else train."""
    from nemo_ext.training.data import ensure_sample_data, held_out_sample_dir, sources

    d = cfg.data
    sample_world = not (d.path or d.sources)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    if split == "auto":
        split = "val" if (d.val_path or sample_world) else "train"
    if split == "val":
        if d.val_path:
            return [("val", d.val_path)], "val"
        if not sample_world:
            raise ConfigError("--from-data val: the run has no held-out data (data.val_path); use --from-data train")
        trainer = dataclasses.replace(cfg.trainer, val_every_n_steps=max(1, cfg.trainer.val_every_n_steps))
        ensure_sample_data(dataclasses.replace(cfg, trainer=trainer))  # a no-op when both worlds exist
        return [("val", held_out_sample_dir(cfg))], "val"
    if sample_world:
        ensure_sample_data(cfg)
    return sources(cfg), "train"


def clip_from_data(run: LoadedRun, index: int = 0, split: str = "auto") -> Clip:
    """Clip ``index`` of the run's held-out / training data, from its first frame, read by the
    training dataset code (with the task's sidecars)."""
    from nemo_ext.data.dataset import collate_clips
    from nemo_ext.training.data import _dataset

    named, which = data_split_path(run.cfg, split)
    total = 0
    for name, path in named:
        dataset = _dataset(run.cfg, run.module.task, run.plan, path, clip_sampling="start")
        if index - total < len(dataset):
            item = dataset[(index - total, index - total)]
            break
        total += len(dataset)
    else:
        raise IndexError(f"--sample {index}: the {which} data has {total} samples")
    batch = collate_clips([item])
    video = batch.pop("video")
    fps = float(batch["fps"][0]) if "fps" in batch and float(batch["fps"][0]) > 0 else None
    return Clip(video=video, real_frames=video.shape[2], caption=batch["caption"][0], fps=fps,
                extras=batch, name=f"{which}{index}")


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


@dataclass
class Generated:
    video: torch.Tensor  # [1, 3, F, H, W] in [-1, 1]
    codes: torch.Tensor  # AR: tokens [1, T, H, W]; diffusion: latents [1, C, T, H, W]
    condition: Optional[torch.Tensor]  # the given token / latent frames (kept in ``codes``)
    seconds: dict  # "generate", "decode"
    stats: dict  # steps / function evaluations / tokens


def conditioning_batch(run: LoadedRun, clip: Clip, prompt: str) -> dict:
    """The model batch of a generation: the clip's task entries (sidecars) on the device and the
    prompt's T5 context where the model is text-conditioned (what the task conditioner reads)."""
    device = run.device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in clip.extras.items()}
    batch["caption"] = [prompt]
    if run.text_conditioned:
        batch["context"], batch["context_mask"] = run.module.text_encoder.encode([prompt], device)
    else:
        batch["context"] = batch["context_mask"] = None
    return batch


def data_fps(cfg) -> Optional[float]:
    """The frame rate of the run's training clips (data.fps, else the first sample's json ``fps``;
    None when unreadable): what the DiT's RoPE time scale saw in training."""
    if cfg.data.fps:
        return float(cfg.data.fps)
    try:
        import json

        from nemo_ext.data.shards import ShardIndex
        from nemo_ext.training.data import sources

        index = ShardIndex.from_paths(sources(cfg)[0][1], required_exts=("json",))
        try:
            fps = float(json.loads(index.read(0, "json")).get("fps") or 0)
        finally:
            index.close()
        return fps or None
    except Exception:  # noqa: BLE001 - data moved or not readable here: the caller falls back
        return None


def _fps(run: LoadedRun, clip: Clip) -> Optional[float]:
    """RoPE time scale: data.fps, else the conditioning clip's, else the training data's."""
    return run.cfg.data.fps or clip.fps or data_fps(run.cfg)


def _given(run: LoadedRun, clip: Clip, what: str) -> None:
    if run.condition_frames() and clip.video is None:
        raise ValueError(f"this {what} model continues {run.condition_frames()} given frame(s) "
                         f"({run.condition_pixel_frames()} video frames): pass --video <mp4> or --from-data")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dit_denoiser(run: LoadedRun, batch: dict, fps: Optional[float] = None,
                 cond_latents: Optional[torch.Tensor] = None, cond_noise: Optional[torch.Tensor] = None,
                 calls: Optional[list] = None):
    """The run's DiT as an EDM denoiser ``D(x_t, sigma) -> x0``: the training forward pass
    (``DiffusionModule.forward_step`` and its loss's x0) at noise level ``sigma`` for ``batch``
    (context and the task's entries). Video2World: ``cond_latents`` / ``cond_noise`` play the
    training sample's latents / condition noise (``DiffusionModule._video2world_input``): the
    given frames enter augmented and their x0 is the given latents. ``calls``: a one-item counter."""
    from nemo_ext.diffusion.edm import broadcast_to

    module, m = run.module, run.cfg.model
    edm, net = module.edm, module.world_model
    if m.video2world and (cond_latents is None or cond_noise is None):
        raise ValueError("a Video2World DiT needs the given latents and their condition noise")

    def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls[0] += 1
        _, _, c_in, c_noise = edm.preconditioning(sigma)
        x_in = x_t * broadcast_to(c_in, x_t)
        kwargs = {"fps": fps}
        given = None
        if m.video2world:
            x_in, given, kwargs["condition_mask"] = module._video2world_input(cond_latents, x_in, sigma, cond_noise)
        x0 = edm.denoise(x_t, sigma, net(x_in, c_noise, batch, **kwargs).float())
        if given is not None:
            x0 = given * cond_latents + (1 - given) * x0
        return x0

    return denoise


@torch.no_grad()
def sample_dit(run: LoadedRun, batch: dict, noise: torch.Tensor, *, cond_latents: Optional[torch.Tensor] = None,
               cond_noise: Optional[torch.Tensor] = None, given_frames: int = 0, steps: int = 35, solver: str = "heun",
               guidance: float = 1.0, uncond_batch: Optional[dict] = None, fps: Optional[float] = None,
               sigma_min: float = 0.002, sigma_max: float = 80.0, calls: Optional[list] = None) -> torch.Tensor:
    """EDM sampling of the run's DiT from ``noise`` [B, C, T, H, W] for the model ``batch``: the one
    sampling path of ``make sample`` and of the evaluations' rollouts. Video2World: the first
    ``given_frames`` latent frames of ``cond_latents`` are given (kept, and entering the model augmented
    with ``cond_noise`` as ``DiffusionModule._video2world_input`` trains them). ``guidance`` != 1 mixes in
    ``uncond_batch`` (classifier-free guidance). ``calls``: a one-item model-call counter."""
    from nemo_ext.diffusion.sampler import edm_sample, guided, karras_sigmas

    edm = run.module.edm
    keep = None
    if given_frames:
        mask = torch.zeros(1, 1, noise.shape[2], 1, 1, device=noise.device)
        mask[:, :, :given_frames] = 1.0
        keep = (mask, cond_latents)
    cond = dit_denoiser(run, batch, fps, cond_latents, cond_noise, calls)
    uncond = None
    if guidance != 1.0:
        uncond = dit_denoiser(run, uncond_batch, fps, cond_latents, cond_noise, calls)
    sigmas = karras_sigmas(steps, max(sigma_min, edm.cfg.sigma_min), min(sigma_max, edm.cfg.sigma_max),
                           device=noise.device)
    return edm_sample(guided(cond, uncond, guidance), noise, sigmas, solver, keep=keep)


@torch.no_grad()
def generate_diffusion(run: LoadedRun, clip: Clip, prompt: str, *, steps: int = 35, guidance: float = 1.0,
                       seed: int = 0, solver: str = "heun", sigma_min: float = 0.002,
                       sigma_max: float = 80.0) -> Generated:
    """EDM sampling of the run's DiT: the whole clip (text-to-world) or the frames after the given
    latent frames (Video2World, kept as ``DiffusionModule._video2world_input`` trains them)."""
    _given(run, clip, "Video2World")
    module, m, device = run.module, run.cfg.model, run.device
    shape = (1, *run.plan.latent_shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(shape, generator=gen, device=device)
    t0 = time.perf_counter()
    cond_latents = cond_noise = None
    if m.video2world:
        cond_latents = module.tokenizer.encode(clip.video.to(device))
        if tuple(cond_latents.shape) != shape:
            raise RuntimeError(f"conditioning latents {tuple(cond_latents.shape)} differ from the clip's {shape}")
        cond_noise = torch.randn(shape, generator=gen, device=device)
    calls = [0]
    latents = sample_dit(run, conditioning_batch(run, clip, prompt), noise, cond_latents=cond_latents,
                         cond_noise=cond_noise, given_frames=m.condition_latent_frames if m.video2world else 0,
                         steps=steps, solver=solver, guidance=guidance,
                         uncond_batch=conditioning_batch(run, clip, "") if guidance != 1.0 else None,
                         fps=_fps(run, clip), sigma_min=sigma_min, sigma_max=sigma_max, calls=calls)
    _sync(device)
    t1 = time.perf_counter()
    video = module.tokenizer.decode(latents)
    _sync(device)
    t2 = time.perf_counter()
    given = None if cond_latents is None else cond_latents[:, :, : m.condition_latent_frames]
    return Generated(video=video.float().cpu(), codes=latents.cpu(), condition=None if given is None else given.cpu(),
                     seconds={"generate": t1 - t0, "decode": t2 - t1},
                     stats={"steps": steps, "solver": solver, "guidance": guidance, "model_calls": calls[0]})


def ar_prompt(run: LoadedRun, given: torch.Tensor) -> torch.Tensor:
    """The AR prompt ids of ``given`` token frames [B, k, h, w]: ``[<bov>] + their tokens``."""
    m = run.cfg.model
    prompt_ids = given.reshape(given.shape[0], -1)
    if m.bov_token:
        bov = torch.full((given.shape[0], 1), m.bov_id, dtype=torch.long, device=given.device)
        prompt_ids = torch.cat([bov, prompt_ids], dim=1)
    return prompt_ids


@torch.no_grad()
def sample_ar(run: LoadedRun, given: torch.Tensor, batch: dict, *, temperature: float = 1.0,
              top_k: Optional[int] = None, top_p: Optional[float] = 0.8,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The run's AR model continuing ``given`` token frames [B, k, h, w] to the full token grid with the
    KV-cache generator, conditioned on the task conditioner's context of ``batch``: the one sampling
    path of ``make sample`` and of the evaluations' rollouts. Returns tokens [B, T, h, w]."""
    from nemo_ext.models.ar.generate import generate

    module, m = run.module, run.cfg.model
    t, h, w = grid = tuple(run.plan.latent_shape)
    prompt_ids = ar_prompt(run, given)
    cond = module.world_model.conditioner(batch)
    new = (t - given.shape[1]) * h * w
    out = generate(module.world_model.net, prompt_ids, grid, new, context=cond.context, context_mask=cond.context_mask,
                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens = out[:, 1:] if m.bov_token else out
    return tokens.reshape(given.shape[0], t, h, w)


@torch.no_grad()
def generate_ar(run: LoadedRun, clip: Clip, prompt: str, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = 0.8, seed: int = 0) -> Generated:
    """Continue the conditioning clip's first ``model.condition_frames`` token frames to the full
    token grid with the KV-cache generator, then decode."""
    _given(run, clip, "autoregressive")
    module, m, device = run.module, run.cfg.model, run.device
    t, h, w = tuple(run.plan.latent_shape)
    k = m.condition_frames
    if k == 0 and not m.bov_token:
        raise ValueError("model.condition_frames=0 without a <bov> token: generation needs at least one given frame")
    t0 = time.perf_counter()
    given = module.tokenizer.encode(clip.video.to(device))[:, :k] if k else torch.zeros(1, 0, h, w, dtype=torch.long,
                                                                                         device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = sample_ar(run, given, conditioning_batch(run, clip, prompt), temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=gen)
    new = (t - k) * h * w
    prompt_tokens = k * h * w + int(m.bov_token)
    _sync(device)
    t1 = time.perf_counter()
    video = module.tokenizer.decode(tokens)
    _sync(device)
    t2 = time.perf_counter()
    return Generated(video=video.float().cpu(), codes=tokens.cpu(), condition=given.cpu() if k else None,
                     seconds={"generate": t1 - t0, "decode": t2 - t1},
                     stats={"new_tokens": new, "prompt_tokens": prompt_tokens, "temperature": temperature,
                            "top_k": top_k, "top_p": top_p, "tokens_per_s": new / max(t1 - t0, 1e-9)})


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] (or [3, F, H, W]) in [-1, 1] -> uint8 [F, H, W, 3]."""
    if video.dim() == 5:
        video = video[0]
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(path, frames: np.ndarray, fps: float, codec: str = "h264") -> Path:
    """uint8 frames [F, H, W, 3] -> an mp4 file (H.264 or VP9, through PyAV)."""
    from nemo_ext.data.video import encode_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_video(np.ascontiguousarray(frames), fps, codec=codec))
    os.replace(tmp, path)
    return path


def output_fps(run: LoadedRun, clip: Clip) -> float:
    return _fps(run, clip) or 24.0
