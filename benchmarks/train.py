"""`vitsweep bench train`: images/s of vitsweep's training step against a bare hand-written timm loop.

Same model, batch, precision and in-memory data; the two are run interleaved (A B A B ...) and the
median of the per-pair ratios is reported, because shared machines are noisy. vitsweep's number is
`throughput/train_img_s` from `finetune.loop.fit` (the loop `vitsweep train` runs); the bare loop is
forward, cross-entropy, backward, AdamW step, nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import List, Optional

import torch
import torch.nn as nn

from benchmarks.output import check_bench_out, write_bench_json

NUM_CLASSES = 100


def _batches(n: int, batch: int, img: int, classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, img, img, generator=g).to(device), torch.randint(0, classes, (batch,), generator=g).to(device))
        for _ in range(n)
    ]


def bare_loop(model: nn.Module, batches, device, dtype, warmup: int) -> float:
    """Images/s of the minimal loop over `batches` after `warmup` untimed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    crit = nn.CrossEntropyLoss()
    model.train()

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:warmup]:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(x.shape[0] for x, _ in batches[warmup:]) / (time.perf_counter() - t)


def vitsweep_loop(model: nn.Module, batches, cfg, device, warmup: int) -> float:
    from finetune.loop import fit

    # one warmup epoch, then the measured epoch (fit reports throughput/train_img_s per epoch)
    result = fit(model, batches, batches[:1], cfg.replace(epochs=2, max_train_batches=None), num_classes=NUM_CLASSES,
                 device=device, progress=False)
    return result["history"][-1]["throughput/train_img_s"]


def main(argv: Optional[List[str]] = None) -> int:
    from finetune.config import TrainConfig
    from finetune.loop import resolve_device, resolve_precision
    from finetune.models import build_vit

    p = argparse.ArgumentParser(prog="vitsweep bench train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--variant", default="softmax")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="interleaved pairs")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile both loops' models")
    p.add_argument("--out", default=None, help="write results as JSON")
    args = p.parse_args(argv)
    if args.out:
        args.out = str(check_bench_out(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype, _ = resolve_precision(args.precision, device)
    cfg = TrainConfig.from_dict(dict(
        model=args.model, pretrained=False, variant=args.variant, img_size=args.img_size, patch_size=args.patch_size,
        depth=args.depth, batch_size=args.batch_size, epochs=2, warmup_epochs=0.0, precision=args.precision,
        device=str(device), clip_grad=None, log_interval=10**6, topk=[1], compile=args.compile,
    ))
    batches = _batches(args.steps, args.batch_size, args.img_size, NUM_CLASSES, device)

    def fresh():
        torch.manual_seed(0)
        return build_vit(args.model, NUM_CLASSES, variant=args.variant, img_size=args.img_size, patch_size=args.patch_size,
                         depth=args.depth).to(device)

    def run_bare() -> float:
        model = fresh()
        return bare_loop(torch.compile(model) if args.compile else model, batches + batches, device, dtype,
                         warmup=len(batches))

    ours, bare = [], []
    for repeat in range(args.repeats):  # interleaved, alternating which goes first
        if repeat % 2:
            bare.append(run_bare())
            ours.append(vitsweep_loop(fresh(), batches, cfg, device, warmup=1))
        else:
            ours.append(vitsweep_loop(fresh(), batches, cfg, device, warmup=1))
            bare.append(run_bare())
    ratios = [o / b for o, b in zip(ours, bare)]
    row = {
        "model": args.model, "variant": args.variant, "img_size": args.img_size, "patch_size": args.patch_size,
        "batch_size": args.batch_size, "precision": args.precision, "device": str(device), "compile": args.compile,
        "vitsweep_img_s": statistics.median(ours), "bare_img_s": statistics.median(bare),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    from finetune.metrics import count_flops, device_peak_tflops, model_flops_utilization

    peak = device_peak_tflops(device, args.precision)
    gflops = count_flops(fresh(), (args.img_size, args.img_size)) / 1e9
    row["forward_gflops"] = gflops
    row["mfu"] = model_flops_utilization(gflops, row["vitsweep_img_s"], peak)
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    print(f"{'model':24} {'img':>4} {'batch':>5} {'prec':>5} {'vitsweep img/s':>15} {'bare img/s':>11} {'ratio':>6} {'MFU':>6}")
    print(f"{row['model']:24} {row['img_size']:>4} {row['batch_size']:>5} {row['precision']:>5} "
          f"{row['vitsweep_img_s']:>15.1f} {row['bare_img_s']:>11.1f} {row['ratio_median']:>6.3f} {mfu:>6}")
    if args.out:
        write_bench_json(args.out, json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
