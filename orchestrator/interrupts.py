"""SIGINT (Ctrl-C) and SIGTERM (schedulers, ``ray job stop``) during a sweep: a graceful stop.

Inside `graceful_stop()`, the first SIGINT or SIGTERM asks Ray Tune to end the run the way its own
Ctrl-C handling does (Ray 2.60: `ray.tune.tune._setup_signal_catching` sets an event on SIGINT or
SIGUSR1; the loop then stops, saves the experiment state one last time and `Tuner.fit` returns).
Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that this module sees
both signals; it forwards them to Tune's SIGUSR1 handler. Without this, Ray's driver turns SIGTERM into
``sys.exit`` at an arbitrary point, which aborts with exit 134 and a native stack dump.

A second signal raises KeyboardInterrupt at once (the state saved last stays); the resume command is
still printed (`graceful_stop(experiment_uri)`) when Tune had been asked to stop. `StopRequest.signum`
tells the driver which signal ended the run; the CLI then exits ``128 + signum`` (130, 143).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)
_TUNE_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class StopRequest:
    signum: Optional[int] = None
    saved: bool = False  # Tune was asked to stop (its state is saved as of the last step)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def graceful_stop(experiment_uri: Optional[str] = None) -> Iterator[StopRequest]:
    """Around ``tuner.fit()``: the first SIGINT/SIGTERM stops Tune with its state saved; see module.
    With `experiment_uri`, a second signal (KeyboardInterrupt) still prints the resume command: the
    state saved last stays, and `vitsweep resume` continues from it."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals reach the main thread only; whoever runs it handles them
        return

    def forward(signum: int, frame) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        print(f"\nvitsweep: {signal.Signals(signum).name} received: stopping the sweep and saving its state "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop):
            request.saved = True
            tune_stop(signal.SIGUSR1, frame)
        else:  # Tune's loop is not running yet: nothing to save
            raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (*HANDLED, signal.SIGUSR1)}
    env = os.environ.get(_TUNE_ENV)
    os.environ[_TUNE_ENV] = "1"
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until Tune installs its own
    for s in HANDLED:
        signal.signal(s, forward)
    try:
        yield request
    except KeyboardInterrupt:
        if request.saved and experiment_uri:
            print(resume_hint(experiment_uri, request), file=sys.stderr, flush=True)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if env is None:
            os.environ.pop(_TUNE_ENV, None)
        else:
            os.environ[_TUNE_ENV] = env


def resume_hint(experiment_uri: str, request: StopRequest) -> str:
    return (f"vitsweep: the sweep was stopped by {request.name}; its state is saved. Continue it with:\n"
            f"  vitsweep resume {experiment_uri}")
