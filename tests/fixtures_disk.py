"""Helpers for the output-rule and full-disk tests: hash a tree, mount a real small tmpfs (root only),
fill it, remount it read-only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounts a real tmpfs: needs root (CI runs as root)")


def tree_hash(root: Path) -> Dict[str, str]:
    """Every path under `root` (root included, links not followed) -> sha256 of a file's bytes, a
    link's target, or "dir"."""
    out: Dict[str, str] = {}
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "8m") mounted at `where` for the block; unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    """``mount -o remount,ro|rw`` of a tmpfs mounted by `tmpfs`."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(where: Path, name: str = "filler.bin") -> Path:
    """Write zeros to ``where/name`` until the filesystem is full; returns the file."""
    path = where / name
    block = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    with open(path, "ab", buffering=0) as fh:  # the last few bytes too
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass
    return path


def vitsweep(*argv, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`vitsweep ARGV` in a fresh process (the real entry point, its exit code and its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, argv)], cwd=kwargs.pop("cwd", REPO),
                          env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def one_line_refusal(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the error naming every fragment."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert "error:" in line, err[-3000:]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line
