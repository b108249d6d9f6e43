"""Derived values of a run, computed once, and every check that must pass before any work starts.

``make_plan`` turns a typed RecipeConfig plus the world size into a :class:`RunPlan` (data-parallel
size, microbatches, latent grid, token count, dtype, run directory) or raises a ConfigError that
names the offending key. Nothing else in the code base recomputes these values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nemo_ext.config.compose import ConfigError


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    num_microbatches: int
    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    latent_shape: tuple  # diffusion: (C, T, H, W) latents of one clip; ar: the token grid (T, H, W)
    num_tokens: int  # transformer sequence length per sample (DiT patches; AR: [<bov>] + grid tokens, padded)
    context_len: int
    extra_channels: int
    flops_per_sample: float
    run_dir: Path

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def world_size_from_env() -> int:
    """The launcher's WORLD_SIZE (torchrun, or the Slurm job script's mapping of SLURM_NTASKS);
    SLURM_NTASKS alone is not used: inside an salloc shell it counts tasks this process is not one of."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def _choice(value, key: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {list(allowed)}")


def _check_sources(d) -> None:
    if d.sources and d.path:
        raise ConfigError("set either data.path or data.sources (a mixture), not both")
    names = [s.name for s in d.sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data.sources: names must be unique, repeated: {dup}")
    if d.stages and not d.sources:
        raise ConfigError("data.stages weigh data.sources by name; data.sources is empty")
    if d.sources:
        from nemo_ext.data.mixture import Schedule, Stage

        stages = [Stage(s.until_step, dict(s.weights)) for s in d.stages] or [Stage(None, {n: 1.0 for n in names})]
        try:
            Schedule(names, stages)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if d.max_failed_samples < 0 or not 0.0 <= d.max_failed_fraction <= 1.0:
        raise ConfigError("data.max_failed_samples must be >= 0 and data.max_failed_fraction in [0, 1]")


def run_dir_for(cfg) -> Path:
    return Path(cfg.runs_dir) / cfg.recipe / f"{cfg.family}_{cfg.model.name}" / cfg.run_name


def make_plan(cfg, world_size: Optional[int] = None, cuda_available: Optional[bool] = None) -> RunPlan:
    from nemo_ext.tasks import get_task

    world_size = world_size_from_env() if world_size is None else world_size
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    m, d, par, tr, opt = cfg.model, cfg.data, cfg.parallel, cfg.trainer, cfg.optim

    try:
        task = get_task(cfg.task.name)
    except KeyError as exc:
        raise ConfigError(f"task.name: {exc.args[0]}") from None
    if cfg.family not in task.families:
        raise ConfigError(f"task {task.name!r} supports families {list(task.families)}, not family={cfg.family!r}")
    _choice(cfg.strategy.name, "strategy.name", ["full", "lora"])
    _choice(cfg.launcher.name, "launcher.name", ["local", "slurm"])

    # ---- device and precision ----
    _choice(tr.device, "trainer.device", ["auto", "cpu", "gpu"])
    if tr.device == "gpu" and not cuda_available:
        raise ConfigError("trainer.device=gpu but no CUDA GPU is visible (NGPU unset or 0 runs on CPU)")
    device = "cuda" if (tr.device == "gpu" or (tr.device == "auto" and cuda_available)) else "cpu"
    _choice(tr.precision, "trainer.precision", ["auto", "bf16", "fp32"])
    precision = tr.precision if tr.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for key in ("max_steps", "log_every_n_steps", "keep_last_n_checkpoints"):
        if getattr(tr, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(tr, key)} must be >= 1")
    if tr.checkpoint_every_n_steps < 0:
        raise ConfigError(f"trainer.checkpoint_every_n_steps={tr.checkpoint_every_n_steps} must be >= 0 (0: no checkpoints)")
    if tr.val_every_n_steps < 0:
        raise ConfigError(f"trainer.val_every_n_steps={tr.val_every_n_steps} must be >= 0 (0 turns validation off)")
    if tr.val_batches < 1:
        raise ConfigError(f"trainer.val_batches={tr.val_batches} must be >= 1 (global batches per validation)")

    # ---- parallel layout ----
    for key in ("tp", "pp", "cp"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)} must be >= 1")
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tp={par.tp} x parallel.pp={par.pp} x parallel.cp={par.cp} = {model_parallel} does not divide "
            f"the world size {world_size} (processes launched: NGPU x nodes)"
        )
    dp = world_size // model_parallel
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    _choice(par.recompute, "parallel.recompute", [None, "full", "selective"])
    _choice(par.recompute_method, "parallel.recompute_method", ["uniform", "block"])

    # ---- data ----
    _choice(d.kind, "data.kind", list(DATA_KINDS[cfg.family]))
    _choice(d.backend, "data.backend", ["auto", "dali", "pyav"])
    if d.backend == "dali" and d.kind == "video":
        import importlib.util

        if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
            raise ConfigError("data.backend=dali needs NVIDIA DALI: pip install 'cosmos-recipes[dali]' (or use data.backend=pyav)")
    _check_sources(d)
    if d.sample_val_num_videos < 1:
        raise ConfigError(f"data.sample_val_num_videos={d.sample_val_num_videos} must be >= 1 (held-out sample world)")
    _choice(d.resize_mode, "data.resize_mode", ["crop", "pad"])
    _choice(d.clip_sampling, "data.clip_sampling", ["random", "start"])
    _choice(d.caption_choice, "data.caption_choice", ["first", "random"])
    if d.frame_stride < 1:
        raise ConfigError(f"data.frame_stride={d.frame_stride} must be >= 1")
    if d.micro_batch_size < 1:
        raise ConfigError(f"data.micro_batch_size={d.micro_batch_size} must be >= 1")
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by data.micro_batch_size="
            f"{d.micro_batch_size} x data-parallel size {dp}"
        )
    num_microbatches = d.global_batch_size // (d.micro_batch_size * dp)
    if not d.path and not d.sources:
        from nemo_ext.worlds import WORLDS

        if d.sample_variant not in WORLDS:
            raise ConfigError(f"data.sample_variant={d.sample_variant!r}: no such sample world; registered: "
                              f"{', '.join(WORLDS.names())}")
    tok = m.tokenizer
    if d.num_frames < 1 or (d.num_frames - 1) % tok.temporal_compression:
        raise ConfigError(
            f"data.num_frames={d.num_frames} must be 1 + {tok.temporal_compression}k "
            f"(the tokenizer compresses time {tok.temporal_compression}x): e.g. 9, 17, 33, 121"
        )

    # ---- model shapes ----
    try:
        task.check(cfg.task, cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    extra_channels = task.extra_channels(cfg.task, m)
    if cfg.strategy.name == "lora":
        _check_lora(cfg)
    shapes = _ar_shapes(cfg) if cfg.family == "ar" else _diffusion_shapes(cfg, extra_channels)
    latent_shape, num_tokens, context_len, flops = shapes

    # ---- optimizer ----
    _choice(opt.name, "optim.name", ["adam", "sgd"])
    _choice(opt.decay, "optim.decay", ["constant", "cosine", "linear"])
    if opt.lr <= 0:
        raise ConfigError(f"optim.lr={opt.lr} must be > 0")

    return RunPlan(
        world_size=world_size,
        tp=par.tp,
        pp=par.pp,
        cp=par.cp,
        dp=dp,
        num_microbatches=num_microbatches,
        device=device,
        dtype=dtype,
        latent_shape=latent_shape,
        num_tokens=num_tokens,
        context_len=context_len,
        extra_channels=extra_channels,
        flops_per_sample=flops,
        run_dir=run_dir_for(cfg),
    )


def _check_lora(cfg) -> None:
    from nemo_ext.models.lora import target_catalogue, unmatched_patterns

    st = cfg.strategy
    if st.rank < 1:
        raise ConfigError(f"strategy.rank={st.rank} must be >= 1")
    if not st.alpha > 0:
        raise ConfigError(f"strategy.alpha={st.alpha} must be > 0")
    if not 0.0 <= st.dropout < 1.0:
        raise ConfigError(f"strategy.dropout={st.dropout} must be in [0, 1)")
    if not st.target_modules:
        raise ConfigError("strategy.target_modules is empty: LoRA needs at least one linear to adapt")
    catalogue = target_catalogue(cfg.family, cfg.model)
    missing = unmatched_patterns(st.target_modules, catalogue)
    if missing:
        raise ConfigError(
            f"strategy.target_modules: {missing} match no linear of model={cfg.model.name}; its LoRA-capable "
            f"linears are {catalogue} (patterns match these names or their last component)"
        )
    bad = [p for p in st.trainable_modules if not isinstance(p, str) or not p]
    if bad:
        raise ConfigError(f"strategy.trainable_modules: {bad} are not module name patterns")


# data.kind per family: precomputed latents feed the DiT, precomputed token shards the AR model.
DATA_KINDS = {"diffusion": ("video", "latent"), "ar": ("video", "tokens")}


def _diffusion_shapes(cfg, extra_channels: int):
    """(latent shape (C, T, H, W), DiT tokens, context length, FLOPs per sample) after the DiT's checks."""
    m, d, par = cfg.model, cfg.data, cfg.parallel
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % par.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={par.tp}")
    if m.ffn_hidden_size % par.tp:
        raise ConfigError(f"the MLP width {m.ffn_hidden_size} (model.hidden_size x model.mlp_ratio) is not divisible by parallel.tp={par.tp}")
    if m.num_layers % par.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={par.pp}")
    tok = m.tokenizer
    step_h, step_w = tok.spatial_compression * m.patch_size[1], tok.spatial_compression * m.patch_size[2]
    if d.height % step_h or d.width % step_w:
        raise ConfigError(f"data.height={d.height} / data.width={d.width} must be multiples of {step_h} / {step_w}")
    t_lat = 1 + (d.num_frames - 1) // tok.temporal_compression
    latent_shape = (tok.latent_channels, t_lat, d.height // tok.spatial_compression, d.width // tok.spatial_compression)
    grid = [s // p for s, p in zip(latent_shape[1:], m.patch_size)]
    max_grid = [s // p for s, p in zip(m.max_size, m.patch_size)]
    for axis, g, mg in zip("thw", grid, max_grid):
        if g > mg:
            raise ConfigError(f"the clip's latent {axis} extent ({g} patches) exceeds model.max_size ({mg} patches)")
    if latent_shape[1] % m.patch_size[0]:
        raise ConfigError(f"latent frames {latent_shape[1]} not divisible by model.patch_size[0]={m.patch_size[0]}")
    if m.video2world and not 0 < m.condition_latent_frames < latent_shape[1]:
        raise ConfigError(
            f"model.condition_latent_frames={m.condition_latent_frames} must be between 1 and the clip's "
            f"{latent_shape[1]} latent frames - 1 (data.num_frames={d.num_frames})"
        )
    num_tokens = m.num_tokens(latent_shape[1:])
    context_len = m.text_encoder.max_length
    token_split = par.cp * (par.tp if par.sequence_parallel else 1)
    if num_tokens % token_split:
        raise ConfigError(
            f"{num_tokens} video tokens per sample cannot be split over parallel.cp={par.cp}"
            + (f" x parallel.tp={par.tp} (sequence parallel)" if par.sequence_parallel else "")
        )
    if par.sequence_parallel and context_len % par.tp:
        raise ConfigError(f"sequence parallelism: model.text_encoder.max_length={context_len} is not divisible by parallel.tp={par.tp}")
    flops = m.flops_per_sample(latent_shape[1:], context_len, extra_channels)
    return latent_shape, num_tokens, context_len, flops


def _ar_shapes(cfg):
    """(token grid (T, H, W), sequence length, context length, FLOPs per sample) after the AR
    model's checks (GQA groups vs TP, divisibility, grid vs the model's position range)."""
    m, d, par = cfg.model, cfg.data, cfg.parallel
    tok = m.tokenizer
    if d.height % tok.spatial_compression or d.width % tok.spatial_compression:
        raise ConfigError(
            f"data.height={d.height} / data.width={d.width} must be multiples of {tok.spatial_compression} "
            f"(model.tokenizer.spatial_compression)"
        )
    grid = tuple(m.token_grid(d.num_frames, d.height, d.width))
    try:
        m.check_grid(grid)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= m.condition_frames < grid[0]:
        raise ConfigError(
            f"model.condition_frames={m.condition_frames} must be between 0 and the clip's {grid[0]} token "
            f"frames - 1 (data.num_frames={d.num_frames}): the rest of the clip is predicted"
        )
    seq = m.seq_length(grid, par.tp if par.sequence_parallel else 1)
    context_len = m.text_encoder.max_length if m.cross_attention else 0
    try:
        m.check_parallel(par.tp, par.pp, par.cp, par.sequence_parallel, context_len=context_len or None, seq_length=seq)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return grid, seq, context_len, m.flops_per_sample(seq, context_len)
