"""The last intact copy of Tune's experiment state, kept by the driver (local storage).

Ray 2.60 writes ``experiment_state-<time>.json`` with a plain ``open(..., "w")`` in its staging directory
and copies it to the storage with pyarrow (`ray.tune.execution.tune_controller.TuneController.save_to_dir`,
`ray.train._internal.storage` syncer): neither is write-beside-then-rename, so a full disk leaves a
truncated state under the real name, and Tune then restores nothing. While `fit` runs, a daemon
thread of the driver reads the newest state every `INTERVAL_S`; when it changed and parses as a
complete state (`preflight.check_state_bytes`), it is written atomically to `LAST_GOOD` in the
experiment. `report` reads `LAST_GOOD` when the newest state is corrupt, and `resume` puts it back in
place of the corrupt one (which is kept aside as ``<name>.corrupt-<time>``).

`LAST_GOOD` starts with a dot, so Ray's ``experiment_state-*.json`` pattern never picks it up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

from finetune.errors import ConfigError
from finetune.io_utils import atomic_path

from .storage import Storage

_logger = logging.getLogger(__name__)

LAST_GOOD = ".vitsweep-last-good-experiment_state.json"
INTERVAL_S = 2.0


def newest_state(exp_dir: Path) -> Optional[Path]:
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    return states[-1] if states else None


def intact_state(path: Path, check_state_bytes: Callable[[bytes, str], None]) -> Optional[bytes]:
    """The bytes of `path` when it is a complete experiment state (`check_state_bytes` passes: the
    checker of `orchestrator.preflight`, passed in because preflight imports this module), else None."""
    try:
        raw = path.read_bytes()
        check_state_bytes(raw, repr(str(path)))
    except (OSError, ConfigError):
        return None
    return raw


class StateKeeper:
    """Copies the newest intact state of the local experiment `exp_dir` to `LAST_GOOD`."""

    def __init__(self, exp_dir: Path, check_state_bytes: Callable[[bytes, str], None],
                 interval_s: float = INTERVAL_S) -> None:
        self.exp_dir = exp_dir
        self.check = check_state_bytes
        self.interval_s = interval_s
        self._seen: Optional[Tuple[str, int, int]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitsweep-state-keeper", daemon=True)

    def keep_once(self) -> bool:
        """One check; True when a new copy was written. A disk error is logged, never raised: the
        previous copy stays (the write is atomic)."""
        state = newest_state(self.exp_dir)
        if state is None:
            return False
        try:
            st = state.stat()
        except OSError:
            return False
        seen = (state.name, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return False
        raw = intact_state(state, self.check)
        if raw is None:
            return False  # being written, or truncated by a full disk: keep the previous copy
        try:
            with atomic_path(self.exp_dir / LAST_GOOD) as tmp:
                Path(tmp).write_bytes(raw)
        except OSError as err:
            _logger.warning("could not keep a copy of Tune's state %s: %s", state, err)
            return False
        self._seen = seen
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.keep_once()

    def start(self) -> "StateKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.keep_once()


@contextlib.contextmanager
def keep_last_good_state(exp: Storage, check_state_bytes: Callable[[bytes, str], None]
                         ) -> Iterator[Optional[StateKeeper]]:
    """Around `tuner.fit()`: keep `LAST_GOOD` up to date (local storage only; None elsewhere)."""
    if not exp.is_local:
        yield None
        return
    keeper = StateKeeper(Path(exp.path), check_state_bytes).start()
    try:
        yield keeper
    finally:
        keeper.stop()


def restore_last_good(exp_dir: Path, corrupt: Path, check_state_bytes: Callable[[bytes, str], None]) -> Optional[Path]:
    """Put the intact `LAST_GOOD` copy in place of the corrupt newest state `corrupt` (moved aside to
    ``<name>.corrupt-<time>``, which Tune does not read); returns where the corrupt file went, or
    None when there is no intact copy (nothing is changed then)."""
    good = exp_dir / LAST_GOOD
    raw = intact_state(good, check_state_bytes) if good.is_file() else None
    if raw is None:
        return None
    aside = corrupt.with_name(f"{corrupt.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(corrupt, aside)
    with atomic_path(corrupt) as tmp:
        Path(tmp).write_bytes(raw)
    return aside
