"""Our autoregressive model's training step against transformers' ``LlamaForCausalLM`` of the same
shape, same run.

    python benchmarks/ar_step.py [--model ar_4b] [--layers 4] [--batch 1] [--variants a,b,...]
                                 [--steps 10] [--warmup 3] [--profile VARIANT,...] [--commit SHA]
    python benchmarks/ar_step.py --tiny          # CPU smoke: ar_tiny width, fp32, the same code path

One step, for every variant: forward + backward + AdamW update of every parameter on ``--batch``
sequences of the model's full token grid (ar_4b: 5 x 40 x 64 = 12,800 tokens, 33 frames at
640x1024 through DV8x16x16) of random token ids, next-token cross entropy (fp32 logits), bf16
(fp32 on CPU).

Variants (``--variants``; the default set is marked *):

* ours_eager*        ``model=ar_4b`` (``model.num_layers=--layers``) built by the trainer's code
                     (``ARModule.build_world_model``), the trainer's step: megatron DDP, megatron
                     Adam (fp32 master weights, grad clipping), megatron's schedule, the trainer's
                     sequence layout and loss (``sequence_batch``, ``ARModule._loss``);
                     ``model.attention_backend=auto`` (cuDNN > flash SDPA)
* ours_compiled*     the same with ``torch.compile`` on every layer
* hf_eager*          ``transformers.LlamaForCausalLM`` with the same hidden size, FFN, heads, KV
                     groups, vocabulary and layers (untied output layer, no biases), SDPA
                     attention as transformers selects it, fused torch AdamW on bf16 parameters
* hf_compiled*       the same with ``torch.compile`` on the model
* hf_compiled_cudnn  hf_compiled with the cuDNN SDPA backend forced
* hf_eager_cudnn     hf_eager with the cuDNN SDPA backend forced

The shapes differ only where the architectures do: Cosmos AR has per-head Q/K RMSNorm and a 3D
RoPE, Llama neither (a 1D RoPE); both are elementwise work, not counted in the FLOPs. The weights
are not shared (no converter between the two layouts; the comparison is of speed, not outputs).

FLOPs per sequence are ``ARConfig.flops_per_sample(S, causal_half=True)`` (matmuls; causal
attention counted at S^2/2, the work a causal kernel does), the same for both; MFU is against the
dense bf16 peak (989.4 TFLOP/s for H100 and H200). Timing, memory and OOM handling as in
``dit_step.py``. Result: ``benchmarks/results/ar_step_<model>-<layers>L_<hw>_<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
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


@dataclass(frozen=True)
class Variant:
    model: str  # ours | hf
    compiled: bool
    attention: str  # ours: model.attention_backend; hf: default | cudnn
    what: str


VARIANTS = {
    "ours_eager": Variant("ours", False, "auto", "ours, trainer step, eager"),
    "ours_compiled": Variant("ours", True, "auto", "ours, trainer step, torch.compile per layer"),
    "hf_eager": Variant("hf", False, "default", "LlamaForCausalLM, eager, SDPA as transformers selects it"),
    "hf_compiled": Variant("hf", True, "default", "LlamaForCausalLM + torch.compile"),
    "hf_compiled_cudnn": Variant("hf", True, "cudnn", "LlamaForCausalLM + torch.compile, cuDNN SDPA forced"),
    "hf_eager_cudnn": Variant("hf", False, "cudnn", "LlamaForCausalLM, eager, cuDNN SDPA forced"),
}
DEFAULT_VARIANTS = ["ours_eager", "ours_compiled", "hf_eager", "hf_compiled"]
PEER = "hf_compiled"


class Bench:
    def __init__(self, args: argparse.Namespace):
        from nemo_ext.config.compose import compose, to_typed
        from nemo_ext.training.ar import sequence_batch

        self.args = args
        self.device = device_of_run(args.cpu)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.overrides = [f"model={args.model}", f"model.num_layers={args.layers}", *args.set]
        self.cfg = to_typed(compose("general", "ar", self.overrides))
        self.arch = self.cfg.model
        self.grid = tuple(args.grid) if args.grid else tuple(self.arch.max_size)
        self.arch.check_grid(self.grid)
        self.seq_length = self.arch.seq_length(self.grid)
        self.batch_size = args.batch
        self.flops_per_step = self.arch.flops_per_sample(self.seq_length, 0, causal_half=True) * self.batch_size
        init_megatron(self.device, self.cfg.parallel, seed=self.cfg.trainer.seed)

        g = torch.Generator(device="cpu").manual_seed(0)
        grid_tokens = torch.randint(0, self.arch.vocab_size, (self.batch_size, *self.grid), generator=g)
        tokens, labels, loss_mask = sequence_batch(grid_tokens, self.seq_length, self.arch.condition_frames,
                                                   self.arch.bov_id)
        self.batch = {"tokens": tokens.to(self.device), "labels": labels.to(self.device),
                      "loss_mask": loss_mask.to(self.device), "context": None, "context_mask": None}

    # ---- ours ----
    def build_ours(self, attention: str):
        """The trainer's model (CosmosAR + the general task's conditioner in a WorldModel)."""
        self.arch.attention_backend = attention
        return build_world_model(self.cfg, self.dtype, self.device)

    # ---- transformers ----
    def build_hf(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        a = self.arch
        config = LlamaConfig(
            vocab_size=a.vocab_size,
            hidden_size=a.hidden_size,
            intermediate_size=a.ffn_hidden_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_query_groups,
            head_dim=a.head_dim,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=a.norm_eps,
            rope_theta=a.rope_theta,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            use_cache=False,
        )
        with torch.device(self.device):
            model = LlamaForCausalLM(config)
        return model.to(self.dtype)


def sdpa_context(attention: str, device: torch.device):
    if attention == "cudnn" and device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return contextlib.nullcontext()


def run_one(bench: Bench, name: str) -> dict:
    from nemo_ext.training.ar import ARModule

    variant = VARIANTS[name]
    args, device, batch = bench.args, bench.device, bench.batch
    optim = bench.cfg.optim
    loss_box: dict = {}

    if variant.model == "ours":
        model = bench.build_ours(variant.attention)
        if variant.compiled:
            warm_attention_log(variant.attention, device)
            compile_layers(model.net.decoder.layers, args.compile_mode)

        def forward_step(data_iterator, chunk):  # ARModule.forward_step
            mb = next(data_iterator)
            out = chunk(mb["tokens"], None, mb, grid=bench.grid, labels=mb["labels"], loss_mask=mb["loss_mask"])
            return out, lambda output: ARModule._loss(mb["loss_mask"], output)

        trainer_step = MegatronTrainStep(model, bench.cfg.parallel, optim, bench.dtype, forward_step,
                                         num_microbatches=1, seq_length=bench.seq_length,
                                         micro_batch_size=bench.batch_size)

        def step():
            trainer_step(batch)

        def last_loss():
            return trainer_step.last_loss()
    else:
        model = bench.build_hf()
        model.train()
        forward_model = model
        if variant.compiled:
            limit_recompiles(bench.arch.num_layers)
            forward_model = torch.compile(model, mode=args.compile_mode)
        opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                weight_decay=optim.weight_decay, fused=device.type == "cuda")
        ids = batch["tokens"]

        def step():
            with sdpa_context(variant.attention, device):
                loss = forward_model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_box["loss"] = loss.detach()

        def last_loss():
            return float(loss_box["loss"])

    timing = time_steps(step, device, args.warmup, args.steps)
    record = {"model": variant.model, "what": variant.what, "compiled": variant.compiled,
              "attention": variant.attention, **timing.summary()}
    record.update(tflops_and_mfu(bench.flops_per_step, record["step_time_s_median"], 1, device))
    record["tokens_per_s_per_gpu"] = round(bench.batch_size * bench.seq_length / record["step_time_s_median"], 1)
    record.update(memory_stats(device))
    record["loss_last"] = last_loss()
    if variant.model == "hf":
        record["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if name in args.profile or "all" in args.profile:
        try:
            record["profile"] = profile_step(step, device)
        except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the timing
            record["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ar_4b", help="AR model preset (recipes/_base/model)")
    p.add_argument("--layers", type=int, default=4,
                   help="transformer layers (ar_4b has 16; ours at 16 needs ~90 GB with fp32 master weights: H200)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="token grid per sequence (default: model.max_size, 5 40 64 = 12,800 tokens for ar_4b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override of the composed config (repeatable)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--profile", default="", help="variants to profile one extra step of, or 'all'")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: ar_tiny, 2 layers, fp32")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is visible")
    p.add_argument("--fail-fast", action="store_true", help="raise a variant's error instead of recording it")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp folder with --tiny)")
    p.add_argument("--name", default=None, help="result file stem (default: ar_step_<model>-<layers>L_<hw>_<date>)")
    p.add_argument("--commit", default=None, help="commit to record (default: this checkout's HEAD)")
    args = p.parse_args(argv)
    if args.tiny:
        args.cpu = True
        args.model = "ar_tiny" if args.model == "ar_4b" else args.model
        args.layers = 2 if args.layers == 4 else args.layers
        args.batch = max(args.batch, 2)
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
    a = bench.arch
    print(f"AR {a.name}: {a.num_layers} layers, hidden {a.hidden_size}, FFN {a.ffn_hidden_size}, {a.num_attention_heads} "
          f"heads / {a.num_query_groups} KV groups, vocab {a.vocab_size}; grid {bench.grid} = {bench.seq_length} tokens, "
          f"batch {bench.batch_size}; {bench.flops_per_step / 1e12:.2f} TFLOP/step; {bench.device}, {bench.dtype}", flush=True)

    records = run_variants(args.variants, lambda n: VARIANTS[n].what, lambda n: run_one(bench, n), bench.device,
                           keep_going=not args.fail_fast)
    print()
    table = print_table(records, [("variant", "variant"), ("step_time_s_median", "s/step"),
                                  ("tokens_per_s_per_gpu", "tokens/s/GPU"), ("tflops_per_gpu", "TFLOP/s"), ("mfu", "MFU"),
                                  ("peak_allocated_gib", "peak GiB"), ("first_step_s", "first step s"), ("status", "status")])
    ratios = speedups(records)
    if ratios:
        print()
        print_table(ratios, [("ours", "ours"), ("reference", "vs"), ("speedup", "speedup (ref time / our time)")])
    top = headline(records, PEER)
    if top:
        print(f"\nbest of ours ({top['ours']}) vs the peer ({PEER}): {top['speedup']:.3f}x")

    result = {
        "benchmark": "ar_step",
        "what": f"AR training step, ours vs transformers LlamaForCausalLM: {a.name} width, {a.num_layers} layers, "
                f"{bench.seq_length}-token sequences",
        "date": today(),
        "commit": git_commit(args.commit),
        "hardware": hardware(),
        "versions": versions(),
        "command": command_line(),
        "shape": {"grid": list(bench.grid), "tokens_per_sequence": bench.seq_length, "batch": bench.batch_size},
        "model": {"preset": args.model, "overrides": bench.overrides, **a.architecture()},
        "dtype": str(bench.dtype).replace("torch.", ""),
        "loss": "next-token cross entropy, fp32 logits (ours: the trainer's loss mask, context frame excluded)",
        "optimizer": {"ours": "megatron Adam, fp32 master weights, clip_grad 1.0 (the trainer's)",
                      "hf": "torch.optim.AdamW(fused=True) on bf16 parameters", **vars(bench.cfg.optim)},
        "flops_per_step": bench.flops_per_step,
        "flops_formula": "ARConfig.flops_per_sample(S, causal_half=True) x batch (matmuls; causal attention at S^2/2)",
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_mode": args.compile_mode,
        "variants": records,
        "speedups": ratios,
        "headline": top,
        "table": table,
    }
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="ar_step_")) if args.tiny else RESULTS)
    stem = args.name or f"ar_step_{args.model}-{args.layers}L_{hw_tag()}_{today()}"
    path = write_result(result, out_dir, stem)
    print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
