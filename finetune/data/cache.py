"""Decode-once cache, reading side: every image of a source decoded once, resized to a fixed square
and stored as uint8, so that training reads pixels instead of decoding JPEGs (`cache:<DIR>`). The
cache is written by `finetune.data.cache_build` (`vitsweep data cache`).

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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..io_utils import sha256_file
from ..safe_files import check_regular, open_regular

FORMAT = "vitsweep-cache"
VERSION = 1
SPLITS = ("train", "val")
LAYOUT = "NCHW"
MANIFEST = "manifest.json"
# Caches up to this many bytes are checksummed on every load (about a second); larger ones on request
# (`verify_cache`), since hashing ImageNet-100 (~25 GB) takes minutes.
VERIFY_ON_LOAD_BYTES = 256 * 2**20
_REQUIRED = ("format", "version", "source", "class_names", "size", "layout", "dtype", "splits")
_FILES = ("images", "labels")


def read_manifest(root: str | os.PathLike) -> Dict[str, Any]:
    """The manifest of cache `root`, with its structure checked (files are not touched)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cache directory {str(root)!r} does not exist; build one with `vitsweep data cache`")
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise DataError(f"{str(root)!r} is not a vitsweep cache: no {MANIFEST} (build one with `vitsweep data cache`)")
    try:
        with open_regular(path, "cache manifest", DataError, mode="r") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    names = manifest["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise DataError(f"cache manifest {str(path)!r}: class_names must be a list of at least 2 names, not {_short(names)}")
    if not _count(manifest["size"], 1):
        raise DataError(f"cache manifest {str(path)!r}: size={manifest['size']!r} must be a positive integer")
    if not _count(manifest.get("skipped_images", 0), 0):
        raise DataError(f"cache manifest {str(path)!r}: skipped_images={manifest['skipped_images']!r} must be an integer >= 0")
    for split in SPLITS:
        entry = manifest["splits"].get(split) if isinstance(manifest["splits"], dict) else None
        if not isinstance(entry, dict) or not all(k in entry for k in ("count", *_FILES)):
            raise DataError(f"cache manifest {str(path)!r} has no complete entry for split {split!r}")
        if not _count(entry["count"], 1):
            raise DataError(f"cache manifest {str(path)!r}: {split} count={entry['count']!r} must be a positive integer")
        for key in _FILES:
            f = entry[key]
            if not (isinstance(f, dict) and _plain_name(f.get("path")) and _count(f.get("bytes"), 0)
                    and isinstance(f.get("sha256"), str)):
                raise DataError(
                    f"cache manifest {str(path)!r}: {split} {key} must give a file name in the cache directory, "
                    f"its bytes and sha256, not {_short(f)}"
                )
    return manifest


def _count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _plain_name(name: Any) -> bool:
    """A file name inside the cache directory (no path separators, not '.' or '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _files(root: str | os.PathLike, manifest: Dict[str, Any]) -> Iterator[Tuple[Path, Dict[str, Any]]]:
    """(path, manifest entry) of every data file, train then val, images then labels."""
    for split in SPLITS:
        for key in _FILES:
            entry = manifest["splits"][split][key]
            yield Path(root) / entry["path"], entry


def check_cache_dir(root: str | os.PathLike) -> Dict[str, Any]:
    """Manifest valid and every file present with the byte size the manifest records (stat only)."""
    manifest = read_manifest(root)
    for path, entry in _files(root, manifest):
        if not os.path.lexists(path):
            raise DataError(f"cache file {str(path)!r} is missing (listed in the manifest)")
        actual = check_regular(path, "cache file", DataError).st_size  # a FIFO would block np.load
        if actual != entry["bytes"]:
            raise DataError(
                f"cache file {str(path)!r} has {actual} bytes but the manifest expects {entry['bytes']} "
                f"({'truncated' if actual < entry['bytes'] else 'larger than written'}); rebuild the cache"
            )
    return manifest


def verify_cache(root: str | os.PathLike) -> Dict[str, Any]:
    """`check_cache_dir` plus the sha256 of every file (reads the whole cache)."""
    manifest = check_cache_dir(root)
    for path, entry in _files(root, manifest):
        digest = sha256_file(path)
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


def _load_npy(path: str | os.PathLike, mmap_mode: Optional[str] = None) -> np.ndarray:
    """`np.load` of a plain (pickle-free) .npy file; anything else is a DataError naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # numpy's errors for a bad header, object arrays, short files
        raise DataError(f"cache file {str(path)!r} is not a readable .npy array: {e}; rebuild the cache") from e


def _open_images(path: str, shape: Tuple[int, ...]) -> np.ndarray:
    images = _load_npy(path, mmap_mode="r")
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
    labels = _load_npy(labels_path)
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise DataError(f"cache file {str(labels_path)!r} holds {labels.dtype} {list(labels.shape)}; the manifest says int64 [{n}]")
    classes = len(manifest["class_names"])
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"cache file {str(labels_path)!r}: label {int(labels[i])} at index {i} (and {bad.size - 1} more) is outside "
            f"0..{classes - 1} ({classes} classes in the manifest); rebuild the cache"
        )
    return CacheDataset(images_path, labels, shape)


def open_cache(root: str | os.PathLike, verify: Optional[bool] = None) -> Tuple[CacheDataset, CacheDataset, Dict[str, Any]]:
    """(train, val, manifest) of cache `root`, every file checked by size; `verify`: checksum every
    file too (None: only when the cache is at most VERIFY_ON_LOAD_BYTES)."""
    manifest = check_cache_dir(root)
    total = sum(entry["bytes"] for _, entry in _files(root, manifest))
    if verify or (verify is None and total <= VERIFY_ON_LOAD_BYTES):
        verify_cache(root)
    train, val = (load_cache_split(root, split, manifest) for split in SPLITS)
    return train, val, manifest


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
