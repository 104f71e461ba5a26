"""Regular files only: what vitsweep reads (images, caches, weights, sidecars, the cost cache) must be
a plain file. A FIFO named ``x.png`` blocks ``open()`` until a writer appears (forever, in practice),
and a character device such as ``/dev/zero`` or ``/dev/urandom`` never ends; sockets and block
devices are no data set either.

`check_regular` is the cheap check made before anything is opened (``os.stat``: links followed, so a
symlink to a regular file is fine). `open_regular` closes the race between that check and the open:
it opens with ``O_NONBLOCK`` (a FIFO then opens at once instead of blocking), checks the open file
with ``fstat`` and only then hands out an ordinary blocking file object.
"""

from __future__ import annotations

import os
import stat
from typing import IO, Callable

KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str:
    """A short description of what a ``st_mode`` is: ``"a regular file"``, ``"a FIFO (named pipe)"`` ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((text for test, text in KINDS if test(mode)), "not a regular file")


def not_regular_message(path: str | os.PathLike, what: str, mode: int) -> str:
    return (f"{what} {str(path)!r} is {file_kind(mode)}, not a regular file; vitsweep reads regular files "
            "only (a FIFO or device would block or never end)")


def check_regular(path: str | os.PathLike, what: str, error: Callable[[str], Exception]) -> os.stat_result:
    """``os.stat(path)`` when it is a regular file; else raise ``error(message)`` naming it and what it is
    (missing, a FIFO, a socket, a device, a directory)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(not_regular_message(path, what, st.st_mode))
    return st


def is_regular(path: str | os.PathLike) -> bool:
    """Whether `path` is (or links to) a regular file; False for missing files too."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | os.PathLike, what: str, error: Callable[[str], Exception], mode: str = "rb") -> IO:
    """`path` opened for reading (``mode``: ``"rb"`` or ``"r"``) if it is a regular file at the moment it
    is opened; otherwise ``error(message)`` is raised and nothing blocks (``O_NONBLOCK`` + ``fstat``)."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_regular reads only ('rb' or 'r'), not {mode!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be opened: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(not_regular_message(path, what, st.st_mode))
        os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


__all__ = ["check_regular", "file_kind", "is_regular", "not_regular_message", "open_regular"]
