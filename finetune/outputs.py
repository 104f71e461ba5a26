"""The output rule of every command that writes (`train`, `eval`, `fidelity`, `report --out`,
`data cache`, `data show`, `bench`): it never writes into another run's or experiment's directory.

A directory output (`check_output_dir`) is accepted when it
- does not exist (its nearest existing ancestor must be a writable directory), or is empty, or
- holds the marker `OUTPUT_MARKER` of the same kind: this very command made it before.
Anything else (another command's marker, a sweep experiment, a training run without a marker, any other
files) is refused in one line naming the path and what it holds, before anything is written. A
symbolic link is never followed out of the output: `--out` itself, or any entry inside it, being a
link is refused. `OutputDir.claim()` then creates the directory and writes the marker atomically;
the command writes its files with `finetune.io_utils.atomic_path` (temporary sibling, fsync, rename),
so a crash or a full disk leaves the previous file or none, never a truncated file under its name.

A file output (`check_output_file`: `data show`, `bench --out FILE.json`) is a new file, or a regular
file of the expected suffix outside any other command's output directory; it is replaced atomically.

Why by hand: no library keeps vitsweep's notion of "whose directory is this".
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from .errors import ConfigError
from .io_utils import write_json

OUTPUT_MARKER = ".vitsweep-output.json"
MARKER_FORMAT = "vitsweep-output"
KINDS = ("train", "eval", "fidelity", "report", "data-cache", "bench")
EXPERIMENT_MARKER = "vitsweep_experiment.json"  # = orchestrator.results.MARKER (finetune imports no orchestrator)
# Files that say "a training run lives here" in a directory without a marker (runs made before the marker).
_RUN_FILES = ("result.json", "weights.safetensors", "checkpoint")
# Errors of the disk itself, turned into one line by the CLI (`disk_error_message`).
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the filesystem"}


def read_marker(directory: Path) -> Optional[Dict]:
    """The output marker of `directory` as a dict ({} when unreadable), or None when there is none."""
    path = directory / OUTPUT_MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else {}


def describe_contents(directory: Path) -> str:
    """What `directory` holds, in a few words: whose output it is, or its first few names."""
    marker = read_marker(directory)
    if marker is not None:
        kind = marker.get("kind") or "unknown"
        return f"the output of `vitsweep {kind}`" if kind in KINDS else "an unreadable vitsweep output marker"
    if (directory / EXPERIMENT_MARKER).exists() or any(directory.glob("experiment_state-*.json")):
        return "a sweep experiment"
    if any((directory / name).exists() for name in _RUN_FILES):
        return "a training run (result.json / weights / checkpoint)"
    names = sorted(p.name for p in directory.iterdir())
    return "files: " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _check_text(text: str, flag: str) -> Path:
    if not isinstance(text, (str, os.PathLike)) or not str(text).strip():
        raise ConfigError(f"{flag} {text!r} is empty; give the output path")
    if "\x00" in str(text):
        raise ConfigError(f"{flag} {str(text)!r} holds a NUL character")
    path = Path(text).expanduser()
    if path.is_symlink():
        target = os.readlink(path)
        state = "" if path.exists() else " that points nowhere"
        raise ConfigError(f"{flag} {str(path)!r} is a symbolic link{state} (to {target!r}); give a real path, "
                          "outputs never follow links")
    return path


def _check_writable_ancestor(path: Path, flag: str) -> None:
    """The nearest existing directory at or above `path` accepts new entries (not read-only, writable)."""
    ancestor = path
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        try:
            ro = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        why = "is on a read-only filesystem" if ro else "is not writable"
        raise ConfigError(f"{flag} {str(path)!r}: {str(ancestor)!r} {why}; choose another {flag}")


def find_symlink(directory: Path) -> Optional[Path]:
    """The first symbolic link at any depth inside `directory` (links are not followed), or None."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(root, name)):
                return Path(root) / name
    return None


@dataclass
class OutputDir:
    """A checked output directory; `claim()` before the first write."""

    path: Path
    kind: str
    reused: bool  # it already held this kind's marker

    def claim(self, details: Optional[Dict] = None) -> Path:
        """Create the directory and write (or refresh) its marker, atomically; returns the path."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / OUTPUT_MARKER, {
            "format": MARKER_FORMAT, "kind": self.kind, "version": 1, **(details or {}),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        return self.path


def check_output_dir(text: str | os.PathLike, kind: str, *, flag: str = "--out", accept_own: bool = True,
                     legacy_own: Sequence[str] = ()) -> OutputDir:
    """Check the output directory of `vitsweep <kind>` without writing anything (see the module docstring).

    `accept_own`: a directory with this kind's marker is accepted (else it is refused like any other
    directory that holds files). `legacy_own`: names that identify this kind's directories made before
    markers existed (train: result.json, checkpoint)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = _check_text(text, flag)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is an existing file, not a directory")
    _check_writable_ancestor(path, flag)
    if not path.is_dir() or not any(path.iterdir()):
        return OutputDir(path, kind, reused=False)
    marker = read_marker(path)
    own = (marker is not None and marker.get("kind") == kind) or (
        marker is None and legacy_own and any((path / n).exists() for n in legacy_own)
        and not (path / EXPERIMENT_MARKER).exists())
    if not (own and accept_own):
        raise ConfigError(f"{flag} {str(path)!r} already holds {describe_contents(path)}; "
                          f"`vitsweep {kind}` writes only into a new or empty directory"
                          + (" or one it made itself" if accept_own else "") + f"; choose another {flag}")
    link = find_symlink(path)
    if link is not None:
        raise ConfigError(f"{flag} {str(path)!r} holds a symbolic link {str(link)!r} (to {os.readlink(link)!r}); "
                          "outputs never follow links out of their directory: remove it or choose another "
                          f"{flag}")
    return OutputDir(path, kind, reused=True)


def check_output_file(text: str | os.PathLike, suffixes: Sequence[str], *, flag: str = "--out") -> Path:
    """A file output: refused when it is a link, not a regular file, lacks one of `suffixes`, or lies
    in another command's output directory or an experiment (where it would replace that work's files)."""
    path = _check_text(text, flag)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {str(path)!r} exists and is not a regular file")
    _check_writable_ancestor(path, flag)
    parent = path.parent
    if parent.is_dir():
        marker = read_marker(parent)
        holder = None
        if marker is not None or (parent / EXPERIMENT_MARKER).exists() or any((parent / n).exists() for n in _RUN_FILES):
            holder = describe_contents(parent)
        if holder is not None:
            raise ConfigError(f"{flag} {str(path)!r} is inside {str(parent)!r}, which holds {holder}; "
                              f"choose a path outside it")
    return path


def disk_error_message(err: OSError) -> Optional[str]:
    """One line for an OSError of the disk (full, read-only, quota, permissions), else None."""
    why = DISK_ERRNOS.get(err.errno)
    if why is None:
        return None
    where = f" writing {err.filename!r}" if err.filename else ""
    return (f"{why}{where} ({os.strerror(err.errno)}); files written before are kept, files being written "
            "were not put in place. Free space (or fix the permissions) and run the command again")
