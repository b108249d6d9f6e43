"""Generate a video from a trained run, either model family, and write it as an mp4.

    python -m nemo_ext.cli.sample --ckpt <run dir | checkpoint dir | .../last | last> [options] [key=value ...]

The run's config.yaml says which model it is (recipe, family, model preset); the model is built by
the training code (one process, TP1/PP1) and gets the checkpoint's weights (its EMA weights when it
has them, unless --weights raw).

Conditioning: --video <mp4> (its first frames) or --from-data [val|train] --sample N (clip N of the
run's held-out / training data: the held-out sample world for sample-world runs, data.val_path
otherwise; its caption is the default prompt). Video2World models (diffusion with
model.video2world, every AR model with model.condition_frames > 0) continue the given frames;
text-to-world diffusion models generate the whole clip from --prompt.

  diffusion:  EDM sampler, Karras schedule, --solver heun (2nd order) | euler, --steps,
              --guidance g: classifier-free guidance against the empty prompt,
              x0 = uncond + g * (cond - uncond) (1 = off; Cosmos-1's "guidance 7" is g = 8)
  ar:         KV-cache decoding of the remaining token frames, --temperature (0 = greedy),
              --top-k, --top-p (nucleus; 1 = off)

Examples:
    python -m nemo_ext.cli.sample --ckpt runs/general/diffusion_dit_tiny/default --prompt "a red ball"
    python -m nemo_ext.cli.sample --ckpt runs/general/ar_ar_tiny/default --from-data --sample 3 --side-by-side
    python -m nemo_ext.cli.sample --ckpt last --recipe general --family ar --video clip.mp4 --top-k 50
    make sample CKPT=last FAMILY=ar ARGS="--from-data --side-by-side"

Trailing key=value arguments override the run's config (e.g. model.tokenizer.path=/weights/cv8x8x8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nemo_ext.cli.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir, <run>/checkpoints/last, or 'last' "
                   "(the newest run of --recipe/--family/--model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="conditioning video: its first frames (resized like the run's data)")
    src.add_argument("--from-data", nargs="?", const="auto", choices=["auto", "val", "train"], dest="from_data",
                     help="a clip of the run's data: val (held-out) | train; bare flag: val where there is "
                     "held-out data")
    p.add_argument("--sample", type=int, default=0, help="--from-data: the clip's index (default 0)")
    p.add_argument("--prompt", default=None,
                   help="text prompt (default: the clip's caption with --from-data, else empty)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames to generate, 1 + 8k (default: the run's data.num_frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .mp4 (default: <run>/samples/<name>.mp4)")
    p.add_argument("--side-by-side", action="store_true",
                   help="ground truth | generated, side by side (needs a full clip)")
    p.add_argument("--codec", default="h264", choices=["h264", "vp9"])
    p.add_argument("--fps", type=float, default=None, help="output frame rate and the DiT's RoPE time scale "
                   "(default: data.fps, else the clip's, else the run's data's, else 24)")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                   help="auto: EMA when the checkpoint has it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--save-codes", action="store_true",
                   help="also write <out>.pt: the generated tokens (AR) / latents (diffusion) and the given ones")
    p.add_argument("--recipe", default=None,
                   help="with --ckpt last (default general), or for a checkpoint outside a run: the recipe")
    p.add_argument("--family", default=None, choices=["diffusion", "ar"], help="with --recipe (default diffusion)")
    p.add_argument("--model", default=None, help="with --recipe: the model preset (default: the recipe's)")
    d = p.add_argument_group("diffusion")
    d.add_argument("--steps", type=int, default=35, help="sampler steps (Heun: 2 model calls per step but the last)")
    d.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance g (default: 7 when the run trained with caption dropout, "
                   "else 1 = off)")
    d.add_argument("--solver", default="heun", choices=["heun", "euler"])
    a = p.add_argument_group("autoregressive")
    a.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    a.add_argument("--top-k", type=int, default=None)
    a.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass (1 = off)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def _default_out(run, clip, args) -> Path:
    base = run.run_dir / "samples" if run.run_dir is not None else Path("samples")
    step = f"step{run.step}" if run.step is not None else run.ckpt.name
    return base / f"{step}_{clip.name}_seed{args.seed}.mp4"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sample < 0 or (args.num_frames is not None and args.num_frames < 1):
        print("sample error: --sample and --num-frames must be >= 0 / >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    from nemo_ext.config.compose import ConfigError
    from nemo_ext.eval import generation as g
    from nemo_ext.training.run import _show_our_logs

    _show_our_logs()
    try:
        with g.generation_world(args.device, seed=args.seed):
            t0 = time.perf_counter()
            run = g.load_run(args.ckpt, weights=args.weights, device=args.device, num_frames=args.num_frames,
                             overrides=args.overrides, recipe=args.recipe, family=args.family, model=args.model)
            load_s = time.perf_counter() - t0
            if args.from_data:
                clip = g.clip_from_data(run, args.sample, args.from_data)
            elif args.video:
                clip = g.clip_from_video(run, args.video)
            else:
                clip = g.Clip(video=None, real_frames=0)
            if args.fps:
                run.cfg.data.fps = args.fps
            prompt = args.prompt if args.prompt is not None else clip.caption
            if not run.text_conditioned and args.prompt:
                print(f"note: model={run.cfg.model.name} has no text conditioning; --prompt is ignored",
                      file=sys.stderr)
            if args.side_by_side and not clip.complete:
                raise ValueError("--side-by-side needs the ground truth: --from-data, or a --video with "
                                 f"{run.cfg.data.num_frames} frames")
            if run.family == "diffusion":
                guidance = args.guidance
                if guidance is None:
                    guidance = 7.0 if run.cfg.task.caption_dropout > 0 else 1.0
                out = g.generate_diffusion(run, clip, prompt, steps=args.steps, guidance=guidance, seed=args.seed,
                                           solver=args.solver)
            else:
                out = g.generate_ar(run, clip, prompt, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed)
            frames = g.to_frames(out.video)
            if args.side_by_side:
                import numpy as np

                frames = np.concatenate([g.to_frames(clip.video), frames], axis=2)
            fps = g.output_fps(run, clip)
            path = Path(args.out) if args.out else _default_out(run, clip, args)
            g.write_mp4(path, frames, fps, codec=args.codec)
            if args.save_codes:
                import torch

                torch.save({"family": run.family, "codes": out.codes, "condition": out.condition, "prompt": prompt,
                            "seed": args.seed, "stats": out.stats, "ckpt": str(run.ckpt), "weights": run.weights},
                           path.with_suffix(".pt"))
    except (ConfigError, FileNotFoundError, ValueError, IndexError) as exc:
        print(f"sample error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    f, h, w, _ = frames.shape
    detail = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.stats.items())
    said = repr(prompt) if run.text_conditioned else "none (the model has no text conditioning)"
    print(f"{run.family} {run.cfg.model.name} ({run.weights} weights of {run.ckpt}); prompt: {said}")
    print(f"sampling: {detail}")
    sec = out.seconds
    print(f"timing: load {load_s:.2f} s, generate {sec['generate']:.2f} s, decode {sec['decode']:.2f} s, "
          f"total {total:.2f} s (device {run.device})")
    print(f"wrote {path.resolve()} ({f} frames, {w}x{h}, {fps:g} fps, {args.codec})")
    return 0


if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
