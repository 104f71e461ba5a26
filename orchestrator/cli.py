"""`vitsweep`: the command line. Subcommands: train, run, resume, report, submit, data show, bench.

`train`, `data` and `bench` never import Ray (they run on GPU boxes without it); the sweep commands
import it when called.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from finetune import __version__

    from .eval_cli import add_eval_commands
    from .train_cli import add_train_command

    parser = argparse.ArgumentParser(
        prog="vitsweep",
        description="Fine-tune pretrained Vision Transformers with efficient attention variants and sweep them with "
        "Ray Tune. Variants: softmax, linformer, performer, nystrom, atrous_linear.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"vitsweep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_command(sub)
    add_eval_commands(sub)  # eval, fidelity
    try:
        from .cli_sweep import add_sweep_commands
    except ImportError as err:  # the sweep commands need Ray; train/data/bench do not
        _add_unavailable(sub, ("run", "resume", "report", "submit"), err)
    else:
        add_sweep_commands(sub)
    _add_data_command(sub)
    _add_bench_command(sub)
    return parser


def _add_unavailable(sub, names, err) -> None:
    for name in names:
        p = sub.add_parser(name, help=f"(unavailable: {err})")
        p.set_defaults(func=lambda args, e=err: _fail(f"`vitsweep {args.command}` needs Ray Tune: {e}; pip install 'ray[tune]'"))


def _fail(message: str) -> int:
    print(f"vitsweep: error: {message}", file=sys.stderr)
    return 2


def _add_data_command(sub) -> None:
    p = sub.add_parser("data", help="inspect a data source or build a decode-once cache")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    show = dsub.add_parser("show", help="plot a grid of preprocessed, denormalised images with class names")
    show.add_argument("--data", required=True, metavar="SPEC", help="data spec, as for `vitsweep train --data`")
    show.add_argument("--out", required=True, metavar="FILE.png", help="PNG to write")
    show.add_argument("--n", type=int, default=16, help="number of images")
    show.add_argument("--split", choices=("train", "val"), default="train", help="which split (train shows augmentation)")
    show.add_argument("--model", default="vit_tiny_patch16_224", help="timm model whose preprocessing to use")
    show.add_argument("--img-size", type=int, default=None, help="input resolution")
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=_data_show)
    cache = dsub.add_parser(
        "cache",
        help="decode every image once into a uint8 memory-mapped cache; train from it with --data cache:DIR",
        description="Decode the train and val images of SPEC once, resize (shorter side to --size, centre crop) and "
        "store them as uint8 .npy arrays with labels and a manifest (counts, sizes, sha256). Disk: "
        "3 * size^2 bytes per image (196,608 at 256). Progress: a bar on a terminal, else a line every few "
        "seconds. Interrupted (Ctrl-C, a signal, a lost machine)? Run the same command again: it continues "
        "from the finished shards kept in .DIR.partial beside DIR.",
    )
    cache.add_argument("--data", required=True, metavar="SPEC", help="data spec of the source, as for `vitsweep train --data`")
    cache.add_argument("--out", required=True, metavar="DIR", help="cache directory to create (must not exist or be empty)")
    cache.add_argument("--size", type=int, default=256, help="side of the stored square images (default 256, for 224 px models)")
    cache.add_argument("--num-workers", type=int, default=None, metavar="N", help="decoding processes (default: min(8, CPUs))")
    cache.add_argument("--skip-bad-images", action="store_true", help="image folders: drop unreadable files instead of failing")
    cache.add_argument("--seed", type=int, default=0, help="seed of a synthetic source without seed=")
    cache.add_argument("--shard-size", type=int, default=1024, metavar="N",
                       help="images per shard (default 1024): an interrupted build, run again with the same "
                       "options, continues after the last finished shard")
    cache.set_defaults(func=_data_cache)


def _data_show(args: argparse.Namespace) -> int:
    from finetune.data import show_data

    from finetune.outputs import check_output_file

    if args.n < 1:
        return _fail(f"--n={args.n} must be >= 1")
    check_output_file(args.out, (".png",))  # the output rule: never over another command's files or a link
    path = show_data(args.data, args.out, n=args.n, model_name=args.model, img_size=args.img_size, split=args.split, seed=args.seed)
    print(path)
    return 0


def _data_cache(args: argparse.Namespace) -> int:
    from finetune.data import build_cache
    from finetune.data.cache import describe

    manifest = build_cache(
        args.data, args.out, size=args.size, num_workers=args.num_workers, skip_bad_images=args.skip_bad_images,
        seed=args.seed, progress=sys.stderr.isatty(), shard_size=args.shard_size,
    )
    print(describe(manifest))
    print(f"train from it with: --data cache:{args.out}")
    return 0


BENCHMARKS = {
    "attention": "forward+backward time and memory per variant vs SDPA, by token count",
    "train": "vitsweep's training step vs a bare timm loop (same model, batch, data)",
    "data": "JPEG decode + timm augmentation vs the decode-once cache",
    "sweep": "a sweep's wall time vs the ideal (sum of trial times / concurrency)",
    "gpu": "the prepared GPU run: sync check, ViT-S/16 steps (eager/compiled, 224/384 px), MFU, JPEG vs cache",
    "kernels": "each variant's bf16/fp16 autocast error vs fp32 and its fullgraph compile (CPU)",
    "storage": "the smoke sweep with S3 storage (moto on 127.0.0.1) vs local disk, interleaved",
}


def _bench_description() -> str:
    return "Speed and memory benchmarks (measured tables: BENCHMARKS.md):\n" + "\n".join(
        f"  {name:<10} {what}" for name, what in BENCHMARKS.items()
    ) + "\n\n`vitsweep bench NAME --help` lists a benchmark's options."


def _add_bench_command(sub) -> None:
    # add_help=False: `bench NAME --help` reaches the benchmark's own parser; `bench --help` lists them.
    p = sub.add_parser("bench", help="speed and memory benchmarks (see BENCHMARKS.md)", add_help=False,
                       description=_bench_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", choices=tuple(BENCHMARKS), metavar="NAME",
                   help="benchmark to run: " + ", ".join(BENCHMARKS))
    p.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: the benchmark's options)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_bench, bench_parser=p)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    if args.which is None:
        args.bench_parser.print_help(None if args.help else sys.stderr)
        return 0 if args.help else 2
    try:
        module = importlib.import_module(f"benchmarks.{args.which}")
    except ModuleNotFoundError as err:
        return _fail(f"benchmark {args.which!r} is not available: {err}")
    return int(module.main((["--help"] if args.help else []) + args.rest) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from finetune.errors import VitsweepError

    try:
        return int(args.func(args) or 0)
    except VitsweepError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130
    except OSError as err:  # the disk, not vitsweep: full, read-only, quota, permissions
        from finetune.outputs import disk_error_message

        message = disk_error_message(err)
        if message is None:
            raise
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
