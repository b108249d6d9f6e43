"""Data preparation: turn raw data into training shards.

    python -m nemo_ext.cli.prep sample --recipe general [hydra overrides ...]
        the embedded procedural sample world of a recipe, written where its training run looks
        (data.sample_dir, default data/sample/<variant>/) at the recipe's clip size; overrides
        such as data.sample_num_videos=256 or data.height=128 change it
    python -m nemo_ext.cli.prep sample --out DIR [--variant general --num-videos N ...]
        the same generator with explicit parameters, anywhere
"""

from __future__ import annotations

import argparse
import sys


def _sample(args) -> int:
    if args.out:
        from data_prep.sample_world import generate

        generate(out_dir=args.out, variant=args.variant, num_videos=args.num_videos, num_frames=args.num_frames,
                 height=args.height, width=args.width, fps=args.fps, seed=args.seed, workers=args.workers)
        print(f"sample world written to {args.out}")
        return 0
    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.training.data import ensure_sample_data

    try:
        cfg = to_typed(compose(args.recipe, args.family, args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    ensure_sample_data(cfg)
    print(f"sample world ready in {cfg.data.sample_dir}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemo_ext.cli.prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="generate the procedural sample world (no download)")
    sample.add_argument("--recipe", default="general", help="use this recipe's sample-world settings")
    sample.add_argument("--family", default="diffusion", choices=["diffusion", "ar"])
    sample.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (e.g. data.sample_num_videos=256)")
    explicit = sample.add_argument_group("explicit parameters (with --out, instead of a recipe)")
    explicit.add_argument("--out", default=None, help="output directory")
    explicit.add_argument("--variant", default="general")
    explicit.add_argument("--num-videos", type=int, default=64)
    explicit.add_argument("--num-frames", type=int, default=33)
    explicit.add_argument("--height", type=int, default=64)
    explicit.add_argument("--width", type=int, default=64)
    explicit.add_argument("--fps", type=float, default=8)
    explicit.add_argument("--seed", type=int, default=0)
    explicit.add_argument("--workers", type=int, default=1, help="parallel render/encode processes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return _sample(args) if args.command == "sample" else 1


if __name__ == "__main__":
    sys.exit(main())
