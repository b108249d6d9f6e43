"""Our DiT's training step against diffusers' ``CosmosTransformer3DModel``, same shape, same weights,
same run.

    python benchmarks/dit_step.py [--shape general|general57|action] [--layers 4] [--variants a,b,...]
                                  [--steps 5] [--warmup 2] [--profile VARIANT,...] [--commit SHA]
    python benchmarks/dit_step.py --tiny          # CPU smoke: small width, fp32, the same code path

What one step is, for every variant: forward + backward + AdamW update of every parameter, batch
``--batch`` of random latents [B, 16, T, H, W], a random timestep per sample, a random T5-like
context [B, 512, 1024], bf16 (fp32 on CPU). The loss is the plain MSE of the model output against a
fixed random target (not the EDM loss: the EDM preconditioning and weighting are a few elementwise
ops over the latents, the same for both models, and would only blur the comparison).

Variants (``--variants``; the default set is marked *):

* ours_eager*              our megatron-core DiT (``model=dit_7b`` built by the trainer's code,
                           ``model.attention_backend=auto``: cuDNN > flash SDPA) through the trainer's
                           step: megatron DDP (fp32 grad buffer), megatron Adam (fp32 master
                           weights, grad clipping at 1.0), megatron's forward/backward schedule
* ours_compiled*           the same with ``torch.compile`` on every DiT layer (fuses the AdaLN
                           modulation, the per-head RMSNorm, RoPE and the gates)
* ours_eager_flash         ours_eager with ``model.attention_backend=flash`` (what the cuDNN choice buys)
* ours_compiled_torch_adamw  ours_compiled with diffusers' optimizer setup instead of the trainer's
                           (plain backward, fused torch AdamW on the bf16 parameters: no fp32 master
                           weights, no clipping): what megatron's optimizer path costs
* diffusers_eager*         ``CosmosTransformer3DModel`` as its users train it: default SDPA backend
                           selection, fused torch AdamW on bf16 parameters
* diffusers_compiled*      the same with ``torch.compile`` on the model: the performance peer
* diffusers_compiled_cudnn*  the peer with the cuDNN SDPA backend forced
                           (``torch.nn.attention.sdpa_kernel``): how much of the gain is ours
* diffusers_eager_cudnn    the eager model with the cuDNN SDPA backend forced

Both models get the same weights: ours is built first (random matrices of unit gain, 1/sqrt(fan-in),
instead of the AdaLN-Zero init, so that every block shows in the output), converted with
``nemo_ext.checkpoint.diffusers_dit.ours_to_diffusers`` and loaded into the diffusers model; one
forward of each on the same input gives the max-abs output difference printed as a sanity check.

FLOPs per sample are ``DiTConfig.flops_per_sample`` (matmuls: per-token linears, self-attention
S^2, cross-attention, AdaLN once per sample; the count the trainer's MFU log uses), the same for
both models; MFU is against the GPU's dense bf16 peak (989.4 TFLOP/s for H100 and H200). Each
step is timed with CUDA events with no host synchronization between timed steps (our step keeps the
trainer's own synchronizations: the grad-norm read of gradient clipping and the NaN check of the
grad buffer). Peak memory is ``torch.cuda.max_memory_allocated`` per variant (weights, gradients,
optimizer state and activations). A variant that runs out of memory is recorded as ``oom``.

The result file ``benchmarks/results/dit_step_<shape>_<hw>_<date>.json`` records every variant,
the speedups of ours over each diffusers variant, hardware, versions, the git commit and the
exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

from bench_common import (
    RESULTS,
    MegatronTrainStep,
    build_world_model,
    command_line,
    compile_layers,
    device_of_run,
    git_commit,
    hardware,
    headline,
    hw_tag,
    init_megatron,
    limit_recompiles,
    memory_stats,
    print_table,
    profile_step,
    run_variants,
    speedups,
    tflops_and_mfu,
    time_steps,
    today,
    versions,
    warm_attention_log,
    write_result,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass(frozen=True)
class Shape:
    latent: tuple[int, int, int]  # latent frames, height, width (tokenizer CV8x8x8)
    batch: int
    video2world: bool
    model: str  # default model preset
    what: str


SHAPES = {
    # 121 frames at 704x1280 -> 16 x 88 x 160 latents -> 16 x 44 x 80 = 56,320 tokens
    "general": Shape((16, 88, 160), 1, False, "dit_7b", "121 frames 704x1280, 56,320 tokens"),
    # 57 frames at 704x1280 -> 8 x 88 x 160 latents -> 28,160 tokens
    "general57": Shape((8, 88, 160), 1, False, "dit_7b", "57 frames 704x1280, 28,160 tokens"),
    # action control: 9 frames (1 given + 8 predicted) at 256x320 -> 2 x 32 x 40 latents -> 640 tokens
    "action": Shape((2, 32, 40), 32, True, "dit_7b_v2w", "action control: 9 frames 256x320 (2 latent frames), 640 tokens"),
    # CPU smoke
    "tiny": Shape((2, 8, 8), 2, False, "dit_tiny", "CPU smoke test (dit_tiny width)"),
}


@dataclass(frozen=True)
class Variant:
    model: str  # ours | diffusers
    compiled: bool
    attention: str  # ours: model.attention_backend; diffusers: default | cudnn
    optimizer: str = "default"  # ours: megatron (the trainer's) | torch_adamw; diffusers: torch_adamw
    what: str = ""


VARIANTS = {
    "ours_eager": Variant("ours", False, "auto", "megatron", "ours, trainer step, eager"),
    "ours_compiled": Variant("ours", True, "auto", "megatron", "ours, trainer step, torch.compile per layer"),
    "ours_eager_flash": Variant("ours", False, "flash", "megatron", "ours, trainer step, eager, flash SDPA"),
    "ours_compiled_torch_adamw": Variant("ours", True, "auto", "torch_adamw", "ours, compiled, bf16 fused AdamW"),
    "diffusers_eager": Variant("diffusers", False, "default", "torch_adamw", "diffusers, eager, default SDPA"),
    "diffusers_compiled": Variant("diffusers", True, "default", "torch_adamw", "diffusers + torch.compile (peer)"),
    "diffusers_compiled_cudnn": Variant("diffusers", True, "cudnn", "torch_adamw",
                                        "diffusers + torch.compile, cuDNN SDPA forced"),
    "diffusers_eager_cudnn": Variant("diffusers", False, "cudnn", "torch_adamw", "diffusers, eager, cuDNN SDPA forced"),
}
DEFAULT_VARIANTS = ["ours_eager", "ours_compiled", "diffusers_eager", "diffusers_compiled", "diffusers_compiled_cudnn"]
PEER = "diffusers_compiled"
FPS = 24.0


# ---------------------------------------------------------------- model building
class Bench:
    """Everything shared by the variants: config, inputs, and the weights of both models (on the
    host, so each variant builds its model fresh and frees it after)."""

    def __init__(self, args: argparse.Namespace):
        from nemo_ext.config.compose import compose, to_typed

        self.args = args
        self.shape = SHAPES[args.shape]
        self.device = device_of_run(args.cpu)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = args.model or self.shape.model
        overrides = [f"model={model}", f"model.num_layers={args.layers}", *args.set]
        if self.shape.video2world:
            overrides.append("model.video2world=true")
        self.overrides = overrides
        self.cfg = to_typed(compose("general", "diffusion", overrides))
        self.arch = self.cfg.model
        self.batch_size = args.batch or self.shape.batch
        self.context_len = args.context_len or self.arch.text_encoder.max_length
        self.tokens = self.arch.num_tokens(self.shape.latent)
        self.flops_per_step = self.arch.flops_per_sample(self.shape.latent, self.context_len) * self.batch_size
        init_megatron(self.device, self.cfg.parallel, seed=self.cfg.trainer.seed)
        self.inputs = self._inputs()
        self.ours_state: dict = {}
        self.diffusers_state: dict = {}

    def _inputs(self) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        b, (t, h, w) = self.batch_size, self.shape.latent
        c = self.arch.latent_channels
        dev, dt = self.device, self.dtype
        x = torch.randn(b, c, t, h, w, generator=g).to(dev, dt)
        out = {
            "x": x,
            "timestep": torch.rand(b, generator=g).to(dev, dt),
            "context": torch.randn(b, self.context_len, self.arch.context_dim, generator=g).to(dev, dt),
            "target": torch.randn(b, c, t, h, w, generator=g).to(dev, torch.float32),
            "padding_mask": torch.zeros(1, 1, h, w, device=dev, dtype=dt),
            "condition_mask": None,
        }
        if self.arch.video2world:
            mask = torch.zeros(b, 1, t, h, w, device=dev, dtype=dt)
            mask[:, :, : min(self.arch.condition_latent_frames, t - 1)] = 1.0  # at least one frame generated
            out["condition_mask"] = mask
        return out

    # ---- ours ----
    def build_ours(self, attention: str, initialize: bool):
        """The trainer's model (CosmosDiT + the general task's conditioner in a WorldModel)."""
        self.arch.attention_backend = attention
        return build_world_model(self.cfg, self.dtype, self.device, initialize)

    def ours_forward(self, model, inputs: dict):
        kwargs = {"fps": FPS}
        if inputs["condition_mask"] is not None:
            kwargs["condition_mask"] = inputs["condition_mask"]
        return model(inputs["x"], inputs["timestep"], {"context": inputs["context"]}, **kwargs)

    # ---- diffusers ----
    def build_diffusers(self):
        from diffusers import CosmosTransformer3DModel

        from nemo_ext.checkpoint.diffusers_dit import diffusers_config

        _torchvision_resize_shim()
        kwargs = {k: v for k, v in diffusers_config(self.arch).items() if not k.startswith("_")}
        with torch.device(self.device):
            model = CosmosTransformer3DModel(**kwargs)
        # As ``from_pretrained(torch_dtype=...)`` leaves it: the modules diffusers keeps in fp32
        # (the learnable position embedding) stay fp32, everything else in the run's dtype.
        keep = set(model._keep_in_fp32_modules or [])
        for name, child in model.named_children():
            if name not in keep:
                child.to(self.dtype)
        return model

    def diffusers_forward(self, model, inputs: dict):
        kwargs = {"fps": FPS, "padding_mask": inputs["padding_mask"], "return_dict": False}
        if inputs["condition_mask"] is not None:
            kwargs["condition_mask"] = inputs["condition_mask"]
        return model(inputs["x"], inputs["timestep"], inputs["context"], **kwargs)[0]

    # ---- shared weights ----
    def prepare_weights(self) -> dict:
        """Build ours once with random unit-gain weights, keep them and their diffusers conversion on
        the host, and compare one forward of both models on the same input."""
        from nemo_ext.checkpoint.diffusers_dit import ours_to_diffusers

        ours = self.build_ours("auto", initialize=True)
        with torch.no_grad():
            # Unit-gain matrices instead of the small init (AdaLN-Zero gates, 0.02 std): every
            # block then contributes O(1) to the output, so the comparison below checks all of them.
            for name, p in ours.named_parameters():
                if p.dim() >= 2:
                    # AdaLN modulations stay small: unit-gain scale/shift/gate in every block grow the
                    # activations until the bf16 step's gradients overflow (NaN, measured on H200)
                    p.normal_(std=(0.02 if "adaln" in name.lower() else 1.0) * p.shape[-1] ** -0.5)
        self.ours_state = {k: v.detach().cpu() for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)}
        self.diffusers_state = ours_to_diffusers(self.ours_state, self.arch)
        check: dict = {"params": sum(p.numel() for p in ours.parameters())}
        if self.args.no_check:
            return check
        ours.eval()
        with torch.no_grad():
            got = self.ours_forward(ours, self.inputs).float()
        del ours
        ref_model = self.build_diffusers()
        ref_model.load_state_dict(self.diffusers_state, strict=True)
        ref_model.eval()
        with torch.no_grad():
            ref = self.diffusers_forward(ref_model, self.inputs).float()
        del ref_model
        diff = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
        check.update(max_abs_diff=diff, max_abs_reference=scale, relative=diff / scale if scale else None,
                     dtype=str(self.dtype).replace("torch.", ""))
        return check

    def load_ours(self, attention: str):
        model = self.build_ours(attention, initialize=False)
        missing, unexpected = model.load_state_dict(self.ours_state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def load_diffusers(self):
        model = self.build_diffusers()
        model.load_state_dict(self.diffusers_state, strict=True)
        return model


def _torchvision_resize_shim() -> None:
    """diffusers' Cosmos model resizes the padding mask with torchvision; without torchvision its
    NEAREST resize is ``F.interpolate`` (the parity test does the same)."""
    import diffusers.models.transformers.transformer_cosmos as tc

    if not hasattr(tc, "transforms"):
        tc.transforms = types.SimpleNamespace(
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            functional=types.SimpleNamespace(
                resize=lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")),
        )


def sdpa_context(attention: str, device: torch.device):
    """The cuDNN SDPA backend forced around a diffusers step (GPU only); else torch's default choice."""
    if attention == "cudnn" and device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return contextlib.nullcontext()


def torch_adamw(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=device.type == "cuda")


# ---------------------------------------------------------------- one variant
def run_one(bench: Bench, name: str) -> dict:
    variant = VARIANTS[name]
    args, device, inputs = bench.args, bench.device, bench.inputs
    loss_box: dict = {}

    if variant.model == "ours":
        model = bench.load_ours(variant.attention)
        if variant.compiled:
            warm_attention_log(variant.attention, device)
            compile_layers(model.net.decoder.layers, args.compile_mode)
        if variant.optimizer == "megatron":

            def forward_step(data_iterator, chunk):
                mb = next(data_iterator)
                out = bench.ours_forward(chunk, mb)

                def loss_func(output):
                    loss = F.mse_loss(output.float(), mb["target"])
                    return loss, {"loss": loss.detach().clone()}

                return out, loss_func

            trainer_step = MegatronTrainStep(model, bench.cfg.parallel, bench.cfg.optim, bench.dtype, forward_step,
                                             num_microbatches=1, seq_length=bench.tokens,
                                             micro_batch_size=bench.batch_size)

            def step():
                trainer_step(inputs)

            def last_loss():
                return trainer_step.last_loss()
        else:
            opt = torch_adamw(model, bench.cfg.optim, device)

            def step():
                loss = F.mse_loss(bench.ours_forward(model, inputs).float(), inputs["target"])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_box["loss"] = loss.detach()

            def last_loss():
                return float(loss_box["loss"])
    else:
        model = bench.load_diffusers()
        model.train()
        forward_model = model
        if variant.compiled:
            limit_recompiles(bench.arch.num_layers)
            forward_model = torch.compile(model, mode=args.compile_mode)
        opt = torch_adamw(model, bench.cfg.optim, device)

        def step():
            with sdpa_context(variant.attention, device):
                loss = F.mse_loss(bench.diffusers_forward(forward_model, inputs).float(), inputs["target"])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_box["loss"] = loss.detach()

        def last_loss():
            return float(loss_box["loss"])

    timing = time_steps(step, device, args.warmup, args.steps)
    record = {"model": variant.model, "what": variant.what, "compiled": variant.compiled,
              "attention": variant.attention, "optimizer": variant.optimizer, **timing.summary()}
    record.update(tflops_and_mfu(bench.flops_per_step, record["step_time_s_median"], 1, device))
    record["samples_per_s"] = bench.batch_size / record["step_time_s_median"]
    record.update(memory_stats(device))
    record["loss_last"] = last_loss()
    if name in args.profile or "all" in args.profile:
        try:
            record["profile"] = profile_step(step, device)
        except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the timing
            record["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return record


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="general", choices=[s for s in SHAPES if s != "tiny"],
                   help="general: 121x704x1280 (56,320 tokens, batch 1); general57: 57 frames (28,160 tokens); "
                        "action: 2 latent frames at 256x320 (640 tokens), batch 32, Video2World model")
    p.add_argument("--model", default=None, help="model preset (default: dit_7b; dit_7b_v2w for --shape action)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (the issue's reference: 4 at 7B width)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: the shape's)")
    p.add_argument("--context-len", type=int, default=None, help="T5 context tokens (default: model.text_encoder.max_length)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override of the composed config, e.g. --set model.hidden_size=5120 (repeatable)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--profile", default="", help="variants to profile one extra step of (kernel time by class), or 'all'")
    p.add_argument("--no-check", action="store_true", help="skip the output comparison of the two models")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: dit_tiny width, 2 layers, tiny latents, fp32")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is visible")
    p.add_argument("--fail-fast", action="store_true", help="raise a variant's error instead of recording it")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp folder with --tiny)")
    p.add_argument("--name", default=None, help="result file stem (default: dit_step_<shape>_<hw>_<date>)")
    p.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.cpu = "tiny", True
        if args.layers == 4:
            args.layers = 2
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.profile = [v.strip() for v in args.profile.split(",") if v.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    arch = bench.arch
    print(f"DiT {arch.name}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads, "
          f"context {bench.context_len}x{arch.context_dim}; shape {args.shape} ({bench.shape.what}), "
          f"latent {bench.shape.latent}, batch {bench.batch_size}, {bench.tokens} tokens/sample; "
          f"{bench.flops_per_step / 1e12:.1f} TFLOP/step; {bench.device}, {bench.dtype}", flush=True)

    check = bench.prepare_weights()
    if "max_abs_diff" in check:
        print(f"same weights, same input: max |ours - diffusers| = {check['max_abs_diff']:.4g} "
              f"(max |diffusers| = {check['max_abs_reference']:.4g}, relative {check['relative']:.3g}, {check['dtype']})",
              flush=True)

    records = run_variants(args.variants, lambda n: VARIANTS[n].what, lambda n: run_one(bench, n), bench.device,
                           keep_going=not args.fail_fast)

    print()
    table = print_table(records, [("variant", "variant"), ("step_time_s_median", "s/step"), ("tflops_per_gpu", "TFLOP/s"),
                                  ("mfu", "MFU"), ("peak_allocated_gib", "peak GiB"), ("first_step_s", "first step s"),
                                  ("status", "status")])
    ratios = speedups(records)
    if ratios:
        print()
        print_table(ratios, [("ours", "ours"), ("reference", "vs"), ("speedup", "speedup (ref time / our time)")])
    top = headline(records, PEER)
    if top:
        print(f"\nbest of ours ({top['ours']}) vs the peer ({PEER}): {top['speedup']:.3f}x")

    hw = hardware()
    result = {
        "benchmark": "dit_step",
        "what": f"DiT training step, ours vs diffusers CosmosTransformer3DModel: {bench.shape.what}",
        "date": today(),
        "commit": git_commit(args.commit),
        "hardware": hw,
        "versions": versions(),
        "command": command_line(),
        "shape": {"name": args.shape, "latent_thw": list(bench.shape.latent), "batch": bench.batch_size,
                  "tokens_per_sample": bench.tokens, "context_len": bench.context_len,
                  "video2world": arch.video2world},
        "model": {"preset": args.model or bench.shape.model, "overrides": bench.overrides, **arch.architecture()},
        "dtype": str(bench.dtype).replace("torch.", ""),
        "loss": "MSE(model output, fixed random target), fp32",
        "optimizer": {"ours (megatron)": "megatron Adam, fp32 master weights, clip_grad 1.0 (the trainer's)",
                      "torch_adamw": "torch.optim.AdamW(fused=True) on bf16 parameters", **vars(bench.cfg.optim)},
        "flops_per_step": bench.flops_per_step,
        "flops_formula": "DiTConfig.flops_per_sample x batch (matmuls only; fwd+bwd = 3x fwd)",
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_mode": args.compile_mode,
        "check": check,
        "variants": records,
        "speedups": ratios,
        "headline": top,
        "table": table,
    }
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="dit_step_")) if args.tiny else RESULTS)
    layers_tag = "" if args.layers == 4 else f"-{args.layers}L"
    stem = args.name or f"dit_step_{args.shape}{layers_tag}_{hw_tag()}_{today()}"
    path = write_result(result, out_dir, stem)
    print(f"wrote {path}")
    failed = [r for r in records if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
