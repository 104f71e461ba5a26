"""`vitsweep bench gpu`: the one prepared script for a session that has a GPU (issue 5's device check).

Runs, in order, each writing JSON under `--out`:
1. compute-only training throughput (`bench train`) for ViT-S/16 and ViT-B/16 at 224 px, bf16, with and
   without torch.compile: vitsweep's step vs a bare loop, images/s and MFU;
2. end to end from the decode-once cache: a synthetic 36-class cache at 256 px is built on local disk,
   then one epoch of `run_training` (bf16, compile) is timed and projected to an ImageNet-100 epoch
   (126,689 images);
3. the attention benchmark (`bench attention --device cuda`).
The device has torch and timm but not Ray, so nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List, Optional

from benchmarks.output import write_bench_json
from finetune.outputs import check_output_dir

IMAGENET100_TRAIN = 126_689


def end_to_end(out: Path, model: str, batch: int, images: int, workers: int, compile_: bool = True, **model_kw) -> dict:
    from finetune.config import TrainConfig
    from finetune.data import build_cache
    from finetune.train import run_training

    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        build_cache(f"synthetic:classes=36,size=256,n={images},n_val=1000", str(cache), size=256, num_workers=workers)
    cfg = TrainConfig.from_dict(dict(
        model=model, pretrained=False, data=f"cache:{cache}", epochs=2, batch_size=batch, precision="bf16",
        compile=compile_, num_workers=0, warmup_epochs=0.5, augment="timm", log_interval=50, **model_kw,
    ))
    start = time.perf_counter()
    result = run_training(cfg, None, progress=False)
    last = result["history"][-1]
    return {
        "model": model, "batch": batch, "images": images, "wall_s": time.perf_counter() - start,
        "train_img_s": last["throughput/train_img_s"], "epoch_s": last["time/epoch_s"],
        "mfu": last.get("throughput/mfu"),
        "projected_imagenet100_epoch_s": IMAGENET100_TRAIN / last["throughput/train_img_s"],
    }


def main(argv: Optional[List[str]] = None) -> int:
    from benchmarks import attention, train

    p = argparse.ArgumentParser(prog="vitsweep bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_gpu", help="directory for JSON results and the cache")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cache-images", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=("train", "e2e", "attention"))
    args = p.parse_args(argv)
    out = check_output_dir(args.out, "bench").claim()  # a new or empty directory, or an earlier `bench gpu`'s
    if "train" not in args.skip:
        for model in ("vit_small_patch16_224", "vit_base_patch16_224"):
            for compile_ in (False, True):
                tag = f"train_{model}_{'compiled' if compile_ else 'eager'}.json"
                train.main(["--model", model, "--img-size", "224", "--patch-size", "16", "--batch-size", str(args.batch),
                            "--precision", "bf16", "--device", "cuda", "--steps", "30", "--repeats", "3",
                            *(["--compile"] if compile_ else []), "--out", str(out / tag)])
    if "e2e" not in args.skip:
        for model in ("vit_small_patch16_224", "vit_base_patch16_224"):
            row = end_to_end(out, model, args.batch, args.cache_images, args.workers)
            print(json.dumps(row))
            write_bench_json(out / f"e2e_{model}.json", json.dumps(row, indent=2))
    if "attention" not in args.skip:
        attention.main(["--device", "cuda", "--precision", "bf16", "--batch", "8", "--out", str(out / "attention_cuda.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
