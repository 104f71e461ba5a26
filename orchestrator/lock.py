"""The experiment lock: one driver (`vitsweep run` or `resume`) at a time per experiment.

Two drivers on one experiment both write Tune's state and checkpoints: trials then fail with
"checkpoint does not exist on storage anymore" and the report shows finished trials as errored.

The lock is the file `LOCK_NAME` in the experiment, a JSON object: ``host``, ``pid``, ``pid_start``
(the process's start time in clock ticks since boot, from /proc: a reused pid is not the holder),
``since``, ``heartbeat`` (seconds since the epoch), ``command`` and a random ``token``.

Whether a holder is alive:
- same host: the pid exists (``os.kill(pid, 0)``) and started at ``pid_start``;
- another host: its heartbeat (the newer of the file's mtime and ``heartbeat``) is under
  `STALE_AFTER_S` old; the holder refreshes it every `HEARTBEAT_S` from a daemon thread.
A lock whose holder is not alive is stale: it is taken over with a warning.

Creation: locally ``os.open(O_CREAT | O_EXCL)``, atomic on local disks and NFSv3+. A takeover goes
through a second exclusive file (``LOCK_NAME + ".takeover"``) so two drivers that both find the same
stale lock cannot both take it. On an object store (S3, GCS through pyarrow) there is no
write-if-absent: the driver checks that no live lock exists, writes its own, waits `SETTLE_S`, reads it
back and holds the lock only if its token is still there. Race window: two drivers whose check and
write both fall within `SETTLE_S` of each other, and whose writes were then read back in the order
written, can both believe they hold it; start drivers on one experiment seconds apart.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import pyarrow.fs as pafs

from finetune.errors import ConfigError

from .storage import Storage

_logger = logging.getLogger(__name__)

LOCK_NAME = ".vitsweep.lock"
TAKEOVER_SUFFIX = ".takeover"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # another host's lock without a heartbeat for this long is stale
SETTLE_S = 2.0  # object stores: wait between writing the lock and reading it back
UNREADABLE_GRACE_S = 10.0  # an empty or unparsable lock younger than this is being written


def _pid_start(pid: int) -> Optional[int]:
    """Start time of process `pid` in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now_start = _pid_start(pid)
    return start is None or now_start is None or now_start == start


def describe(holder: Dict[str, Any]) -> str:
    return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, since {holder.get('since')} "
            f"(vitsweep {holder.get('command') or '?'})")


class ExperimentLock:
    """Held by this process from `acquire` until `release`; use as a context manager."""

    def __init__(self, exp: Storage, command: str, *, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S) -> None:
        self.exp = exp
        self.command = command
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self.token = uuid.uuid4().hex
        self.path = f"{exp.path}/{LOCK_NAME}"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False
        self.created_dir = False

    # ------------------------------------------------------------------------------------ content
    def _content(self) -> bytes:
        pid = os.getpid()
        return (json.dumps({
            "host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": time.time(), "command": self.command, "token": self.token,
        }, indent=1) + "\n").encode()

    def _read(self, path: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The lock's content plus ``_mtime``; None if there is none; {} (with ``_mtime``) if unparsable."""
        path = path or self.path
        fs = self.exp.filesystem
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            with fs.open_input_stream(path) as stream:
                raw = stream.read()
        except FileNotFoundError:
            return None  # released meanwhile
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        return {**data, "_mtime": mtime}

    def holder_alive(self, holder: Dict[str, Any]) -> bool:
        """`holder` (a `_read` result) is a live driver, by the rules in the module docstring."""
        beats = [t for t in (holder.get("_mtime"), holder.get("heartbeat")) if isinstance(t, (int, float))]
        age = time.time() - max(beats) if beats else float("inf")
        if not holder.get("token"):
            return age < UNREADABLE_GRACE_S
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
            start = holder.get("pid_start")
            return _pid_alive(pid, start if isinstance(start, int) else None)
        return age < self.stale_after_s

    def _refuse(self, holder: Dict[str, Any]) -> ConfigError:
        return ConfigError(
            f"experiment {self.exp.uri!r} is in use by another driver: {describe(holder)}; wait for it to "
            f"end or stop it (Ctrl-C, or SIGTERM to pid {holder.get('pid')}), then run `vitsweep resume "
            f"{self.exp.uri}`. A lock left by a driver that died is taken over by itself ({LOCK_NAME})"
        )

    # ------------------------------------------------------------------------------------ acquire
    def acquire(self) -> "ExperimentLock":
        if self.exp.is_local:
            self._acquire_local()
        else:
            self._acquire_object_store()
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="vitsweep-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create_local(self) -> bool:
        if not os.path.isdir(self.exp.path):
            os.makedirs(self.exp.path, exist_ok=True)
            self.created_dir = True  # removed again on release if nothing else was written
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._content())
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _acquire_local(self) -> None:
        if self._create_local():
            return
        holder = self._read()
        if holder is None:  # released between our two calls
            if self._create_local():
                return
            holder = self._read() or {}
        if self.holder_alive(holder):
            raise self._refuse(holder)
        self._take_over_local(holder)

    def _take_over_local(self, stale: Dict[str, Any]) -> None:
        guard = self.path + TAKEOVER_SUFFIX
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # another driver is taking over right now, or one died doing so (the guard is then old)
            age = time.time() - os.stat(guard).st_mtime
            if age < UNREADABLE_GRACE_S:
                raise ConfigError(f"experiment {self.exp.uri!r}: another driver is taking over its stale "
                                  f"lock right now; try again in a few seconds") from None
            os.unlink(guard)
            return self._take_over_local(stale)
        os.close(fd)
        try:
            current = self._read()
            if current is not None and current.get("token") != stale.get("token"):
                if self.holder_alive(current):  # someone else took it over first
                    raise self._refuse(current)
                stale = current
            if current is not None:
                os.unlink(self.path)
            _logger.warning("taking over the stale lock of experiment %s: %s is no longer running",
                            self.exp.uri, describe(stale))
            if not self._create_local():
                raise self._refuse(self._read() or {})
        finally:
            os.unlink(guard)

    def _acquire_object_store(self) -> None:
        holder = self._read()
        if holder is not None:
            if self.holder_alive(holder):
                raise self._refuse(holder)
            _logger.warning("taking over the stale lock of experiment %s: %s", self.exp.uri, describe(holder))
        self.exp.write_bytes(LOCK_NAME, self._content())
        time.sleep(self.settle_s)
        back = self._read()
        if back is None or back.get("token") != self.token:
            raise self._refuse(back or {})

    # ------------------------------------------------------------------------------- heartbeat/release
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except OSError as err:  # a storage hiccup: the next beat retries
                _logger.warning("could not refresh the lock of %s: %s", self.exp.uri, err)

    def refresh(self) -> None:
        current = self._read()
        if current is None or current.get("token") != self.token:
            _logger.warning("the lock of experiment %s is no longer ours (now: %s)", self.exp.uri,
                            describe(current) if current else "none")
            return
        if self.exp.is_local:
            os.utime(self.path)
        else:
            data = {k: v for k, v in current.items() if not k.startswith("_")}
            self.exp.write_bytes(LOCK_NAME, (json.dumps({**data, "heartbeat": time.time()}, indent=1) + "\n").encode())

    def release(self) -> None:
        """Remove the lock if it is still ours; safe to call more than once."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.get("token") == self.token:
            try:
                self.exp.filesystem.delete_file(self.path)
            except FileNotFoundError:
                pass  # already gone: nothing to release
        if self.exp.is_local and self.created_dir and not os.listdir(self.exp.path):
            os.rmdir(self.exp.path)  # a sweep refused after locking leaves no empty experiment behind

    def __enter__(self) -> "ExperimentLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def experiment_lock(exp: Storage, command: str) -> ExperimentLock:
    """The lock of `exp` for `command` ("run" or "resume"), not yet acquired: ``with experiment_lock(...)``."""
    return ExperimentLock(exp, command)


def live_holder(exp: Storage) -> Optional[Dict[str, Any]]:
    """The live driver holding `exp`'s lock, or None (no lock, or a stale one)."""
    probe = ExperimentLock(exp, "check")
    holder = probe._read()
    return holder if holder is not None and probe.holder_alive(holder) else None
