"""Data preparation: turn raw data into training shards.

    python -m nemo_ext.cli.prep sample --recipe general [hydra overrides ...]
        the embedded procedural sample world of a recipe, written where training looks for it
        (data.sample_dir, default data/sample/<variant>/) with the recipe's clip size
    python -m nemo_ext.cli.prep sample --variant general --out DIR [--num-videos N ...]
        the same generator with explicit parameters
"""

from __future__ import annotations

import argparse
import sys


def _sample(args) -> int:
    from data_prep.sample_world import generate

    if args.out:
        generate(
            out_dir=args.out,
            variant=args.variant or "general",
            num_videos=args.num_videos or 64,
            num_frames=args.num_frames or 33,
            height=args.height or 64,
            width=args.width or 64,
            fps=args.fps or 8,
            seed=args.seed,
            workers=args.workers,
        )
        print(f"sample world written to {args.out}")
        return 0
    from nemo_ext.config.compose import ConfigError, compose, to_typed

    try:
        cfg = to_typed(compose(args.recipe, args.family, args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    d = cfg.data
    generate(
        out_dir=d.sample_dir,
        variant=args.variant or d.sample_variant,
        num_videos=args.num_videos or d.sample_num_videos,
        num_frames=args.num_frames or d.sample_num_frames,
        height=args.height or d.height,
        width=args.width or d.width,
        fps=args.fps or 8,
        seed=args.seed,
        workers=args.workers,
    )
    print(f"sample world written to {d.sample_dir}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemo_ext.cli.prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="generate the procedural sample world (no download)")
    sample.add_argument("--recipe", default="general", help="take variant, clip size and directory from this recipe")
    sample.add_argument("--family", default="diffusion", choices=["diffusion", "ar"])
    sample.add_argument("--variant", default=None, help="sample-world variant (default: the recipe's)")
    sample.add_argument("--out", default=None, help="output directory (default: the recipe's data.sample_dir)")
    sample.add_argument("--num-videos", type=int, default=None)
    sample.add_argument("--num-frames", type=int, default=None)
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--fps", type=float, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--workers", type=int, default=1, help="parallel render/encode processes")
    sample.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (e.g. data.height=128)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "sample":
        return _sample(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
