"""`vitsweep train`: argparse options that map one-to-one onto `finetune.config.TrainConfig` keys.

This module builds no model: it turns flags (and an optional YAML file) into a validated config and
hands it to `finetune.train.run_training`. The same option table serves sweep configs' fixed values.
The attention flags are derived from the registered variants' declared hyperparameters; a plug-in
variant's are set with the generic ``--attn KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune.config import DEFAULT_MODEL, DEFAULT_PRETRAINED_TAG, PRECISIONS, VARIANTS, TrainConfig
from finetune.errors import ConfigError
from finetune.io_utils import json_safe, move_aside
from finetune.models.attention import declared_hparams
from finetune.models.attention.flags import add_hparam_arguments
from finetune.timing import data_bound_line, is_data_bound
from finetune.yaml_io import parse_yaml, read_yaml_file

S = argparse.SUPPRESS


def add_attention_options(group) -> None:
    """--variant, --attn KEY=VALUE, and one flag per hyperparameter name of the registered variants."""
    group.add_argument(
        "--variant", default=S, metavar="NAME|MODULE:CLASS",
        help=f"attention mechanism: {', '.join(VARIANTS)} (default softmax), or a plug-in's import path "
        "'package.module:ClassName' (an AttentionBase subclass)",
    )
    group.add_argument(
        "--attn", action="append", default=None, metavar="KEY=VALUE", dest="attn_items",
        help="a hyperparameter of the variant, VALUE in YAML (e.g. --attn dilation=[1,2]); repeatable; "
        "the way to set a plug-in's hyperparameters",
    )
    add_hparam_arguments(group)


def add_config_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig key as a flag (default: suppressed, so only what the user typed overrides)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default=S, help=f"timm ViT name (default {DEFAULT_MODEL})")
    m.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=S,
                   help="load timm/<model>.<tag> from the Hugging Face hub (default on; --no-pretrained for random init)")
    m.add_argument("--pretrained-tag", default=S,
                   help=f"timm pretrained tag (default {DEFAULT_PRETRAINED_TAG}: ImageNet-21k only, never fine-tuned on ImageNet-1k)")
    m.add_argument("--weights", default=S, metavar="PATH", help="local .safetensors, timm .pth or JAX .npz checkpoint instead of the hub")
    m.add_argument("--img-size", type=int, default=S, help="input resolution (position embeddings are resampled)")
    m.add_argument("--patch-size", type=int, default=S, help="patch size (patch embedding is resampled)")
    m.add_argument("--depth", type=int, default=S, help="keep only the first N blocks (tiny smoke/test models)")
    m.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate (default 0)")

    add_attention_options(p.add_argument_group("attention"))

    d = p.add_argument_group("data")
    d.add_argument("--data", default=S, metavar="SPEC",
                   help="imagenet100[:DIR] | hf:<hub id or save_to_disk dir> | imagefolder:<dir with train/ val/> | "
                        "synthetic[:classes=..,size=..,n=..,n_val=..] | cache:<dir from `vitsweep data cache`> "
                        "(default synthetic)")
    d.add_argument("--augment", choices=("timm", "none"), default=S,
                   help="timm: timm's training transform (RandomResizedCrop, flip, colour jitter); none: eval transform")
    d.add_argument("--scale", type=float, nargs=2, default=S, metavar=("MIN", "MAX"), help="RandomResizedCrop scale range")
    d.add_argument("--hflip", type=float, default=S, help="horizontal flip probability")
    d.add_argument("--color-jitter", type=float, default=S, help="colour jitter strength")
    d.add_argument("--num-workers", type=int, default=S, help="DataLoader workers (default 2)")
    d.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=S,
                   help="skip (and count) unreadable images instead of failing")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=S, help="epochs (default 10)")
    o.add_argument("--batch-size", type=int, default=S, help="batch size (default 64)")
    o.add_argument("--lr", type=float, default=S, help="peak AdamW learning rate (default 1e-3)")
    o.add_argument("--min-lr", type=float, default=S, help="final cosine learning rate")
    o.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (not on norms/biases)")
    o.add_argument("--warmup-epochs", type=float, default=S, help="linear warmup length in epochs")
    o.add_argument("--layer-decay", type=float, default=S, help="layer-wise lr decay in (0, 1]")
    o.add_argument("--label-smoothing", type=float, default=S, help="label smoothing")
    o.add_argument("--mixup", type=float, default=S, help="mixup alpha (0: off)")
    o.add_argument("--cutmix", type=float, default=S, help="cutmix alpha (0: off)")
    o.add_argument("--clip-grad", type=float, default=S, help="gradient norm clip")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=S, help="seed for init, data order and augmentation")
    r.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N")
    r.add_argument("--precision", choices=PRECISIONS, default=S, help="fp32 | bf16 (autocast) | fp16 (CUDA, GradScaler)")
    r.add_argument("--topk", type=int, nargs="+", default=S, help="top-k accuracies to report (default 1 5)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S, help="torch.compile the model")
    r.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=S,
                   help="fp32 matmuls on CUDA as TF32 tensor-core ops (default on; recorded in result.json)")
    r.add_argument("--max-train-batches", type=int, default=S, help="cap batches per epoch (smoke runs)")
    r.add_argument("--max-val-batches", type=int, default=S, help="cap validation batches")
    r.add_argument("--log-interval", type=int, default=S, help="steps between progress updates (host syncs)")
    r.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=S,
                   help="evaluate once before the first epoch: swap/acc{k}, swap/loss")


def config_from_args(args: argparse.Namespace, yaml_path: str | None = None) -> TrainConfig:
    """YAML file values, then flags the user typed, then ``--attn`` items, over TrainConfig's defaults."""
    values: Dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml_mapping(yaml_path))
    names = set(TrainConfig.field_names()) | set(declared_hparams())
    values.update({k: v for k, v in vars(args).items() if k in names})
    items = parse_attn_items(getattr(args, "attn_items", None))
    if items:
        attn = values.get("attn") or {}
        if not isinstance(attn, dict):
            raise ConfigError(f"attn={attn!r} must be a mapping of the variant's hyperparameters")
        for key in items:
            values.pop(key, None)  # --attn wins over a flat key of the same name
        values["attn"] = {**attn, **items}
    return TrainConfig.from_dict(values)


def parse_attn_items(items: Optional[List[str]]) -> Dict[str, Any]:
    """``["dilation=[1,2]", "window=3"]`` -> ``{"dilation": [1, 2], "window": 3}`` (values parsed as YAML)."""
    parsed: Dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--attn {item!r}: expected KEY=VALUE (VALUE in YAML, e.g. --attn dilation=[1,2])")
        parsed[key] = parse_yaml(raw, f"--attn {item!r}: VALUE")
    return parsed


def load_yaml_mapping(path: str) -> Dict[str, Any]:
    """The mapping of config keys in YAML file `path` (bounded, UTF-8, no aliases: `finetune.yaml_io`)."""
    data = read_yaml_file(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune one model without Ray",
        description="Fine-tune a timm ViT with the chosen attention variant; writes result.json, "
        "weights.safetensors + weights.json, tb/, preprocessing.json and checkpoint/ under --out.",
    )
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory; must not exist or be empty, unless --resume or --overwrite")
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys (flags override it)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in DIR from DIR/checkpoint; the config must be the checkpoint's, "
                      "except keys that do not change the result (epochs may grow, num_workers, log_interval, "
                      "max_*_batches, device, compile, eval_at_start)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh in a DIR that holds files: DIR is first moved aside to DIR.old-<time> "
                      "(nothing is deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print the final status and metrics as strict JSON on stdout (non-finite values are null)")
    add_config_options(p)
    p.set_defaults(func=_train)


TRAIN_RUN_FILES = ("result.json", "weights.safetensors", "checkpoint", "preprocessing.json", "tb")


def check_out_dir(out: str, *, resume: bool, overwrite: bool) -> Path:
    """The `--out` directory, refused early (the output rule, `finetune.outputs`): empty text, a link,
    a file, under a file or not writable; another command's output or an experiment (always); a
    directory that already holds files without --resume or --overwrite; any link inside it."""
    from finetune.outputs import check_output_dir, describe_contents

    path = Path(out).expanduser() if out.strip() and "\x00" not in out else None
    if resume and path is not None and not path.is_symlink() and not path.is_dir():
        raise ConfigError(f"--resume: {str(path)!r} does not exist; there is no run to continue")
    try:
        checked = check_output_dir(out, "train", legacy_own=TRAIN_RUN_FILES)
    except ConfigError:
        if path is None or resume or overwrite or not path.is_dir() or path.is_symlink():
            raise
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise ConfigError(
            f"--out {str(path)!r} already holds files ({shown}: {describe_contents(path)}); choose another --out "
            "(--resume and --overwrite apply only to a directory `vitsweep train` made)") from None
    path = checked.path
    if resume or not checked.reused:
        return path
    if not overwrite:
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise ConfigError(
            f"--out {str(path)!r} already holds files ({shown}: {describe_contents(path)}); pass --resume to continue that run, "
            "--overwrite to move it aside to DIR.old-<time> and start afresh, or choose another --out"
        )
    return path


def lock_out_dir(out: Path):
    """The exclusive lock of a train `--out`: the experiment lock of `orchestrator.lock` (O_EXCL, the
    holder's pid checked, a dead holder's lock taken over), kept beside the directory as
    ``.<name>.vitsweep-train.lock`` so that --overwrite can move the directory aside while holding it.
    A second `vitsweep train` into the same --out is refused while the first runs. Returns the held
    lock; `release()` it at the end."""
    from .lock import ExperimentLock
    from .storage import resolve_storage

    out = Path(os.path.abspath(out))
    lock = ExperimentLock(resolve_storage(str(out.parent)), "train")
    lock.path = str(out.parent / f".{out.name}.vitsweep-train.lock")
    try:
        return lock.acquire()
    except ConfigError as err:
        holder = str(err).split(" by another driver: ", 1)[-1].split("; wait for it")[0]
        raise ConfigError(f"--out {str(out)!r} is in use by another `vitsweep train`: {holder}; wait for it to "
                          "end or choose another --out") from None


def _train(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0:
        return _train_locked(args)  # a torchrun worker other than rank 0: rank 0 checks and locks --out
    check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before the lock: no write
    lock = lock_out_dir(Path(args.out).expanduser())
    try:
        return _train_locked(args)
    finally:
        lock.release()


def _train_locked(args: argparse.Namespace) -> int:
    import json

    from finetune.distributed import DistContext
    from finetune.outputs import OutputDir
    from finetune.train import run_training

    cfg = config_from_args(args, args.config)
    # Under torchrun (WORLD_SIZE > 1): one DDP worker; rank 0 checks and writes --out (docs/distributed.md).
    dist = DistContext.from_env(cfg.device)
    main_rank = dist is None or dist.is_main
    out = check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite) if main_rank else Path(args.out)
    move = main_rank and args.overwrite and out.is_dir() and any(out.iterdir())

    def before_write() -> None:
        if move:
            moved = move_aside(out)
            print(f"vitsweep: --overwrite: moved the previous contents of {str(out)!r} to {str(moved)!r}", file=sys.stderr)
        if move or not (out / ".vitsweep-output.json").is_file():
            OutputDir(out, "train", reused=False).claim()

    resume_from = out / "checkpoint" if args.resume else None
    _show_epoch_lines()
    result = run_training(cfg, out, resume_from=resume_from, progress=not args.no_progress,
                          before_write=before_write if main_rank else None, dist=dist)
    if not main_rank:
        return 0
    final = {k: v for k, v in result["metrics"].items()
             if k.startswith(("val/", "train/", "cost/", "throughput/", "memory/", "time/"))}
    if args.json:
        final["data_bound"] = is_data_bound(result["metrics"])
        print(json.dumps(json_safe({"status": result["status"], "out": str(out), **final}), indent=2, default=str,
                         allow_nan=False))
        if final["data_bound"]:
            print(data_bound_line(result["metrics"]), file=sys.stderr)
    else:
        print(final_summary(result, out))
    return 0


class _EpochLines(logging.Handler):
    """The loop's per-epoch line on the current stderr (resolved per line, as pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _show_epoch_lines() -> None:
    """`vitsweep train` prints `finetune.loop.epoch_summary` once per epoch, beside the progress bar."""
    logger = logging.getLogger("finetune.loop")
    if not any(isinstance(h, _EpochLines) for h in logger.handlers):
        logger.addHandler(_EpochLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # once, also under --verbose


def final_summary(result: Dict[str, Any], out: Path) -> str:
    """Two lines: the status with the final accuracies and cost, and where the outputs are; a third
    when the last epoch was data-bound (`finetune.timing.data_bound_line`)."""
    m = result["metrics"]
    accs = "  ".join(f"{k.split('/')[1].replace('acc', 'acc@')} {100 * v:.2f}%" for k, v in m.items()
                     if k.startswith("val/acc") and isinstance(v, (int, float)))
    cost = f"{m['cost/gflops']:.3f} GFLOPs" if isinstance(m.get("cost/gflops"), (int, float)) else ""
    line = f"{result['status']}: epoch {m.get('epoch', 0)}  {accs}  {cost}".rstrip()
    text = f"{line}\noutputs: {out} (result.json, weights.safetensors, tb/; tensorboard --logdir {out / 'tb'})"
    data_bound = data_bound_line(m)  # finetune.timing: the rule and its threshold
    return text if data_bound is None else f"{text}\n{data_bound}"
