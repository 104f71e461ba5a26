"""`python -m benchmarks.data_wait`: where the training time goes, JPEGs against the decode-once cache.

Writes an image folder of 512 px JPEGs (PIL, quality 90, colour gradients with pixel noise), then runs
`vitsweep train` on it with a one-block ViT (vit_tiny, patch 32, 224 px, batch 32, no loader workers):
once from the JPEGs, once from `vitsweep data cache` of the same folder. Repeats alternate (jpeg, cache,
jpeg, cache, ...); the table gives each run's `time/data_wait_frac`, `throughput/train_img_s` and
`throughput/compute_img_s` (`finetune.timing`), and the median data wait per source.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image

MODEL = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--patch-size", "32", "--depth", "1",
         "--batch-size", "32", "--num-workers", "0", "--epochs", "1", "--topk", "1", "--max-val-batches", "1",
         "--no-progress", "--log-interval", "100"]


def write_jpegs(root: Path, n_train: int, n_val: int, size: int = 512, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    xx = np.mgrid[0:size, 0:size][1][..., None].astype(np.float32)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.uniform(40, 200, 3) + xx * rng.uniform(-0.2, 0.2, 3)
            pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def main(argv: Optional[List[str]] = None) -> int:
    from orchestrator.cli import main as vitsweep

    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_wait", description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitsweep-data-wait-") as tmp:
        root = Path(tmp)
        write_jpegs(root / "jpegs", args.n_train, 32)
        vitsweep(["data", "cache", "--data", f"imagefolder:{root / 'jpegs'}", "--out", str(root / "cache"),
                  "--num-workers", "0"])
        sources = {"jpeg": f"imagefolder:{root / 'jpegs'}", "cache": f"cache:{root / 'cache'}"}
        rows = []
        for repeat in range(args.repeats):
            for name, data in sources.items():
                out = root / f"{name}{repeat}"
                vitsweep(["train", "--out", str(out), "--data", data, *MODEL])
                m = json.loads((out / "result.json").read_text())["metrics"]
                rows.append((name, m["time/data_wait_frac"], m["throughput/train_img_s"], m["throughput/compute_img_s"]))
    print("| source | data wait | train img/s | step img/s |\n|---|---|---|---|")
    for name, wait, ips, step in rows:
        print(f"| {name} | {wait:.3f} | {ips:.1f} | {step:.1f} |")
    for name in ("jpeg", "cache"):
        print(f"median data wait, {name}: {statistics.median(w for n, w, _, _ in rows if n == name):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
