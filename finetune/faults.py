"""Fault injection callbacks: real faults at a chosen training step, for reliability tests and drills.

Each plugs into `finetune.loop.fit` through the ordinary callback mechanism (``callbacks=[...]``, or
``tune.with_parameters(train_vit, callbacks=[...])`` in a sweep) and fires in ``on_train_batch_end``
of batch `batch` (0-based) of epoch `epoch` (0-based: the epoch in progress, ``state.epoch`` during it).

- `KillOnce`: the process kills itself with a signal (SIGKILL: no cleanup, no exception, as the OOM
  killer or a lost node would do it).
- `RaiseOnce`: raises `InjectedFault` (an ordinary crash inside training).
- `NaNLossAt`: fills the classifier head with NaN, so the next batch's loss is non-finite (an exploding
  update); the loop then stops the run with status ``diverged``.
- `OutOfMemoryAt`: raises ``torch.cuda.OutOfMemoryError`` (CUDA out-of-memory, simulated on any device).

A fault given a `marker_path` fires once across processes and retries: the marker file is written
(and fsynced) before the fault, and a marker that exists means "already fired". Without a marker it
fires every time the step is reached. `only_if` ({config key: value}) limits a fault to the runs
whose resolved config has those values, so one sweep can fault a single trial. No Ray import here:
the callbacks are plain picklable objects.
"""

from __future__ import annotations

import abc
import os
import signal as _signal
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .callbacks import Callback, TrainState
from .errors import ConfigError


class InjectedFault(RuntimeError):
    """The error `RaiseOnce` raises; its message names the epoch and batch."""


class _StepFault(Callback, abc.ABC):
    """Fires `_fire(state)` at (epoch, batch), at most once per marker file."""

    def __init__(self, epoch: int, batch: int, marker_path: Optional[str | os.PathLike] = None,
                 only_if: Optional[Mapping[str, Any]] = None) -> None:
        if epoch < 0 or batch < 0:
            raise ConfigError(f"epoch={epoch}, batch={batch}: both must be >= 0 (0-based)")
        self.epoch = epoch
        self.batch = batch
        self.marker_path = str(marker_path) if marker_path is not None else None
        self.only_if = dict(only_if or {})

    def on_train_batch_end(self, state: TrainState, batch_idx: int) -> None:
        if state.epoch != self.epoch or batch_idx != self.batch:
            return
        if any(state.config.get(k) != v for k, v in self.only_if.items()):
            return
        if self.marker_path is not None:
            marker = Path(self.marker_path)
            if marker.exists():
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            try:  # "x": of several DDP workers at this step, exactly one fires
                fh = open(marker, "x")
            except FileExistsError:
                return
            with fh:
                fh.write(f"{type(self).__name__} pid={os.getpid()} epoch={self.epoch} batch={self.batch}\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._fire(state)

    @abc.abstractmethod
    def _fire(self, state: TrainState) -> None:
        """Inject the fault (each subclass: kill, raise, poison the loss, ...)."""


class KillOnce(_StepFault):
    """Kill this process with `signal` (default SIGKILL) at (epoch, batch), once per `marker_path`.

    `wait_for_glob`: first wait (up to 300 s) until a file matches this glob, e.g. Ray Train's
    ``checkpoint_manager_snapshot.json``, written once its controller has registered a reported checkpoint
    (it polls the workers every few seconds; a worker killed before that loses its last report)."""

    def __init__(self, marker_path: str | os.PathLike, epoch: int, batch: int, signal: int = _signal.SIGKILL,
                 only_if: Optional[Mapping[str, Any]] = None, wait_for_glob: Optional[str] = None) -> None:
        super().__init__(epoch, batch, marker_path, only_if)
        self.signal = int(signal)
        self.wait_for_glob = wait_for_glob

    def _fire(self, state: TrainState) -> None:
        if self.wait_for_glob is not None:
            import glob
            import time

            deadline = time.monotonic() + 300
            while not glob.glob(self.wait_for_glob) and time.monotonic() < deadline:
                time.sleep(0.2)
        os.kill(os.getpid(), self.signal)


class RaiseOnce(_StepFault):
    """Raise `InjectedFault(message)` at (epoch, batch); once per `marker_path` when one is given."""

    def __init__(self, epoch: int, batch: int, marker_path: Optional[str | os.PathLike] = None,
                 message: str = "injected fault", only_if: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(epoch, batch, marker_path, only_if)
        self.message = message

    def _fire(self, state: TrainState) -> None:
        raise InjectedFault(f"{self.message} (epoch {self.epoch}, batch {self.batch})")


class NaNLossAt(_StepFault):
    """Fill the head's weights with NaN after (epoch, batch): every later loss is NaN. Pick a batch
    before the epoch's last, so the epoch's training loss (not only validation) sees it."""

    def _fire(self, state: TrainState) -> None:
        head = state.model.get_classifier() if hasattr(state.model, "get_classifier") else state.model.head
        with torch.no_grad():
            head.weight.fill_(float("nan"))


class OutOfMemoryAt(_StepFault):
    """Raise ``torch.cuda.OutOfMemoryError`` at (epoch, batch), as the CUDA caching allocator would."""

    def __init__(self, epoch: int, batch: int, marker_path: Optional[str | os.PathLike] = None,
                 request_gib: float = 20.0, only_if: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(epoch, batch, marker_path, only_if)
        self.request_gib = request_gib

    def _fire(self, state: TrainState) -> None:
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {self.request_gib:.2f} GiB (simulated by finetune.faults)"
        )
