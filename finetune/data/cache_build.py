"""Decode-once cache, writing side (`vitsweep data cache`): decode every train and val image of a
source once, resize it to an S x S square and store it as uint8 `.npy` files plus a manifest. The
layout and the reasons for it are in `finetune.data.cache`, which reads it back.

Writing is atomic: everything goes to a temporary sibling directory that is renamed to DIR at the
end, so an interrupted build leaves no half cache under DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from ..errors import DataError
from ..io_utils import sha256_file
from .cache import FORMAT, LAYOUT, MANIFEST, SPLITS, VERSION
from .images import to_rgb
from .sources import build_sources
from .spec import parse_data_spec


class SquareResize:
    """PIL image -> uint8 [3, size, size]: shorter side to `size` (bicubic), centre crop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.transform = transforms.Compose(
            [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
        )

    def __call__(self, image) -> np.ndarray:
        pixels = np.asarray(self.transform(to_rgb(image)), dtype=np.uint8)  # (S, S, 3)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)


def _collate(items: List[Tuple[np.ndarray, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    # tensors, not arrays: a worker hands them over in shared memory instead of pickling the pixels
    images = torch.from_numpy(np.stack([x for x, _ in items]))  # (b, 3, S, S) uint8
    return images, torch.tensor([y for _, y in items], dtype=torch.int64)  # (b,)


def _file_entry(path: Path) -> Dict[str, Any]:
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_split(
    dataset: Dataset, tmp: Path, split: str, size: int, num_classes: int, num_workers: int, progress: bool
) -> Dict[str, Any]:
    """Decode `dataset` (yielding (uint8 [3, S, S], label)) in parallel into {split}_images/labels.npy."""
    n = len(dataset)
    images_path, labels_path = tmp / f"{split}_images.npy", tmp / f"{split}_labels.npy"
    labels = np.empty(n, dtype=np.int64)
    loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    pos = 0
    # Ordinary sequential writes of the .npy header and then each batch, not a writable memory map: on a
    # full disk a write raises ENOSPC (an error we can report and clean up after), where a store into a
    # memory-mapped page of a full tmpfs kills the process with SIGBUS.
    with open(images_path, "wb") as fh, tqdm(total=n, desc=f"cache {split}", disable=not progress, leave=False) as bar:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (n, 3, size, size)}
        np.lib.format.write_array_header_1_0(fh, header)
        for batch, batch_labels in loader:
            if pos + len(batch) > n:
                raise DataError(f"the {split} split yielded more than the {n} images it reports")
            fh.write(batch.numpy().tobytes())  # (b, 3, S, S) uint8, C order
            labels[pos : pos + len(batch)] = batch_labels.numpy()
            pos += len(batch)
            bar.update(len(batch))
        fh.flush()
        os.fsync(fh.fileno())
    if pos != n:
        raise DataError(f"the {split} split yielded {pos} images but reports {n}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{split} image {int(bad[0])} has label {int(labels[bad[0]])}, outside 0..{num_classes - 1}")
    np.save(labels_path, labels)
    return {"count": n, "images": _file_entry(images_path), "labels": _file_entry(labels_path)}


def estimated_bytes(num_images: int, size: int) -> int:
    """The documented size of a cache: 3 * size^2 bytes per image (uint8 RGB), 8 per label, plus a
    header per file and the manifest (64 KiB allowance)."""
    return num_images * (3 * size * size + 8) + (1 << 16)


def check_free_space(out: Path, num_images: int, size: int) -> None:
    """Refuse, before writing anything, a cache larger than the free space where it goes."""
    where = out.parent
    while not where.exists():
        where = where.parent
    need, free = estimated_bytes(num_images, size), shutil.disk_usage(where).free
    if need > free:
        raise DataError(f"the cache of {num_images} images at size={size} needs about {need / 2**20:,.1f} MiB "
                        f"({num_images} x 3 x {size}^2 bytes) but {str(where)!r} has {free / 2**20:,.1f} MiB free; "
                        "free space, lower --size, or choose another --out")


def _check_cache_out(out_dir: str | os.PathLike) -> Path:
    """The cache's `--out`: the output rule (`finetune.outputs`) for a new or empty directory."""
    from ..errors import ConfigError
    from ..outputs import check_output_dir, describe_contents

    try:
        return check_output_dir(out_dir, "data-cache", accept_own=False).path
    except ConfigError as err:
        path = Path(out_dir).expanduser()
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
            raise DataError(f"cache directory {str(path)!r} already exists and is not empty ({describe_contents(path)}); "
                            "remove it or choose another") from None
        raise DataError(f"cache directory: {err}") from None


def build_cache(
    spec: str,
    out_dir: str | os.PathLike,
    size: int = 256,
    num_workers: Optional[int] = None,
    skip_bad_images: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """Decode every train and val image of SPEC once into a cache at `out_dir`; returns the manifest.

    Args:
        spec: a `--data` spec of an image source (not `cache:`).
        out_dir: the cache directory; must not exist or be empty.
        size: side S of the stored square images (shorter side resized to S, centre crop).
        num_workers: decoding processes (DataLoader workers); None: min(8, CPU count).
        skip_bad_images: image folders only: drop unreadable files (counted in the manifest).
        seed: the synthetic source's seed when the spec does not set `seed=`.
        progress: show a progress bar per split.
    """
    if not 8 <= size <= 4096:
        raise DataError(f"cache size={size} must be in [8, 4096] (256 for 224 px models)")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers} must be >= 0")
    out = _check_cache_out(out_dir)
    resize = SquareResize(size)
    train, val, names, skipped = build_sources(spec, resize, resize, skip_bad_images=skip_bad_images, seed=seed)
    check_free_space(out, len(train) + len(val), size)

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        splits = {
            split: _write_split(ds, tmp, split, size, len(names), num_workers, progress)
            for split, ds in zip(SPLITS, (train, val))
        }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": spec,
            "seed": seed if parse_data_spec(spec).kind == "synthetic" else None,
            "class_names": list(names),
            "num_classes": len(names),
            "size": size,
            "layout": LAYOUT,
            "dtype": "uint8",
            "label_dtype": "int64",
            "resize": f"shorter side to {size} (bicubic), centre crop {size}x{size}",
            "splits": splits,
            "skipped_images": skipped,
            "total_bytes": sum(f["bytes"] for s in splits.values() for f in (s["images"], s["labels"])),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        # Remove the partial build and re-raise the original error; a failure to delete must not mask it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
