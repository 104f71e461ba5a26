"""Decode-once cache: every image of a source decoded once, resized to a fixed square and stored as
uint8, so that training reads pixels instead of decoding JPEGs (`vitsweep data cache`, `cache:<DIR>`).

Layout of a cache directory:

    manifest.json          format, source spec, class names, size, layout, per-split counts and,
                           for every file, its byte size and sha256
    train_images.npy       uint8 [N, 3, S, S] (NCHW: one image is one contiguous 3*S*S slab)
    train_labels.npy       int64 [N]
    val_images.npy, val_labels.npy

Resize: shorter side to S (bicubic, PIL), then the centre S x S crop (torchvision's Resize +
CenterCrop, i.e. timm's eval transform with crop_pct=1). A centre square keeps every pixel timm's
eval transform looks at (it centre-crops too), at the price of the margins of non-square images,
which the training RandomResizedCrop could otherwise reach.

Why .npy: `np.load(mmap_mode='r')` memory-maps it, so reading an image is a page-cache copy with no
decode, no pickle and no dependency; the header carries shape and dtype and the data is one flat
block, so byte sizes are exact and a truncated file is detected by `stat` alone. Arrow would add
row-group framing and per-column chunking for no gain on fixed-size tensors; safetensors holds one
header for all tensors and is meant to be read whole, not sliced per image.

Writing is atomic: everything goes to a temporary sibling directory that is renamed to DIR at the
end, so an interrupted build leaves no half cache under DIR.
"""

from __future__ import annotations

import hashlib
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

from .preprocessing import Preprocessing
from .spec import DataError

FORMAT = "vitsweep-cache"
VERSION = 1
SPLITS = ("train", "val")
LAYOUT = "NCHW"
MANIFEST = "manifest.json"
# Caches up to this many bytes are checksummed on every load (about a second); larger ones on request
# (`verify_cache`), since hashing ImageNet-100 (~25 GB) takes minutes.
VERIFY_ON_LOAD_BYTES = 256 * 2**20
_REQUIRED = ("format", "version", "source", "class_names", "size", "layout", "dtype", "splits")


class SquareResize:
    """PIL image -> uint8 [3, size, size]: shorter side to `size` (bicubic), centre crop."""

    def __init__(self, size: int) -> None:
        from torchvision import transforms

        self.size = size
        self.transform = transforms.Compose(
            [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
        )

    def __call__(self, image) -> np.ndarray:
        pixels = np.asarray(self.transform(image.convert("RGB")), dtype=np.uint8)  # (S, S, 3)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)


def _collate(items: List[Tuple[np.ndarray, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    # tensors, not arrays: a worker hands them over in shared memory instead of pickling the pixels
    images = torch.from_numpy(np.stack([x for x, _ in items]))  # (b, 3, S, S) uint8
    return images, torch.tensor([y for _, y in items], dtype=torch.int64)  # (b,)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_entry(path: Path) -> Dict[str, Any]:
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_split(
    dataset: Dataset, tmp: Path, split: str, size: int, num_classes: int, num_workers: int, progress: bool
) -> Dict[str, Any]:
    """Decode `dataset` (yielding (uint8 [3, S, S], label)) in parallel into {split}_images/labels.npy."""
    from tqdm import tqdm

    n = len(dataset)
    images_path, labels_path = tmp / f"{split}_images.npy", tmp / f"{split}_labels.npy"
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    labels = np.empty(n, dtype=np.int64)
    loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    pos = 0
    with tqdm(total=n, desc=f"cache {split}", disable=not progress, leave=False) as bar:
        for batch, batch_labels in loader:
            images[pos : pos + len(batch)] = batch.numpy()
            labels[pos : pos + len(batch)] = batch_labels.numpy()
            pos += len(batch)
            bar.update(len(batch))
    if pos != n:
        raise DataError(f"the {split} split yielded {pos} images but reports {n}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{split} image {int(bad[0])} has label {int(labels[bad[0]])}, outside 0..{num_classes - 1}")
    images.flush()
    del images  # close the memmap before hashing
    np.save(labels_path, labels)
    return {"count": n, "images": _file_entry(images_path), "labels": _file_entry(labels_path)}


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
    from .sources import build_sources
    from .spec import parse_data_spec

    if size < 8:
        raise DataError(f"cache size={size} is too small; use >= 8 (256 for 224 px models)")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers} must be >= 0")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"cache directory {str(out)!r} already exists and is not empty; remove it or choose another")
    resize = SquareResize(size)
    train, val, names, skipped = build_sources(spec, resize, resize, skip_bad_images=skip_bad_images, seed=seed)

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


# ----------------------------------------------------------------------------------------- reading
def read_manifest(root: str | os.PathLike) -> Dict[str, Any]:
    """The manifest of cache `root`, with its structure checked (files are not touched)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cache directory {str(root)!r} does not exist; build one with `vitsweep data cache`")
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(root)!r} is not a vitsweep cache: no {MANIFEST} (build one with `vitsweep data cache`)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"cache manifest {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise DataError(f"cache manifest {str(path)!r} must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"cache manifest {str(path)!r} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        raise DataError(
            f"cache manifest {str(path)!r} has format {manifest['format']!r} version {manifest['version']!r}; "
            f"this vitsweep reads {FORMAT!r} version {VERSION}"
        )
    if manifest["layout"] != LAYOUT or manifest["dtype"] != "uint8":
        raise DataError(f"cache manifest {str(path)!r}: layout {manifest['layout']!r} dtype {manifest['dtype']!r}; expected {LAYOUT} uint8")
    for split in SPLITS:
        entry = manifest["splits"].get(split) if isinstance(manifest["splits"], dict) else None
        if not isinstance(entry, dict) or not all(k in entry for k in ("count", "images", "labels")):
            raise DataError(f"cache manifest {str(path)!r} has no complete entry for split {split!r}")
    return manifest


def check_cache_dir(root: str | os.PathLike) -> Dict[str, Any]:
    """Manifest valid and every file present with the byte size the manifest records (stat only)."""
    manifest = read_manifest(root)
    for split in SPLITS:
        for key in ("images", "labels"):
            entry = manifest["splits"][split][key]
            path = Path(root) / entry["path"]
            if not path.is_file():
                raise DataError(f"cache file {str(path)!r} is missing (listed in the manifest)")
            actual = path.stat().st_size
            if actual != entry["bytes"]:
                raise DataError(
                    f"cache file {str(path)!r} has {actual} bytes but the manifest expects {entry['bytes']} "
                    f"({'truncated' if actual < entry['bytes'] else 'larger than written'}); rebuild the cache"
                )
    return manifest


def verify_cache(root: str | os.PathLike) -> Dict[str, Any]:
    """`check_cache_dir` plus the sha256 of every file (reads the whole cache)."""
    manifest = check_cache_dir(root)
    for split in SPLITS:
        for key in ("images", "labels"):
            entry = manifest["splits"][split][key]
            path = Path(root) / entry["path"]
            digest = _sha256(path)
            if digest != entry["sha256"]:
                raise DataError(
                    f"cache file {str(path)!r} has sha256 {digest[:16]}... but the manifest records "
                    f"{entry['sha256'][:16]}...; rebuild the cache"
                )
    return manifest


class CacheDataset(Dataset):
    """One split of a cache: (uint8 tensor [3, S, S], int label). The images file is memory-mapped
    lazily in each process (a pickled dataset carries the path, not the pixels)."""

    def __init__(self, images_path: str, labels: np.ndarray, shape: Tuple[int, ...]) -> None:
        self.images_path = images_path
        self.labels = labels
        self.targets = labels.tolist()
        self.shape = shape
        self._images: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self._images is None:
            self._images = _open_images(self.images_path, self.shape)
        return torch.from_numpy(np.array(self._images[index])), self.targets[index]  # (3, S, S) uint8

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def _open_images(path: str, shape: Tuple[int, ...]) -> np.ndarray:
    images = np.load(path, mmap_mode="r")
    if images.dtype != np.uint8 or images.shape != tuple(shape):
        raise DataError(f"cache file {path!r} holds {images.dtype} {list(images.shape)}; the manifest says uint8 {list(shape)}")
    return images


def load_cache_split(root: str | os.PathLike, split: str, manifest: Dict[str, Any]) -> CacheDataset:
    entry = manifest["splits"][split]
    size, n = manifest["size"], entry["count"]
    shape = (n, 3, size, size)
    images_path = str(Path(root) / entry["images"]["path"])
    _open_images(images_path, shape)  # header check now rather than in a worker
    labels_path = Path(root) / entry["labels"]["path"]
    labels = np.load(labels_path)
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise DataError(f"cache file {str(labels_path)!r} holds {labels.dtype} {list(labels.shape)}; the manifest says int64 [{n}]")
    return CacheDataset(images_path, labels, shape)


def build_cache_data(root: str, spec: str, preprocessing: Preprocessing, verify: Optional[bool] = None):
    """The DataBundle of cache `root`: uint8 datasets plus the batch transforms that crop, flip and
    normalise on the device (`finetune.data.gpu_transforms`). With augment='none' training uses the
    eval transform. `verify`: checksum every file (None: only when the cache is small)."""
    from .gpu_transforms import BatchEvalTransform, BatchTrainTransform
    from .sources import DataBundle

    manifest = check_cache_dir(root)
    total = sum(manifest["splits"][s][k]["bytes"] for s in SPLITS for k in ("images", "labels"))
    if verify or (verify is None and total <= VERIFY_ON_LOAD_BYTES):
        verify_cache(root)
    train, val = (load_cache_split(root, split, manifest) for split in SPLITS)
    names = list(manifest["class_names"])
    eval_tf = BatchEvalTransform(preprocessing)
    train_tf = eval_tf if preprocessing.augment == "none" else BatchTrainTransform(preprocessing)
    return DataBundle(
        train, val, names, len(names), spec, preprocessing, int(manifest.get("skipped_images", 0)),
        train_batch_transform=train_tf, eval_batch_transform=eval_tf,
    )


def describe(manifest: Dict[str, Any]) -> str:
    """A few lines summarising a manifest (for the CLI)."""
    s = manifest["size"]
    lines = [
        f"source:   {manifest['source']}",
        f"classes:  {manifest['num_classes']}",
        f"images:   {s}x{s} uint8 {manifest['layout']} ({manifest['resize']})",
    ]
    for split in SPLITS:
        e = manifest["splits"][split]
        lines.append(f"{split + ':':9} {e['count']} images, {e['images']['bytes'] / 2**20:.1f} MiB ({e['images']['path']})")
    lines.append(f"total:    {manifest['total_bytes'] / 2**30:.3f} GiB; skipped images: {manifest['skipped_images']}")
    lines.append(f"built:    {manifest['created']} in {manifest['build_seconds']:.1f} s")
    return "\n".join(lines)
