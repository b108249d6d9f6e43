"""Convert checkpoints between diffusers format and ours.

    python -m nemo_ext.cli.convert import --from <diffusers dir> --to <checkpoint dir> [--model dit_7b]
        a CosmosTransformer3DModel folder (or a pipeline folder holding transformer/) -> a sharded
        checkpoint that loads at any TP/PP layout: train from it with trainer.init_from=<dir>
    python -m nemo_ext.cli.convert export --from <checkpoint|run dir> --to <diffusers dir> [--weights auto|ema|raw]
        any of our checkpoints -> a diffusers folder (EMA weights when the checkpoint has them)

--model checks that the imported weights have the architecture of a model preset (recipes/_base/model).

LoRA runs (strategy=lora) checkpoint only their adapters (and the task modules that train fully);
merge folds them into the base they were trained on (recorded in the checkpoint; --base overrides)
and writes a normal checkpoint, which exports like any other (either family):

    python -m nemo_ext.cli.convert merge --from <adapter checkpoint|LoRA run dir> --to <checkpoint dir> [--base <dir>] [--weights auto|ema|raw]

Autoregressive family (released Cosmos-1 AR ``model.pt`` files; --family auto detects it from the source):

    python -m nemo_ext.cli.convert import --family ar --from <model.pt or its folder> --to <checkpoint dir> --model ar_4b
    python -m nemo_ext.cli.convert export --from <AR checkpoint|run dir> --to <model.pt or folder> [--weights auto|ema|raw]
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
    imp.add_argument("--model", default=None, help="model preset the weights must match (e.g. dit_7b; required for ar)")
    imp.add_argument("--family", default="auto", choices=["auto", "diffusion", "ar"],
                     help="auto: a .pt/.pth/.safetensors file (or a folder with model.pt) is a Cosmos AR checkpoint")
    exp = sub.add_parser("export", help="our checkpoint -> diffusers")
    exp.add_argument("--from", dest="src", required=True)
    exp.add_argument("--to", dest="dst", required=True)
    exp.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"])
    exp.add_argument("--family", default="auto", choices=["auto", "diffusion", "ar"],
                     help="auto: the family recorded in the checkpoint")
    mrg = sub.add_parser("merge", help="LoRA adapter checkpoint + its base -> a full checkpoint")
    mrg.add_argument("--from", dest="src", required=True, help="adapter checkpoint, or a LoRA run directory (its last)")
    mrg.add_argument("--to", dest="dst", required=True)
    mrg.add_argument("--base", default=None, help="the base checkpoint (default: the one recorded in the adapter checkpoint)")
    mrg.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                     help="auto: the EMA of the trained tensors when the checkpoint has one")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "merge":
        return _main_merge(args)
    if _family(args) == "ar":
        return _main_ar(args)

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


def _family(args) -> str:
    if args.family != "auto":
        return args.family
    from pathlib import Path

    src = Path(args.src)
    if args.command == "import":
        is_ar = src.is_file() and src.suffix in (".pt", ".pth", ".safetensors")
        return "ar" if is_ar or (src.is_dir() and (src / "model.pt").is_file()) else "diffusion"
    try:
        from megatron.core import dist_checkpointing

        from nemo_ext.training.checkpoint import resolve_checkpoint

        meta = dist_checkpointing.load_content_metadata(str(resolve_checkpoint(str(src)))) or {}
        return (meta.get("model") or {}).get("family", "diffusion")
    except Exception:  # noqa: BLE001 - the chosen path reports a missing or broken checkpoint
        return "diffusion"


def _main_ar(args) -> int:
    from nemo_ext.checkpoint.cosmos_ar import ConversionError, export_cosmos_ar, import_cosmos_ar
    from nemo_ext.config.compose import ConfigError
    from nemo_ext.models.ar.config import ar_preset

    try:
        if args.command == "import":
            if not args.model:
                raise ConfigError("--model is required for an AR import (model.pt carries no config): e.g. --model ar_4b")
            cfg = import_cosmos_ar(args.src, args.dst, ar_preset(args.model))
            print(f"imported {args.src} -> {args.dst} (model={cfg.name})")
        else:
            chosen = export_cosmos_ar(args.src, args.dst, weights=args.weights)
            print(f"exported {chosen} weights of {args.src} -> {args.dst}")
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"convert error: {exc}", file=sys.stderr)
        return 2
    return 0


def _main_merge(args) -> int:
    from nemo_ext.checkpoint.lora import ConversionError, merge_lora_checkpoint

    try:
        summary = merge_lora_checkpoint(args.src, args.dst, base=args.base, weights=args.weights)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"convert error: {exc}", file=sys.stderr)
        return 2
    print(f"merged the LoRA adapters ({summary['weights']} weights, scale {summary['scale']:g}) of {summary['adapters']} "
          f"into {summary['merged_weights']} weight tensors of {summary['base']} -> {args.dst}")
    return 0


if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
