"""`vitsweep bench data`: images/s of the per-image JPEG pipeline against the decode-once cache path.

The benchmark writes its own JPEGs at ImageNet-like sizes (about 400x350, quality 90; smooth colour
gradients, a few shapes, pixel noise) into an image folder, then measures on the same cores:

- jpeg:        `--data imagefolder:...` as `vitsweep train` reads it: PIL decode + timm's training
               transform (RandomResizedCrop 224, flip, to tensor, normalise; no colour jitter) in N
               DataLoader workers.
- cache/workers: the same images cached once at 256x256 uint8 (`vitsweep data cache`), read from the
               memory-mapped cache by N workers that also run the batched train transform
               (`BatchTrainTransform`: crop, flip, normalise) on each batch: all N cores augment.
- cache/main:  N workers only read; the batched transform runs in the main process, as
               `finetune.loop.fit` runs it (on a GPU box it runs on the GPU instead).
- cache/threads: no worker processes: the main process reads and runs the transform with N threads
               (`BatchTrainTransform(threads=N)`; what `fit` does with --num-workers 0 and N torch
               threads), so no batch crosses a process boundary.

The run raises glibc's mmap threshold (`--mmap-threshold-mb`, see `raise_mmap_threshold`) for
both pipelines alike; it matters to the batched path only, whose 38.5 MB output batches otherwise
page-fault on every allocation. Repeats are interleaved (jpeg, cache/workers, cache/main, jpeg, ...) and each lasts at least
`--min-seconds`; the table gives the median images/s and the median of the per-repeat ratios to jpeg.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from benchmarks.output import check_bench_out, write_bench_json

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(root: Path, n_train: int, n_val: int, classes: int, quality: int = 90, seed: int = 0) -> None:
    """root/{train,val}/<class>/<i>.jpg, sizes around 400x350 (w 340-460, h 300-400)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split / f"c{i % classes:02d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(340, 461)), int(rng.integers(300, 401))
            _natural_ish(rng, w, h).save(d / f"{i:05d}.jpg", quality=quality)


def _natural_ish(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(-1, 1, (2, 3))  # per-channel gradient directions
    base = rng.uniform(40, 200, 3) + a * xx[..., None] * 120 / w + b * yy[..., None] * 120 / h  # (h, w, 3)
    pixels = base + rng.normal(0, 6, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return image


class _TransformCollate:
    """Collate, then the batched train transform (runs inside a DataLoader worker)."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, items):
        images, labels = default_collate(items)  # uint8 (B, 3, S, S), (B,)
        # Write the result straight into shared memory, as default_collate does for the JPEG path's
        # batches; otherwise sending the batch to the main process costs one more 38 MB copy.
        shape = (images.shape[0], 3) + tuple(self.transform.out)
        out = torch.empty(0).new(torch.UntypedStorage._new_shared(4 * math.prod(shape))).view(shape)
        return self.transform(images, out=out), labels  # float (B, 3, 224, 224)


def _images_per_second(loader: DataLoader, min_seconds: float, batch_transform: Optional[Callable] = None) -> float:
    """Whole passes over `loader` until `min_seconds` have elapsed; images delivered per second."""
    seen, start = 0, time.perf_counter()
    while True:
        for images, _ in loader:
            if batch_transform is not None:
                images = batch_transform(images)
            seen += images.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return seen / elapsed


def raise_mmap_threshold(nbytes: int) -> bool:
    """glibc serves blocks above M_MMAP_THRESHOLD (dynamic, at most 32 MiB by default) with fresh
    mmaps whose pages fault on first touch: a 64 x 224 px float batch (38.5 MB) costs ~22 ms of page
    faults each time here. Raising the threshold (what MALLOC_MMAP_THRESHOLD_ does) lets batches
    reuse heap memory. Process-wide and inherited by forked workers, so both pipelines run with it."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return libc.mallopt(m_mmap_threshold, nbytes) == 1 and libc.mallopt(m_trim_threshold, 4 * nbytes) == 1


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unknown ({e})"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())


def run(args: argparse.Namespace) -> Dict:
    from finetune.data import BatchTrainTransform, Preprocessing, build_cache, build_data

    torch.set_num_threads(args.threads)
    malloc_tuned = args.mmap_threshold_mb > 0 and raise_mmap_threshold(args.mmap_threshold_mb * 2**20)
    prep = Preprocessing(
        (3, 224, 224), "bicubic", 0.875, "center", IMAGENET_MEAN, IMAGENET_STD, augment="timm", color_jitter=None
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitsweep-bench-data-"))
    try:
        t = time.perf_counter()
        write_jpegs(work / "jpeg", args.images, max(args.images // 8, args.classes), args.classes)
        jpeg_bytes = sum(p.stat().st_size for p in (work / "jpeg").rglob("*.jpg"))
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        manifest = build_cache(f"imagefolder:{work / 'jpeg'}", work / "cache", size=args.cache_size, num_workers=args.workers)
        build_s = time.perf_counter() - t
        n_cached = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]

        jpeg = build_data(f"imagefolder:{work / 'jpeg'}", prep)
        cache = build_data(f"cache:{work / 'cache'}", prep)
        common = dict(
            batch_size=args.batch_size, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0, drop_last=False
        )
        loaders = {
            "jpeg": (DataLoader(jpeg.train, **common), None),
            "cache/workers": (DataLoader(cache.train, collate_fn=_TransformCollate(cache.train_batch_transform), **common), None),
            "cache/main": (DataLoader(cache.train, **common), cache.train_batch_transform),
            "cache/threads": (
                DataLoader(cache.train, **{**common, "num_workers": 0, "persistent_workers": False}),
                BatchTrainTransform(prep, threads=max(1, args.workers)),
            ),
        }
        for loader, tf in loaders.values():  # start workers, warm caches
            _images_per_second(loader, 0.0, tf)
        runs: Dict[str, List[float]] = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, (loader, tf) in loaders.items():
                runs[name].append(_images_per_second(loader, args.min_seconds, tf))
    finally:
        if args.workdir is None:
            shutil.rmtree(work)
    median = {name: statistics.median(v) for name, v in runs.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(v, runs["jpeg"])) for name, v in runs.items()}
    return {
        "benchmark": "data",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "cores": torch.multiprocessing.cpu_count(), "torch": torch.__version__},
        "args": vars(args),
        "malloc_mmap_threshold_set": malloc_tuned,
        "jpeg": {"train_images": args.images, "bytes": jpeg_bytes, "write_s": round(write_s, 2)},
        "cache": {
            "size": args.cache_size,
            "bytes": manifest["total_bytes"],
            "build_s": round(build_s, 2),
            "build_img_s": round(n_cached / build_s, 1),
        },
        "img_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "median_img_s": {k: round(v, 1) for k, v in median.items()},
        "ratio_to_jpeg": {k: round(v, 2) for k, v in ratio.items()},
        "goal": 5.0,
    }


def table(result: Dict) -> str:
    w, t = result["args"]["workers"], result["args"]["threads"]
    rows = [
        ("jpeg", f"JPEG: PIL decode + timm RandomResizedCrop 224/flip/normalise, {w} workers"),
        ("cache/workers", f"cache 256 uint8: read + batched crop/flip/normalise in {w} workers"),
        ("cache/main", f"cache 256 uint8: {w} workers read, batched transform in the main process ({t} torch thread(s))"),
        ("cache/threads", f"cache 256 uint8: main process reads + batched transform on {max(1, w)} threads, no workers"),
    ]
    lines = ["| pipeline | img/s (median) | x JPEG (median of ratios) |", "|---|---|---|"]
    for key, label in rows:
        lines.append(f"| {label} | {result['median_img_s'][key]:.0f} | {result['ratio_to_jpeg'][key]:.2f}x |")
    c = result["cache"]
    lines.append(f"| one-time cache build (decode, resize, write; {w} workers) | {c['build_img_s']:.0f} | - |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitsweep bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="training JPEGs to write (val gets 1/8 of them)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (cores) for every pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0, help="minimum duration of one measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument(
        "--mmap-threshold-mb", type=int, default=128,
        help="raise glibc's M_MMAP_THRESHOLD to this many MiB for the whole run, both pipelines (0: leave it)",
    )
    parser.add_argument("--workdir", default=None, help="keep the JPEGs and the cache here (default: a temp dir, removed)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.out:
        args.out = str(check_bench_out(args.out))
    for name in ("images", "classes", "batch_size", "cache_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    result = run(args)
    print(table(result))
    best = max((k for k in result["ratio_to_jpeg"] if k != "jpeg"), key=result["ratio_to_jpeg"].get)
    ratio = result["ratio_to_jpeg"][best]
    print(f"goal >= {result['goal']}x: {'met' if ratio >= result['goal'] else 'not met'} (best: {best}, {ratio:.2f}x)")
    if args.out:
        write_bench_json(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
