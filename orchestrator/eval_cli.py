"""`vitsweep eval` and `vitsweep fidelity`: look at weights without training them (no Ray).

`eval` evaluates saved weights (or a run/trial directory holding them) on a data set with the
training metrics; ``--variant`` swaps the attention first (the accuracy at the swap). `fidelity`
compares attention variants with exact softmax on a model's own q, k, v, block by block, and draws
their attention maps. The computations live in `finetune.evaluate` and `finetune.fidelity`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune.outputs import check_output_dir


def _add_model_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--weights", metavar="PATH|DIR",
                   help="weights.safetensors with its sidecar, a run or trial directory holding one, or any "
                   "checkpoint `vitsweep train --weights` reads (then --model is needed)")
    m.add_argument("--model", help="timm ViT name (for weights without a sidecar, hub or random weights)")
    m.add_argument("--img-size", type=int, help="input resolution")
    m.add_argument("--patch-size", type=int, help="patch size")
    m.add_argument("--depth", type=int, help="keep only the first N blocks")
    m.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="without --weights: timm/<model>.<tag> from the Hugging Face hub (default off: random init)")
    m.add_argument("--pretrained-tag", default=None, help="timm pretrained tag (with --pretrained)")


def _add_data_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    d = p.add_argument_group("data and run")
    d.add_argument("--data", default="synthetic", metavar="SPEC", help="data spec, as for `vitsweep train --data`")
    d.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default {batch_size})")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data and of fresh random features/projections")


def add_eval_commands(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate saved (or swapped) weights with the training metrics",
        description="Evaluate weights on the validation split of --data: val/loss, val/acc{k}, cost/*, memory/*, "
        "throughput/eval_img_s. With --variant, the weights are swapped into that attention first (its own new "
        "parameters start fresh): the accuracy at the swap, before fine-tuning. --profile adds the inference profile "
        "(infer/*: latency at batch 1, img/s at a large batch, peak memory at batch 1/32/64/128).",
    )
    _add_model_options(p)
    a = p.add_argument_group("attention swap")
    a.add_argument("--variant", metavar="NAME|MODULE:CLASS", help="evaluate with this attention instead of the weights' own")
    a.add_argument("--attn", action="append", default=None, metavar="KEY=VALUE", help="a hyperparameter of --variant (repeatable)")
    _add_data_options(p, 64)
    p.add_argument("--max-batches", type=int, default=None, help="cap validation batches")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 5], help="top-k accuracies (default 1 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    p.add_argument("--profile", action="store_true",
                   help="also the inference profile: latency at batch 1, img/s at a large batch, peak memory at "
                   "batch 1/32/64/128 (infer/*; measured on CUDA, analytic on CPU)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/eval.json and TensorBoard scalars in DIR/tb")
    p.set_defaults(func=_eval)

    f = sub.add_parser(
        "fidelity", help="each variant's attention vs exact softmax on a model's own q, k, v",
        description="Run a ViT on a few batches, capture every block's q, k, v and report, per block and variant "
        "configuration, the relative error of the attention output against exact softmax, the softmax mass the "
        "variant computes exactly, and the logit spread; draw attention maps (softmax vs each variant's implied "
        "weights attend(q, k, I)). Writes fidelity.md, fidelity.csv, maps/*.png and tb/ under --out.",
    )
    _add_model_options(f)
    f.add_argument("--from", dest="from_dir", metavar="DIR", help="a trained run's directory (its weights.safetensors and sidecar)")
    v = f.add_argument_group("variant configurations (default: every built-in variant at its defaults)")
    v.add_argument("--variant", action=_ConfigAction, dest="configs", metavar="NAME",
                   help="a configuration; the --attn options after it set its hyperparameters (repeatable)")
    v.add_argument("--attn", action=_ConfigAction, dest="configs", metavar="KEY=VALUE",
                   help="a hyperparameter of the preceding --variant, VALUE in YAML")
    v.add_argument("--variants", action=_ConfigAction, dest="configs", metavar="A,B,..",
                   help="comma-separated variants, each at its defaults")
    _add_data_options(f, 8)
    f.add_argument("--batches", type=int, default=2, help="validation batches to capture (default 2)")
    f.add_argument("--maps", type=int, default=1, help="images whose attention maps are drawn (default 1; 0: none)")
    f.add_argument("--out", required=True, metavar="DIR", help="output directory")
    f.set_defaults(func=_fidelity)


class _ConfigAction(argparse.Action):
    """--variant / --attn / --variants in command-line order: [[variant, [KEY=VALUE, ...]], ...]; an
    --attn before any --variant is kept as [None, [item]] and refused when the command runs."""

    def __call__(self, parser, namespace, values, option_string=None):
        configs = list(getattr(namespace, self.dest) or [])
        if option_string == "--variants":
            configs += [[name.strip(), []] for name in values.split(",") if name.strip()]
            if not configs:
                configs.append(["", []])
        elif option_string == "--variant":
            configs.append([values, []])
        elif configs and configs[-1][0] is not None:
            configs[-1][1].append(values)
        else:
            configs.append([None, [values]])
        setattr(namespace, self.dest, configs)


def _source(args: argparse.Namespace, weights: Optional[str], variant: Optional[str] = None, attn=None):
    from finetune.errors import ConfigError
    from finetune.evaluate import ModelSource

    if weights is not None and args.pretrained:
        raise ConfigError("pass either --weights/--from or --pretrained, not both")
    return ModelSource(weights=weights, variant=variant, attn=attn or {}, model=args.model, img_size=args.img_size,
                       patch_size=args.patch_size, depth=args.depth, pretrained=args.pretrained,
                       pretrained_tag=args.pretrained_tag)


def _check_counts(**counts: Optional[int]) -> None:
    from finetune.errors import ConfigError

    for name, value in counts.items():
        if value is not None and value < (0 if name in ("num_workers", "maps", "seed") else 1):
            low = 0 if name in ("num_workers", "maps", "seed") else 1
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be an integer >= {low}")


def _eval(args: argparse.Namespace) -> int:
    from finetune.evaluate import describe_source, evaluate_source

    from .train_cli import parse_attn_items

    _check_counts(batch_size=args.batch_size, max_batches=args.max_batches, num_workers=args.num_workers, seed=args.seed)
    target = check_output_dir(args.out, "eval") if args.out is not None else None  # before any work
    source = _source(args, args.weights, args.variant, parse_attn_items(args.attn))
    describe_source(source)  # refuse bad weights / variant / --attn before any data is built
    result = evaluate_source(source, args.data, batch_size=args.batch_size, max_batches=args.max_batches,
                             topk=tuple(args.topk), device=args.device, precision=args.precision,
                             num_workers=args.num_workers, seed=args.seed, profile=args.profile)
    if target is not None:
        from finetune.io_utils import write_json
        from finetune.tb_writer import TBWriter

        target = check_output_dir(args.out, "eval")  # again: nothing else may have moved in meanwhile
        if target.reused and (target.path / "eval.json").is_file():
            print(f"vitsweep eval: replacing the eval.json of the previous eval in {str(target.path)!r}", file=sys.stderr)
        out = target.claim()
        write_json(out / "eval.json", result)
        with TBWriter(str(out / "tb")) as writer:
            writer.scalars(result["metrics"], step=0)
    print(json.dumps({**result["metrics"], "variant": result["arch"]["variant"],
                      "attn": result["arch"]["attn_hparams"]}, indent=2, default=str))
    return 0


def _configs(raw: Optional[List[List[Any]]]):
    from finetune.errors import ConfigError
    from finetune.fidelity import VariantConfig
    from finetune.models.attention import builtin_variants

    from .train_cli import parse_attn_items

    if not raw:
        return [VariantConfig.make(name) for name in builtin_variants()]
    configs = []
    for variant, items in raw:
        if variant is None:
            raise ConfigError(f"--attn {items[0]!r} comes before any --variant; put it after the variant it sets")
        configs.append(VariantConfig.make(variant, parse_attn_items(items)))
    return list(dict.fromkeys(configs))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def _fidelity(args: argparse.Namespace) -> int:
    import torch

    from finetune.data import build_data, build_loaders
    from finetune.errors import ConfigError
    from finetune.evaluate import describe_source, load_model, preprocessing_for
    from finetune.fidelity import (
        attention_map_figure, attention_modules, capture_qkv, fidelity_rows, implied_attention, markdown_rows,
        variant_module,
    )
    from finetune.io_utils import atomic_path, write_json
    from finetune.tb_writer import TBWriter

    _check_counts(batch_size=args.batch_size, batches=args.batches, maps=args.maps, num_workers=args.num_workers,
                  seed=args.seed)
    if args.from_dir and args.weights:
        raise ConfigError("pass either --from DIR or --weights PATH, not both")
    check_output_dir(args.out, "fidelity")  # before any work
    configs = _configs(args.configs)
    source = _source(args, args.from_dir or args.weights)
    arch, sidecar = describe_source(source)
    preprocessing = preprocessing_for(source, sidecar, arch)
    bundle = build_data(args.data, preprocessing, seed=args.seed)
    torch.manual_seed(args.seed)
    model, arch = load_model(source, bundle.num_classes)
    model = model.cpu().float()
    _, val_loader = build_loaders(bundle, args.batch_size, args.num_workers, torch.device("cpu"), args.seed)

    def batches():
        for i, (images, _) in enumerate(val_loader):
            if i >= args.batches:
                return
            yield images if bundle.eval_batch_transform is None else bundle.eval_batch_transform(images)

    captured = capture_qkv(model, batches())
    if not captured or captured[0][0].shape[0] == 0:
        raise ConfigError("the validation set produced no batches; check --data")
    rows = fidelity_rows(model, captured, configs, seed=args.seed)

    out = check_output_dir(args.out, "fidelity").claim()
    (out / "maps").mkdir(parents=True, exist_ok=True)
    table = markdown_rows(rows)
    header = (f"# Attention fidelity: {arch['model']} ({arch['variant']} attention), {captured[0][0].shape[0]} images "
              f"of {args.data}\n\nRelative error of each block's attention output against exact softmax on the model's "
              "own q, k, v; softmax mass computed exactly (atrous_linear: dilated windows + prefix keys); logit std: "
              "spread of q.k/sqrt(D).\n\n")
    with atomic_path(out / "fidelity.md") as tmp:
        Path(tmp).write_text(header + table + "\n")
    _write_csv(rows, out / "fidelity.csv")
    write_json(out / "fidelity.json", {"arch": arch, "data": args.data, "rows": rows})
    blocks = attention_modules(model)
    with TBWriter(str(out / "tb")) as writer:
        for r in rows:
            slug = _slug(r["label"])
            writer.scalars({f"fidelity/{slug}/rel_err": r["rel_err"], f"fidelity/{slug}/coverage": r["coverage"]},
                           step=r["block"])
        for b in sorted({r["block"] for r in rows}):
            writer.scalars({"fidelity/logit_std": next(r["logit_std"] for r in rows if r["block"] == b)}, step=b)
        if args.maps:
            shown = sorted({0, len(blocks) - 1})
            for config in configs:
                maps = []
                for b in shown:
                    q, k, _ = (t[: args.maps] for t in captured[b])
                    exact = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)[0]  # (H, N, N)
                    approx = implied_attention(variant_module(config, blocks[b], args.seed + b), q, k)[0]  # (H, N, N)
                    maps.append((b, exact, approx))
                grid, prefix = blocks[0].grid_size, blocks[0].num_prefix_tokens
                fig = attention_map_figure(config.label, maps, grid, prefix)
                with atomic_path(out / "maps" / f"{_slug(config.label)}.png") as tmp:
                    fig.savefig(tmp, dpi=90, format="png")
                writer.figure(f"attention/{_slug(config.label)}", fig, step=0)
    print(table)
    print(f"wrote {out / 'fidelity.md'}, fidelity.csv, maps/ and tb/")
    return 0


def _write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    import csv

    from finetune.io_utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["block", "variant", "label", "rel_err", "coverage", "logit_std"])
        writer.writeheader()
        writer.writerows(rows)


__all__ = ["add_eval_commands"]
