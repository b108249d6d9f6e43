"""Data preparation: turn raw data into training shards.

    python -m nemo_ext.cli.prep sample --recipe general [hydra overrides ...]
        the procedural sample world of a recipe (its task's world), written where its training run
        looks (data.sample_dir, default data/sample/<variant>/) at the recipe's clip size; overrides
        such as data.sample_num_videos=256 or data.height=128 change it
    python -m nemo_ext.cli.prep sample --out DIR [--variant general --num-videos N ...]
        the same generator with explicit parameters, anywhere (--variant: any registered world)
    python -m nemo_ext.cli.prep <source> --raw DIR --out DIR [options] [hydra overrides]
        a converter (the sources are listed below, registered by the modules of data_prep/): raw data
        -> validated clip shards; clip length/size/fps/resize mode default to the source's recipe's
        data.* values (--recipe)
    python -m nemo_ext.cli.prep latents --from <video shards> --out DIR [--recipe general] [overrides]
        precompute tokenizer latents + T5 embeddings (data.kind=latent trains on them)
    python -m nemo_ext.cli.prep tokens --from <video shards> --out DIR [--recipe general --family ar] [overrides]
        AR family: precompute discrete tokenizer tokens (+ T5 embeddings when the model cross-attends)
    python -m nemo_ext.cli.prep train-tokenizer --out FILE [--recipe general --family ar] [--data SHARDS] [--steps N]
        train the built-in FSQ tokenizer (model.tokenizer.path null) on the sample world or video
        shards and save its weights (use them with model.tokenizer.builtin_weights=FILE)

The converters are resumable (re-run the same command) and write report.jsonl (one line per rejected
input) and manifest.json (shards, counts, sha256 and every signal's statistics) into OUT.
Exit codes: 0 ok, 1 no clip written, 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _sample(args) -> int:
    if args.out:
        from nemo_ext.worlds import generate

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


def _fps_arg(text: str) -> float | None:
    """``--fps``: a positive number, or ``source`` to keep each video's own frame rate."""
    if text.strip().lower() in ("source", "none", "null"):
        return None
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of frames per second or 'source', got {text!r}") from e
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    """``--max-shard-bytes``: an integer with an optional K/M/G/T (binary) suffix, e.g. 512M."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = int(float(t[: len(t) - len(suffix)]) * units[suffix])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1073741824 or 1G, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {text!r}")
    return value


def _add_source_arguments(p: argparse.ArgumentParser, source) -> None:
    """The options every converter shares (inputs, clips, sharding), then the source's own."""
    p.add_argument("--raw", required=True, help="input folder")
    p.add_argument("--out", required=True, help="output folder for the shards (not RAW)")
    p.add_argument("--recipe", default=source.recipe,
                   help=f"recipe whose data.* values are the clip defaults (default {source.recipe})")
    p.add_argument("--family", default="diffusion", choices=["diffusion", "ar"])
    clip = p.add_argument_group("clips (default: the recipe's data.num_frames/height/width/fps/resize_mode)")
    clip.add_argument("--clip-frames", type=int, default=None, help="frames per clip, 1 + ck (c: the tokenizer's time "
                      "compression)")
    clip.add_argument("--fps", type=_fps_arg, default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS if source.keeps_source_fps else
                      "resample clips to this frame rate, or 'source' to keep each video's own")
    clip.add_argument("--height", type=int, default=None, help="clip height, a multiple of 16")
    clip.add_argument("--width", type=int, default=None, help="clip width, a multiple of 16")
    clip.add_argument("--resize-mode", choices=["crop", "pad"], default=None)
    clip.add_argument("--clips-per-video", type=int, default=0 if source.all_clips else 1,
                      help=f"evenly spaced non-overlapping clips per input; 0 = all of them (default "
                      f"{0 if source.all_clips else 1})")
    clip.add_argument("--codec", choices=["h264", "vp9"], default="h264",
                      help="h264 (NVDEC on GPU, default) or vp9 (DALI's CPU decoder reads it)")
    out = p.add_argument_group("sharding")
    out.add_argument("--videos-per-unit", type=int, default=32, help="input videos per resumable work unit")
    out.add_argument("--max-shard-bytes", type=_bytes_arg, default=1 << 30, help="shard size bound (default 1G)")
    out.add_argument("--max-clips-per-shard", type=int, default=1000)
    out.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="parallel processes (does not change the output)")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    source.add_arguments(p.add_argument_group(f"{source.name} source"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (e.g. data.height=256)")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _convert(source, args) -> int:
    """One converter run: checks, the recipe's clip defaults, the source, the summary."""
    raw, out = Path(args.raw), Path(args.out)
    if not raw.is_dir():
        return _fail(f"--raw {raw} is not a directory")
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory")
    if out.resolve() == raw.resolve():
        return _fail(f"--out {out} is the input folder --raw; write the shards to another folder")
    if source.keeps_source_fps and getattr(args, "fps", None) is not None:
        return _fail(f"--fps {args.fps:g}: {source.name} keeps each episode's own frame rate (a row of its signals is "
                     "one recorded step; a clip resampled in time would need invented ones)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from nemo_ext.config.compose import ConfigError, compose, to_typed

    try:
        cfg = to_typed(compose(args.recipe, args.family, args.overrides))
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    try:
        result = source.run(args, cfg)
    except ValueError as exc:  # the converters' PrepError and their option errors are ValueErrors
        return _fail(str(exc))
    unit = source.unit
    print(f"clips written: {result.num_clips} (from {result.num_videos_ok} of {result.num_videos} {unit}; "
          f"{result.spec.clip_frames} frames at {result.spec.width}x{result.spec.height}, {result.spec.codec})")
    print(f"{unit} rejected: {result.num_rejected} (one line each in {result.report})")
    if result.num_source_issues:
        print(f"source rows naming no video: {result.num_source_issues} (also in {result.report})")
    for line in source.summary(out):
        print(line)
    print(f"shards: {result.num_shards}" + (f" ({result.units_skipped} of {result.num_units} work units were "
                                            "already done)" if result.units_skipped else ""))
    print(f"output: {result.out_dir}")
    if result.num_clips == 0:
        print(f"error: no clip was written; see {result.report} for why each input was rejected", file=sys.stderr)
        return 1
    return 0


def _latents(args, extra) -> int:
    import torch

    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.data.latents import precompute_latents
    from nemo_ext.data.shards import ShardError

    try:
        cfg = to_typed(compose(args.recipe, args.family, list(args.overrides) + list(extra)))
        out = precompute_latents(cfg, args.src, args.out, batch_size=args.batch_size,
                                 dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (ConfigError, ShardError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"latent shards written to {out} (train with data.kind=latent data.path={out})")
    return 0


def _discrete_tokenizer_cfg(cfg):
    """``cfg.model.tokenizer`` when it is a discrete (AR family) tokenizer, else None."""
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    tok = getattr(cfg.model, "tokenizer", None)
    return tok if isinstance(tok, DiscreteTokenizerConfig) else None


def _tokens(args, extra) -> int:
    import torch

    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.data.shards import ShardError
    from nemo_ext.data.tokens import precompute_tokens

    try:
        cfg = to_typed(compose(args.recipe, args.family, list(args.overrides) + list(extra)))
        if _discrete_tokenizer_cfg(cfg) is None:
            return _fail(f"model={getattr(cfg.model, 'name', '?')} has no discrete tokenizer: token shards are for the "
                         "AR family (--family ar); the diffusion family uses `prep latents`")
        out = precompute_tokens(cfg, args.src, args.out, batch_size=args.batch_size,
                                dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (ConfigError, ShardError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"token shards written to {out} (train with data.kind=tokens data.path={out})")
    return 0


def _train_tokenizer(args, extra) -> int:
    from nemo_ext.config.compose import ConfigError, compose, to_typed
    from nemo_ext.data.shards import ShardError
    from nemo_ext.tokenizers.discrete import train_fsq_tokenizer

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = to_typed(compose(args.recipe, args.family, list(args.overrides) + list(extra)))
        tok = _discrete_tokenizer_cfg(cfg)
        if tok is None:
            return _fail(f"model={getattr(cfg.model, 'name', '?')} has no discrete tokenizer: train-tokenizer trains the "
                         "AR family's built-in FSQ tokenizer (--family ar)")
        if tok.path:
            return _fail(f"model.tokenizer.path={tok.path}: that is a Cosmos checkpoint; train-tokenizer trains the built-in "
                         "tokenizer (model.tokenizer.path=null)")
        src = args.data
        if src is None:
            from nemo_ext.training.data import data_source, ensure_sample_data

            ensure_sample_data(cfg)
            src = data_source(cfg)
        d = cfg.data
        result = train_fsq_tokenizer(tok, src, args.out, num_frames=d.num_frames, height=d.height, width=d.width,
                                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, val_src=args.val_data,
                                     val_clips=args.val_clips, resize_mode=d.resize_mode, seed=args.seed,
                                     progress=not args.no_progress)
    except (ConfigError, ShardError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"trained {result.steps} steps in {result.seconds:.0f}s on {result.train_videos} videos "
          f"({d.num_frames} frames at {d.width}x{d.height}): loss {result.loss_first:.4f} -> {result.loss_last:.4f}")
    print(f"held-out PSNR ({result.val_clips} clips, encode -> decode): {result.psnr_before:.2f} dB -> "
          f"{result.psnr_after:.2f} dB")
    print(f"weights: {result.out} (use them with model.tokenizer.builtin_weights={result.out})")
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
    from nemo_ext.data.sources import SOURCES

    for source in SOURCES.values():
        _add_source_arguments(sub.add_parser(source.name, help=source.help, description=source.description or source.help),
                              source)
    for name, family, sources, help_text, description, dtype_help in (
        ("latents", "diffusion", "`prep videos`", "video shards -> latent shards (tokenizer latents + T5 embeddings, precomputed)",
         "Encode every clip of video shards with the recipe's tokenizer and text encoder (model.tokenizer.path, "
         "model.text_encoder.path; the tiny built-ins without paths) into latent shards; train on them with "
         "data.kind=latent data.path=<out>. On a GPU when one is visible.",
         "storage precision of latents/embeddings"),
        ("tokens", "ar", "`prep videos` / `prep sample`", "video shards -> token shards (AR family: discrete tokenizer tokens + T5 embeddings)",
         "Tokenize every clip of video shards with the recipe's discrete tokenizer (model.tokenizer: a Cosmos "
         "DV checkpoint directory, or the built-in FSQ tokenizer) into token shards (<key>.tokens.npy, uint16 for "
         "vocabularies up to 65,536), with the captions' T5 embeddings when the model cross-attends to text. "
         "On a GPU when one is visible.",
         "storage precision of T5 embeddings"),
    ):
        encode = sub.add_parser(name, help=help_text, description=description)
        encode.add_argument("--from", dest="src", required=True, help=f"video shard directory (from {sources})")
        encode.add_argument("--out", required=True, help=f"{name[:-1]} shard directory")
        encode.add_argument("--recipe", default="general")
        encode.add_argument("--family", default=family, choices=["diffusion", "ar"])
        encode.add_argument("--batch-size", type=int, default=4)
        encode.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help=dtype_help)
        encode.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., data.num_frames=...)")
    train_tok = sub.add_parser(
        "train-tokenizer", help="train the AR family's built-in FSQ tokenizer on sample data or video shards",
        description="Train the built-in FSQ video tokenizer of the recipe's model.tokenizer (path: null) with an L1 + MSE "
        "reconstruction loss on the recipe's clips (data.num_frames/height/width) and save its weights; "
        "report the PSNR on held-out clips before and after. A few hundred steps take minutes on a CPU.",
    )
    train_tok.add_argument("--out", required=True, help="weights file to write (.safetensors or .pt)")
    train_tok.add_argument("--recipe", default="general")
    train_tok.add_argument("--family", default="ar", choices=["diffusion", "ar"])
    train_tok.add_argument("--data", default=None,
                           help="video shards to train on (default: the recipe's data.path or sample world)")
    train_tok.add_argument("--val-data", default=None,
                           help="held-out video shards (default: the last --val-clips videos of --data)")
    train_tok.add_argument("--val-clips", type=int, default=8, help="held-out clips for the PSNR")
    train_tok.add_argument("--steps", type=int, default=300)
    train_tok.add_argument("--batch-size", type=int, default=4)
    train_tok.add_argument("--lr", type=float, default=2e-3)
    train_tok.add_argument("--seed", type=int, default=0)
    train_tok.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train_tok.add_argument("overrides", nargs="*", help="Hydra overrides (model.tokenizer.levels=..., data.height=...)")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # options after the Hydra overrides leave later overrides unparsed: they are overrides too
    if extra and (args.command == "sample" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "sample":
        return _sample(args)
    if args.command == "latents":
        return _latents(args, extra)
    if args.command == "tokens":
        return _tokens(args, extra)
    if args.command == "train-tokenizer":
        return _train_tokenizer(args, extra)
    args.overrides = list(args.overrides) + extra
    return _convert(SOURCES.get(args.command), args)

if __name__ == "__main__":
    from nemo_ext.utils.console import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
