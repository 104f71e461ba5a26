"""Atomic file writes (a crash mid-write leaves the previous file intact: temp file + rename), strict
JSON, and the one policy for non-finite numbers.

Non-finite numbers: in memory a metric keeps its float value, NaN and inf included (a diverged
epoch's losses are NaN). Every output (JSON files, Ray reports, report tables) turns NaN and +-inf
into None (JSON null; JSON has no NaN) with `json_safe` / `finite_or_none`, never into strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_tree_atomically(source: str | os.PathLike, dest: str | os.PathLike, last: str = "result.json") -> None:
    """Copy the regular files of `source` into `dest`, each beside its destination and renamed into place
    (a full disk leaves the previous file or none, never a truncated one under the real name); files
    named `last` go last (their presence means the rest of their directory is complete). Links are
    not followed."""
    import shutil

    source, dest = Path(source), Path(dest)
    files = sorted((p for p in source.rglob("*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: (p.name == last, str(p)))
    for path in files:
        with atomic_path(dest / path.relative_to(source)) as tmp:
            shutil.copyfile(path, tmp)


def finite_or_none(value: Any) -> Any:
    """None for a non-finite real number (NaN, inf, -inf); any other value unchanged."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return None
    return value


def json_safe(obj: Any) -> Any:
    """`obj` ready for strict JSON: non-finite numbers become None (`finite_or_none`), tuples become
    lists and dict keys strings, at any depth."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return finite_or_none(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`json_safe(obj)` as indented, key-sorted strict JSON, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_tagged_json(path: str | os.PathLike, fmt: str, what: str, error: type) -> dict:
    """A JSON object written by vitsweep with ``"format": fmt``; anything else raises `error` naming the
    file and what it is not (missing, invalid JSON, not an object, another format)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {str(path)!r} is not valid JSON (corrupt?): {err}") from err
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{str(path)!r} is not a {what} (format={found!r}, expected {fmt!r})")
    return data


def move_aside(path: Path) -> Path:
    """Rename `path` to ``<path>.old-<YYYYmmdd-HHMMSS>`` (plus ``-N`` if taken); returns the new path.
    Used instead of deleting earlier results when the user asks to start afresh (``--overwrite``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    return target
