"""`vitsweep bench gpu --out DIR`: the one prepared script for a machine with one GPU (no Ray needed).

Sections, in this order, each under its own time cap inside one overall budget (`--budget-s`, default
420 s, so the run ends well inside 8 minutes even with a slow start):
1. env:      the GPU, its model in the datasheet peak table (`finetune.gpu_stats`), torch, TF32 flags.
2. sync:     every built-in variant runs 3 training steps (`finetune.loop.train_step`, bf16) under
             `torch.cuda.set_sync_debug_mode("error")`: any host sync in the step fails it.
3. step:     per variant, the training step (forward, backward, fused AdamW) of ViT-S/16 (random
             init) at 224 and 384 px in bf16, eager: ms/step, img/s, peak memory (torch and NVML,
             through `finetune.profiling.track_memory`) and MFU (3 x forward FLOPs x img/s / the
             GPU's dense bf16 peak).
4. data:     img/s delivered to the GPU from JPEGs (PIL decode + timm transform in worker processes)
             vs from the decode-once cache (`finetune.data.cache`, crop/flip/normalise on the GPU),
             on synthetic JPEGs written to local disk.
5. compiled: the step table again with `torch.compile` (inductor), 224 px first for every variant,
             then 384 px, while the budget lasts (a ViT-S compile takes tens of seconds).
Results are written after every measurement (`gpu.json`, `gpu.md` in `--out`), so a section that
runs out of time leaves what it measured plus a "skipped" note for the rest; a watchdog ends the
process at `--budget-s` + 40 s whatever is running then (exit 3).

Without CUDA it exits 2 with one line. `--device cpu --tiny` runs the same plumbing on a CPU with a
one-block model, tiny images and the `aot_eager` compile backend (what the test suite runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from benchmarks.output import write_bench_json

VARIANTS = ("softmax", "linformer", "performer", "nystrom", "atrous_linear")
# Seconds per section; the compiled section gets whatever the overall budget leaves.
CAPS = {"sync": 45.0, "step": 90.0, "data": 100.0}
WATCHDOG_GRACE_S = 40.0


class Report:
    """The results so far, rewritten to DIR/gpu.json and DIR/gpu.md after every measurement."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out, self.lock = out, threading.Lock()
        self.data: Dict[str, Any] = {"benchmark": "gpu", "args": vars(args), "env": {}, "sync": {}, "step": [],
                                     "data": {}, "skipped": [], "finished": False}

    def save(self) -> None:
        with self.lock:
            from finetune.io_utils import write_json

            write_json(self.out / "gpu.json", self.data)
            write_bench_json(self.out / "gpu.md", markdown(self.data))  # atomic: temp file + rename

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append(f"{what}: {why}")
        self.save()


class Clock:
    """The overall deadline and one section's cap."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def section(self, cap: Optional[float]) -> Callable[[], float]:
        """A function giving the seconds left to a section that starts now."""
        end = time.perf_counter() + min(cap if cap is not None else float("inf"), max(0.0, self.left()))
        return lambda: end - time.perf_counter()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(args, variant: str, size: int, batch: int):
    """(model, TrainState, images, target) for one variant at `size` px on the device."""
    import torch

    from finetune.callbacks import TrainState
    from finetune.config import TrainConfig
    from finetune.loop import build_optimizer, build_scheduler
    from finetune.models import build_vit

    device = torch.device(args.device)
    kw = dict(img_size=size, patch_size=4, depth=1) if args.tiny else dict(img_size=size)
    hp = {"rank": 16} if variant == "linformer" and args.tiny else {}
    model = build_vit(args.model, 100, variant=variant, attn_hparams=hp, **kw).to(device)
    cfg = TrainConfig.from_dict({"model": args.model, "epochs": 1, "lr": 1e-4, "warmup_epochs": 0})
    optimizer = build_optimizer(model, cfg, device)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg, 1000), None, cfg.to_dict())
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen)  # (B, 3, S, S)
    target = torch.randint(0, 100, (batch,), device=device, generator=gen)  # (B,)
    return model, state, images, target


def _steps(state, model, images, target, n: int, dtype) -> None:
    import torch

    from finetune.loop import train_step

    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(n):
        train_step(state, model, images, target, criterion, dtype, clip_grad=1.0)


def sync_check(args, variant: str) -> str:
    """"ok", or "host sync: ..." for the first sync in 3 bf16 steps after a warm-up step."""
    import torch

    model, state, images, target = _setup(args, variant, 32 if args.tiny else 224, 8)
    _steps(state, model, images, target, 1, torch.bfloat16)  # warm-up: lazy init may sync once
    _sync(images.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(state, model, images, target, 3, torch.bfloat16)
    except RuntimeError as err:
        return "host sync: " + (str(err).strip().splitlines() or [""])[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "ok"


def run_sync(args, report: Report, left: Callable[[], float]) -> None:
    """Three bf16 training steps per variant under sync debug mode "error"."""
    if not args.device.startswith("cuda"):
        report.skip("sync", "needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    for variant in args.variants:
        if left() <= 0:
            report.skip(f"sync {variant}", "section time cap")
            continue
        try:
            outcome = sync_check(args, variant)
        except Exception as err:  # a variant that fails outside the check: recorded, the run goes on
            outcome = f"error: {type(err).__name__}: {str(err).strip()[:200]}"
        report.data["sync"][variant] = outcome
        report.save()


def measure_step(args, variant: str, size: int, compiled: bool) -> Dict[str, Any]:
    """One (variant, size, eager|compiled) row: ms/step, img/s, peak memory, MFU."""
    import torch

    from finetune.gpu_stats import peak_tflops
    from finetune.metrics import count_flops, model_flops_utilization
    from finetune.profiling import track_memory

    device = torch.device(args.device)
    model, state, images, target = _setup(args, variant, size, args.batch)
    forward_gflops = count_flops(model, (size, size)) / 1e9
    forward = model
    if compiled:
        forward = torch.compile(model, backend="aot_eager" if device.type == "cpu" else "inductor")
    t = time.perf_counter()
    _steps(state, forward, images, target, args.warmup, torch.bfloat16)  # compiles here
    _sync(device)
    warmup_s = time.perf_counter() - t

    @track_memory(device=device)
    def timed() -> float:
        start = time.perf_counter()
        _steps(state, forward, images, target, args.steps, torch.bfloat16)
        _sync(device)
        return time.perf_counter() - start

    seconds, memory = timed()
    img_s = args.batch * args.steps / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, "bf16")
    return {
        "variant": variant, "px": size, "mode": "compiled" if compiled else "eager", "batch": args.batch,
        "ms_per_step": 1000 * seconds / args.steps, "img_s": img_s, "warmup_s": warmup_s,
        "forward_gflops_per_img": forward_gflops, **memory.metrics(),
        "mfu": model_flops_utilization(forward_gflops, img_s, peak) if peak else None,
    }


def run_steps(args, report: Report, left: Callable[[], float], compiled: bool) -> None:
    import torch

    order = [(v, s) for s in args.sizes for v in args.variants]  # every variant at the small size first
    for variant, size in order:
        what = f"step {variant} {size}px {'compiled' if compiled else 'eager'}"
        if left() <= 0:
            report.skip(what, "section time cap")
            continue
        try:
            row = measure_step(args, variant, size, compiled)
        except torch.cuda.OutOfMemoryError as err:
            row = {"variant": variant, "px": size, "mode": "compiled" if compiled else "eager", "error": f"OOM: {err}"[:200]}
        except Exception as err:  # one variant failing to compile must not end the run
            row = {"variant": variant, "px": size, "mode": "compiled" if compiled else "eager",
                   "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]}
        report.data["step"].append(row)
        report.save()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _loader_img_s(loader, device, transform, seconds: float, max_batches: int) -> float:
    """Images per second delivered to `device` (transform applied there) over at most `seconds`."""
    seen, start = 0, None
    for i, (images, _) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        if i == 1:  # the first batch pays worker start-up
            _sync(device)
            start, seen = time.perf_counter(), 0
        seen += images.shape[0]
        if start is not None and (time.perf_counter() - start > seconds or i >= max_batches):
            break
    _sync(device)
    return seen / (time.perf_counter() - start) if start is not None else float("nan")


def run_data(args, report: Report, left: Callable[[], float], work: Path) -> None:
    """JPEG folder vs decode-once cache: img/s of the train loader as `vitsweep train` builds it."""
    import torch

    from benchmarks.data import write_jpegs
    from finetune.data import build_cache, build_data, build_loaders
    from finetune.data.preprocessing import Preprocessing

    device = torch.device(args.device)
    t = time.perf_counter()
    write_jpegs(work / "jpeg", args.jpegs, max(8, args.jpegs // 8), 8)
    build = build_cache(f"imagefolder:{work / 'jpeg'}", work / "cache", size=64 if args.tiny else 256,
                        num_workers=args.workers)
    info = {"jpegs": args.jpegs, "write_and_cache_s": time.perf_counter() - t, "workers": args.workers,
            "cache_bytes": build.get("total_bytes")}
    px = 48 if args.tiny else 224
    prep = Preprocessing((3, px, px), "bicubic", 0.875, "center", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                         augment="timm", color_jitter=None)
    for name, spec in (("jpeg", f"imagefolder:{work / 'jpeg'}"), ("cache", f"cache:{work / 'cache'}")):
        if left() <= 0:
            report.skip(f"data {name}", "section time cap")
            continue
        bundle = build_data(spec, prep)
        loader, _ = build_loaders(bundle, args.batch, args.workers, device, seed=0)
        info[f"{name}_img_s"] = _loader_img_s(loader, device, bundle.train_batch_transform,
                                              min(args.data_seconds, max(1.0, left())), 10_000)
        report.data["data"] = info
        report.save()
    if "jpeg_img_s" in info and "cache_img_s" in info:
        info["cache_over_jpeg"] = info["cache_img_s"] / info["jpeg_img_s"]
        report.save()


def env_info(args) -> Dict[str, Any]:
    import torch

    from finetune.gpu_stats import gpu_model, peak_tflops

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "cpu_count": os.cpu_count()}
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        info.update(gpu=name, gpu_model=gpu_model(name), peak_bf16_tflops=peak_tflops(name, "bf16"),
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(data: Dict[str, Any]) -> str:
    env = data["env"]
    lines = [f"# vitsweep bench gpu: {env.get('gpu', env.get('device', '?'))} ({env.get('gpu_model') or 'not in the peak table'})",
             "", f"torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, bf16 peak {_fmt(env.get('peak_bf16_tflops'))} TFLOP/s, "
             f"finished: {data['finished']}", "", "## Host syncs in the training step (sync debug mode \"error\")", "",
             "| variant | result |", "|---|---|"]
    lines += [f"| {v} | {r} |" for v, r in data["sync"].items()]
    lines += ["", "## Training step, ViT-S/16, bf16 (random init)", "",
              "| variant | px | mode | ms/step | img/s | MFU | peak alloc MB | peak NVML MB (source) | warm-up s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["step"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['px']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        nvml = f"{_fmt(r.get('memory/peak_nvml_mb'), '.0f')} ({r.get('memory/peak_nvml_source') or '-'})"
        lines.append(f"| {r['variant']} | {r['px']} | {r['mode']} | {_fmt(r['ms_per_step'])} | {_fmt(r['img_s'], '.0f')} | "
                     f"{_fmt(r['mfu'], '.3f')} | {_fmt(r.get('memory/peak_allocated_mb'), '.0f')} | {nvml} | {_fmt(r['warmup_s'])} |")
    d = data["data"]
    lines += ["", "## Data: img/s delivered to the device", "", "| source | img/s |", "|---|---|",
              f"| JPEG folder ({d.get('workers', '-')} workers) | {_fmt(d.get('jpeg_img_s'), '.0f')} |",
              f"| decode-once cache | {_fmt(d.get('cache_img_s'), '.0f')} |",
              f"| cache / JPEG | {_fmt(d.get('cache_over_jpeg'), '.2f')} |"]
    if data["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vitsweep bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu.json, gpu.md and the JPEG/cache work files")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (only with --tiny: a dry run of the plumbing)")
    p.add_argument("--tiny", action="store_true", help="one-block ViT at 32/48 px, few images: tests the plumbing")
    p.add_argument("--budget-s", type=float, default=420.0, help="overall time budget in seconds (default 420)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation happens here)")
    p.add_argument("--jpegs", type=int, default=1536, help="synthetic JPEGs written for the data section")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--data-seconds", type=float, default=15.0, help="seconds per data pipeline")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help=f"variants to measure (default all: {' '.join(VARIANTS)})")
    p.add_argument("--skip", nargs="*", default=[], choices=("sync", "step", "data", "compiled"))
    args = p.parse_args(argv)
    return args


def check_args(args) -> Optional[str]:
    """The one-line reason this run cannot start, or None."""
    import torch

    for name in ("budget_s", "batch", "steps", "warmup", "jpegs", "data_seconds"):
        value = getattr(args, name)
        if not (value == value and value > 0 and value != float("inf")) and not (name == "warmup" and value == 0):
            return f"--{name.replace('_', '-')}={value!r}; allowed: a finite number > 0"
    if args.workers < 0:
        return f"--workers={args.workers}; allowed: >= 0"
    from finetune.errors import ConfigError
    from finetune.outputs import check_output_dir

    try:  # a new or empty directory, or an earlier `bench gpu`'s (finetune.outputs)
        check_output_dir(args.out, "bench")
    except ConfigError as err:
        return str(err)
    if args.device == "cpu":
        return None if args.tiny else "--device cpu runs only with --tiny (a dry run); the GPU figures need CUDA"
    if not args.device.startswith("cuda"):
        return f"--device={args.device!r}; allowed: cuda, cuda:N, or cpu with --tiny"
    if not torch.cuda.is_available():
        return "needs a CUDA device, and torch.cuda.is_available() is False here (dry run: --device cpu --tiny)"
    try:
        torch.cuda.get_device_name(torch.device(args.device))
    except (RuntimeError, AssertionError, ValueError) as err:
        return f"--device={args.device!r}: {err}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"vitsweep bench gpu: error: {problem}", file=sys.stderr)
        return 2
    import torch

    args.model = "vit_tiny_patch16_224" if args.tiny else "vit_small_patch16_224"
    args.sizes = (32, 48) if args.tiny else (224, 384)
    from finetune.outputs import check_output_dir

    out = check_output_dir(args.out, "bench").claim()
    report = Report(out, args)
    clock = Clock(args.budget_s)
    watchdog = threading.Timer(args.budget_s + WATCHDOG_GRACE_S, _watchdog, (report,))
    watchdog.daemon = True
    watchdog.start()
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # vitsweep's default
    report.data["env"] = env_info(args)
    report.save()
    with tempfile.TemporaryDirectory(prefix="vitsweep-bench-gpu-", dir=out) as work:
        for section, run in (("sync", lambda left: run_sync(args, report, left)),
                             ("step", lambda left: run_steps(args, report, left, compiled=False)),
                             ("data", lambda left: run_data(args, report, left, Path(work))),
                             ("compiled", lambda left: run_steps(args, report, left, compiled=True))):
            if section in args.skip:
                report.skip(section, "--skip")
                continue
            start = time.perf_counter()
            run(clock.section(CAPS.get(section)))
            report.data.setdefault("section_s", {})[section] = time.perf_counter() - start
    watchdog.cancel()
    report.data["finished"] = True
    report.data["total_s"] = time.perf_counter() - clock.start
    report.save()
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({report.data['total_s']:.0f} s)")
    return 0


def _watchdog(report: Report) -> None:
    """The budget plus grace is over and something still runs (a compile, a stuck worker): keep the
    results so far and end the process."""
    report.data["skipped"].append("watchdog: the overall budget ran out mid-measurement; the process was ended")
    report.save()
    print("vitsweep bench gpu: budget exhausted; partial results written", file=sys.stderr)
    os._exit(3)


if __name__ == "__main__":
    raise SystemExit(main())
