"""Decode-once cache, writing side (`vitsweep data cache`): decode every train and val image of a
source once, resize it to an S x S square and store it as uint8 `.npy` files plus a manifest. The
layout and the reasons for it are in `finetune.data.cache`, which reads it back.

Writing is atomic and resumable. Everything goes to a work directory beside DIR
(``.<name>.partial``) that is renamed to DIR at the end, so an interrupted build never leaves a half
cache under DIR. Images are decoded in shards of `shard_size` images, written with `os.pwrite` at their
fixed offsets in preallocated ``.npy`` files; after each shard the files are fsynced and
``progress.json`` records the shard as done (atomically). A build of the same
plan (source, size, seed, counts, class names, shard size) started again continues from the shards
already done; any other plan starts afresh. A build that fails on bad data removes its work directory. The images land at fixed offsets of a preallocated
``.npy`` whatever the order of shards, so a resumed build writes the same bytes as an uninterrupted one.

One build per DIR at a time: an exclusive `fcntl.flock` on ``.<name>.lock`` beside DIR; a second build
(another shell, a second sweep driver) waits for it and then finds the cache complete. flock is
per-host on some network filesystems: build a cache shared by several machines from one of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from ..errors import DataError
from ..io_utils import sha256_file, write_json
from .cache import FORMAT, LAYOUT, MANIFEST, SPLITS, VERSION, read_manifest
from .images import to_rgb
from .sources import build_sources
from .spec import parse_data_spec

PROGRESS = "progress.json"
DEFAULT_SHARD_SIZE = 1024
LINE_EVERY_S = 5.0  # progress lines (no terminal): at most one per this many seconds, plus each split's end


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


def work_dir(out: Path) -> Path:
    """The work directory of a build of cache `out` (renamed to `out` when complete)."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def build_lock(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the exclusive lock of cache `out` (``.<name>.lock`` beside it); waits for another holder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build of {out} to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _preallocate(path: Path, shape: Tuple[int, ...], dtype, resume: bool) -> int:
    """The data offset of a `.npy` file of `shape` at `path`: the existing file when resuming (same
    shape and dtype), else a new one, its header written and its length set (sparse until written).
    Written with `os.pwrite`, not a writable memory map: on a full disk a write raises ENOSPC (an
    error to report), where a store into a mapped page of a full tmpfs kills the process (SIGBUS)."""
    dtype = np.dtype(dtype)
    if resume and path.is_file():
        try:
            existing = np.lib.format.open_memmap(path, mode="r")  # read-only: header and offset
            if existing.shape == shape and existing.dtype == dtype:
                return int(existing.offset)
        except ValueError:
            pass
    with open(path, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(fh, header)
        offset = fh.tell()
        fh.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
    return offset


class _Progress:
    """A tqdm bar on a terminal; otherwise a line every `LINE_EVERY_S` and at the end (`log`)."""

    def __init__(self, split: str, total: int, done: int, bar: bool, log: Callable[[str], None]) -> None:
        self.split, self.total, self.done, self.log = split, total, done, log
        self.bar = tqdm(total=total, initial=done, desc=f"cache {split}", leave=False) if bar else None
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= LINE_EVERY_S or self.done == self.total:
            self.last = time.monotonic()
            self.log(f"cache {self.split}: {self.done}/{self.total} images ({100 * self.done / max(1, self.total):.0f}%)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_split(dataset: Dataset, work: Path, split: str, plan: Dict[str, Any], done: List[int],
                 save: Callable[[], None], num_workers: int, bar: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    """Decode the shards of `dataset` (yielding (uint8 [3, S, S], label)) not in `done` into
    {split}_images.npy and the labels, marking each shard done (`save`) once it is flushed."""
    n, size, shard, num_classes = len(dataset), plan["size"], plan["shard_size"], len(plan["class_names"])
    images_path, labels_path = work / f"{split}_images.npy", work / f"{split}_labels.npy"
    partial_labels = work / f"{split}_labels.partial.npy"
    resume = bool(done)
    image_at = _preallocate(images_path, (n, 3, size, size), np.uint8, resume)
    label_at = _preallocate(partial_labels, (n,), np.int64, resume)
    shards = [k for k in range((n + shard - 1) // shard) if k not in done]
    batches = [list(range(i, min(i + 64, (k + 1) * shard, n))) for k in shards for i in range(k * shard, min((k + 1) * shard, n), 64)]
    left = {k: min(shard, n - k * shard) for k in shards}
    progress = _Progress(split, n, n - sum(left.values()), bar, log)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate)
    with open(images_path, "r+b") as images, open(partial_labels, "r+b") as labels:
        try:
            for indices, (batch, batch_labels) in zip(batches, loader):
                first = indices[0]  # (b, 3, S, S) uint8 and (b,) int64, C order, at their fixed offsets
                os.pwrite(images.fileno(), batch.numpy().tobytes(), image_at + first * 3 * size * size)
                os.pwrite(labels.fileno(), batch_labels.numpy().astype(np.int64).tobytes(), label_at + first * 8)
                k = first // shard
                left[k] -= len(batch)
                if left[k] == 0:  # the shard is complete: on disk first, then recorded
                    os.fsync(images.fileno())
                    os.fsync(labels.fileno())
                    done.append(k)
                    save()
                progress.update(len(batch))
        finally:
            progress.close()
    if sum(left.values()):
        raise DataError(f"the {split} split yielded fewer images than the {n} it reports")
    values = np.array(np.load(partial_labels, mmap_mode="r"))  # (n,) int64
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        raise DataError(f"{split} image {int(bad[0])} has label {int(values[bad[0]])}, outside 0..{num_classes - 1}")
    np.save(labels_path, values)  # the partial labels stay until the whole build is done
    return {"count": n, "images": _file_entry(images_path), "labels": _file_entry(labels_path)}


def _resume_state(work: Path, plan: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, List[int]]:
    """The shards already done by an earlier build of the same `plan` in `work`; otherwise `work` is
    emptied (a different plan, or no readable progress) and nothing is done."""
    try:
        with open(work / PROGRESS) as fh:
            state = json.load(fh)
        if state.get("plan") == plan and all(isinstance(state["done"].get(s), list) for s in SPLITS):
            done = {s: [int(k) for k in state["done"][s]] for s in SPLITS}
            count = sum(len(v) for v in done.values())
            total = sum((plan["counts"][s] + plan["shard_size"] - 1) // plan["shard_size"] for s in SPLITS)
            log(f"resuming the build in {work}: {count} of {total} shards already done")
            return done
        if work.exists():
            log(f"{work} holds a build of another source, size or shard size; starting afresh")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {s: [] for s in SPLITS}


def _stderr_line(message: str) -> None:
    print(f"vitsweep: {message}", file=sys.stderr, flush=True)


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


def _check_build_args(size: int, num_workers: Optional[int], shard_size: int) -> int:
    """Refuse bad build arguments; returns the number of decoding workers (None: min(8, CPU count))."""
    if not 8 <= size <= 4096:
        raise DataError(f"cache size={size} must be in [8, 4096] (256 for 224 px models)")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers} must be >= 0")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= 1_000_000:
        raise DataError(f"shard_size={shard_size!r} must be an integer in [1, 1000000]")
    return num_workers


def build_cache(
    spec: str,
    out_dir: str | os.PathLike,
    size: int = 256,
    num_workers: Optional[int] = None,
    skip_bad_images: bool = False,
    seed: int = 0,
    progress: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    log: Optional[Callable[[str], None]] = None,
    exist_ok: bool = False,
) -> Dict[str, Any]:
    """Decode every train and val image of SPEC once into a cache at `out_dir`; returns the manifest.

    Args:
        spec: a `--data` spec of an image source (not `cache:`).
        out_dir: the cache directory; must not exist or be empty.
        size: side S of the stored square images (shorter side resized to S, centre crop).
        num_workers: decoding processes (DataLoader workers); None: min(8, CPU count).
        skip_bad_images: image folders only: drop unreadable files (counted in the manifest).
        seed: the synthetic source's seed when the spec does not set `seed=`.
        progress: a progress bar per split (else a line every few seconds through `log`).
        shard_size: images per shard, the unit an interrupted build keeps.
        log: where messages and progress lines go (default: stderr).
        exist_ok: a complete cache at `out_dir` (built by a build this one waited for) is returned
            instead of refused; the caller checks that it is the cache it wants.
    """
    num_workers = _check_build_args(size, num_workers, shard_size)
    log = log or _stderr_line
    out = Path(out_dir).expanduser()
    if exist_ok and (out / MANIFEST).is_file() and not out.is_symlink():
        return read_manifest(out)
    out = _check_cache_out(out_dir)  # the output rule: a new or empty directory, no links
    _check_free(out)
    resize = SquareResize(size)
    train, val, names, skipped = build_sources(spec, resize, resize, skip_bad_images=skip_bad_images, seed=seed)
    check_free_space(out, len(train) + len(val), size)
    is_synthetic = parse_data_spec(spec).kind == "synthetic"
    plan = {"format": FORMAT, "version": VERSION, "source": spec, "size": size, "seed": seed if is_synthetic else None,
            "skip_bad_images": skip_bad_images, "shard_size": shard_size, "class_names": list(names),
            "counts": {"train": len(train), "val": len(val)}}
    with build_lock(out, log):
        if exist_ok and (out / MANIFEST).is_file():  # another build finished it while this one waited
            return read_manifest(out)
        _check_free(out)
        start = time.perf_counter()
        work = work_dir(out)
        done = _resume_state(work, plan, log)

        def save() -> None:
            write_json(work / PROGRESS, {"plan": plan, "done": done})

        save()
        try:
            splits = {split: _write_split(ds, work, split, plan, done[split], save, num_workers, progress, log)
                      for split, ds in zip(SPLITS, (train, val))}
        except DataError:
            # Bad data, not an interruption: a rerun (e.g. with --skip-bad-images) is another plan anyway.
            shutil.rmtree(work, ignore_errors=True)
            raise
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                # The partial build is what fills the disk: removed, so the disk is usable again.
                shutil.rmtree(work, ignore_errors=True)
            raise
        manifest = _manifest(plan, splits, skipped, time.perf_counter() - start)
        with open(work / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        for leftover in (work / PROGRESS, *(work / f"{split}_labels.partial.npy" for split in SPLITS)):
            leftover.unlink()
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(work, out)
    return manifest


def _manifest(plan: Dict[str, Any], splits: Dict[str, Any], skipped: int, seconds: float) -> Dict[str, Any]:
    size = plan["size"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": plan["source"],
        "seed": plan["seed"],
        "class_names": plan["class_names"],
        "num_classes": len(plan["class_names"]),
        "size": size,
        "layout": LAYOUT,
        "dtype": "uint8",
        "label_dtype": "int64",
        "resize": f"shorter side to {size} (bicubic), centre crop {size}x{size}",
        "splits": splits,
        "skipped_images": skipped,
        "total_bytes": sum(f["bytes"] for s in splits.values() for f in (s["images"], s["labels"])),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3),
    }


def _check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"cache directory {str(out)!r} already exists and is not empty; remove it or choose another")
