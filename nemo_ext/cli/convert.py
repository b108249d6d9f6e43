"""Convert checkpoints between diffusers format and ours.

    python -m nemo_ext.cli.convert import --from <diffusers dir> --to <checkpoint dir> [--model dit_7b]
        a CosmosTransformer3DModel folder (or a pipeline folder holding transformer/) -> a sharded
        checkpoint that loads at any TP/PP layout: train from it with trainer.init_from=<dir>
    python -m nemo_ext.cli.convert export --from <checkpoint|run dir> --to <diffusers dir> [--weights auto|ema|raw]
        any of our checkpoints -> a diffusers folder (EMA weights when the checkpoint has them)

--model checks that the imported weights have the architecture of a model preset (recipes/_base/model).
"""

from __future__ import annotations

import argparse
import sys


def _preset(name: str):
    from nemo_ext.config.compose import compose, to_typed

    return to_typed(compose("general", "diffusion", [f"model={name}"])).model


def _matching_presets(arch: dict) -> list[str]:
    from nemo_ext.config.compose import recipes_dir
    from nemo_ext.models.dit.config import architecture_diff

    out = []
    for path in sorted((recipes_dir() / "_base" / "model").glob("dit_*.yaml")):
        try:
            if not architecture_diff(arch, _preset(path.stem).architecture()):
                out.append(path.stem)
        except Exception:  # noqa: BLE001 - a broken preset must not block a conversion
            continue
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemo_ext.cli.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="diffusers -> our sharded checkpoint")
    imp.add_argument("--from", dest="src", required=True)
    imp.add_argument("--to", dest="dst", required=True)
    imp.add_argument("--model", default=None, help="model preset the weights must match (e.g. dit_7b)")
    exp = sub.add_parser("export", help="our checkpoint -> diffusers")
    exp.add_argument("--from", dest="src", required=True)
    exp.add_argument("--to", dest="dst", required=True)
    exp.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"])
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from nemo_ext.checkpoint import ConversionError, export_diffusers, import_diffusers
    from nemo_ext.config.compose import ConfigError

    try:
        if args.command == "import":
            expected = _preset(args.model) if args.model else None
            cfg = import_diffusers(args.src, args.dst, expected=expected)
            matches = _matching_presets(cfg.architecture())
            print(f"imported {args.src} -> {args.dst}")
            print(f"architecture matches model presets: {matches or 'none (pass model.* overrides when training)'}")
        else:
            chosen = export_diffusers(args.src, args.dst, weights=args.weights)
            print(f"exported {chosen} weights of {args.src} -> {args.dst}")
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"convert error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
