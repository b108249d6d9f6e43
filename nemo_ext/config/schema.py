"""Typed configuration schema of a recipe run, registered in Hydra's ConfigStore.

The YAML files under ``recipes/`` only set values; every key they may set is declared here (or in
the model / task dataclasses they extend), so a misspelled key fails at composition time with the
full key path. Groups mirror the object graph: ``model``, ``task``, ``data``, ``parallel``,
``strategy``, ``optim``, ``trainer``, ``launcher``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from nemo_ext.models.ar.config import ARConfig
from nemo_ext.models.dit.config import DiTConfig


@dataclass
class DataSourceConfig:
    """One shard set of a mixture."""

    name: str = MISSING
    path: str = MISSING


@dataclass
class DataStageConfig:
    """Mixture weights (by source name) used until ``until_step`` (null: to the end)."""

    until_step: Optional[int] = None
    weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where clips come from and how they are cut. Batch sizes live here because the loader and
    the microbatch schedule both derive from them."""

    kind: str = "video"  # video: encoded video shards decoded online | latent: precomputed latents + T5
    # video decoding: dali (NVDEC on GPU; VP9/VP8/MJPEG on CPU) | pyav (CPU, any codec) | auto (DALI
    # wherever it can decode the data, else PyAV)
    backend: str = "auto"
    # Shard directories / globs / brace patterns; null = the embedded procedural sample world,
    # generated on first use into ``sample_dir``.
    path: Optional[str] = None
    # A mixture instead of `path`: named shard sets, weighted by `stages` (equal weights if none).
    sources: List[DataSourceConfig] = field(default_factory=list)
    stages: List[DataStageConfig] = field(default_factory=list)
    # Held-out shards for the validation loss (directories / globs like `path`). Null: on the sample
    # world, a held-out sample world (other videos: seed 1) generated into `<sample_dir>_val`; with
    # `path` / `sources` given, no validation.
    val_path: Optional[str] = None
    # A sample's caption: json `caption` (first), or one of its `instructions` drawn per draw of the
    # sample (random: several instructions per episode, one each time it is seen)
    caption_choice: str = "first"
    # A corrupt video met during training is skipped and counted; too many stop the run.
    max_failed_samples: int = 100
    max_failed_fraction: float = 0.01
    sample_variant: str = "general"
    sample_dir: str = "data/sample/${data.sample_variant}"
    sample_num_videos: int = 64
    sample_val_num_videos: int = 8  # videos of the held-out sample world
    sample_num_frames: int = 33
    num_frames: int = 17  # pixel frames per clip: 1 + 8k (the tokenizer compresses time 8x)
    frame_stride: int = 1
    height: int = 64
    width: int = 64
    resize_mode: str = "crop"  # crop | pad
    clip_sampling: str = "random"  # random | start
    fps: Optional[float] = None  # for the RoPE time scale; null = the clips' own fps
    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_workers: int = 2
    shuffle: bool = True
    seed: int = 1234


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is derived: world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: Optional[str] = None  # null | full | selective
    recompute_method: str = "uniform"  # uniform | block (full recompute only)
    recompute_num_layers: int = 1
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class StrategyConfig:
    """Training strategy: which parameters train. ``full``: all of them. ``lora``: the base model is
    frozen; LoRA adapters on the tensor-parallel linears whose role matches ``target_modules`` train,
    with the modules matching ``trainable_modules`` (the task's new conditioner), and checkpoints
    hold only those (the base comes from ``trainer.init_from``). The LoRA fields are ignored by
    ``full``. See ``nemo_ext.models.lora``."""

    name: str = "full"  # full | lora
    rank: int = 16
    alpha: float = 16.0  # the adapter output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter input
    # fnmatch patterns on a linear's role: its path inside a transformer layer
    # (self_attention.linear_qkv|linear_proj, cross_attention.linear_q|linear_kv|linear_proj,
    # mlp.linear_fc1|linear_fc2) or inside the network (AR: output_layer), or its last component.
    target_modules: List[str] = field(default_factory=lambda: ["*attention.linear_*", "mlp.linear_*"])
    # fnmatch patterns on module names of the trained model (conditioner, net.final_layer, ...):
    # these train fully next to the adapters (a task's conditioner is new, so it must).
    trainable_modules: List[str] = field(default_factory=lambda: ["conditioner"])


@dataclass
class OptimConfig:
    name: str = "adam"  # megatron's Adam is AdamW (decoupled weight decay)
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear
    decay_steps: Optional[int] = None  # null = trainer.max_steps
    # torch's fused Adam kernel for megatron's Adam when it falls back to torch's optimizer (no apex /
    # transformer-engine): one pass over the fp32 main params instead of the multi-tensor (foreach)
    # implementation's several (false: that one, torch's default).
    fused: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 100
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50  # 0: no checkpoints at all (benchmarks)
    # Validation loss on held-out data (data.val_path) every this many steps and at the last step
    # (0 = off): `val_batches` global batches of fixed clips with fixed noise, forward only.
    val_every_n_steps: int = 50
    val_batches: int = 2
    keep_last_n_checkpoints: int = 2
    # Keep the checkpoint with the lowest validation loss as checkpoints/best (-> best_step_<N>, hard
    # links, so retention of the newest ones never deletes it; checkpoints/best.json says which): a
    # run that starts to overfit keeps its best weights. Only steps that both validate and save count.
    keep_best_checkpoint: bool = True
    resume: bool = True  # resume from the run directory's checkpoints/last when it exists
    # Weights to start from (a checkpoint dir): e.g. an imported base model. With strategy=lora it
    # is the frozen base the adapters train on (null: a random base, saved once to <run>/base).
    init_from: Optional[str] = None
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: Optional[str] = None
    seed: int = 1234
    # Stop with an error when the loss is not finite for this many consecutive steps.
    max_nonfinite_steps: int = 3
    # Keep an exponential moving average of the weights (e.g. 0.9999); exported by default.
    ema_decay: Optional[float] = None


@dataclass
class LauncherConfig:
    """Where the processes run. ``local``: this machine (one process, or torchrun with NGPU
    processes). ``slurm``: ``python -m nemo_ext.cli.launch slurm|sweep`` renders an sbatch script
    (launchers/slurm.sbatch.j2) that starts one srun task per GPU (CPU runs: ``tasks_per_node``);
    the trainer reads the preemption fields at run time."""

    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU nodes (tasks_per_node processes on each)
    tasks_per_node: int = 1  # CPU runs only; GPU runs start one task per GPU
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None  # sbatch --time, e.g. "04:00:00"
    job_name: Optional[str] = None  # null: cosmos-<recipe>
    exclusive: bool = False
    # pyxis/enroot: an image (squashfs file or registry reference) and extra src:dst mounts. The run
    # directory and the sample data are mounted at their own absolute paths automatically.
    container: Optional[str] = None
    mounts: List[str] = field(default_factory=list)
    container_workdir: str = "/workspace/cosmos-recipes"
    # Sourced by the job script before srun (cluster network settings, NCCL knobs); relative to the repo.
    env_file: Optional[str] = "launchers/env/default.env"
    extra_sbatch: List[str] = field(default_factory=list)  # more "#SBATCH" options: launcher.extra_sbatch=['--qos=high']
    # Preemption / time limit: Slurm sends SIGUSR1 this many seconds before the limit; the trainer
    # saves a checkpoint and exits, and with `requeue` puts the job back in the queue to resume.
    signal_seconds: int = 120
    requeue: bool = True
    max_parallel: int = 0  # sweeps: at most this many array tasks at once (0 = no limit)


@dataclass
class RecipeConfig:
    recipe: str = MISSING  # the recipe folder (task) name
    family: str = "diffusion"  # diffusion | ar
    run_name: str = "default"
    runs_dir: str = "runs"
    model: Any = MISSING  # a family schema (DiTConfig, ...) selected by the model preset
    task: Any = MISSING  # the task plugin's config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# Model presets extend their family's schema: ``defaults: [dit_schema, _self_]``.
MODEL_SCHEMAS = {"diffusion": ("dit_schema", DiTConfig), "ar": ("ar_schema", ARConfig)}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="recipe_schema", node=RecipeConfig)
    for name, node in MODEL_SCHEMAS.values():
        cs.store(group="model", name=name, node=node)
    from nemo_ext.tasks import all_tasks

    for spec in all_tasks():
        cs.store(group="task", name=spec.name, node=spec.config_cls)
