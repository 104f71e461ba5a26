"""The sweep's progress on the console: one short line per trial (its label, not its config), the
metrics that matter, and a one-line best trial; when a trial changed, at most every `interval_s`
seconds, and at the end.

Tune's own output engine prints the whole nested config per trial and a TensorBoard hint for its
own logger, which vitsweep turns off (`orchestrator.sweep.quiet_tune_output`); this reporter is passed
as ``RunConfig(progress_reporter=...)``, which Tune honours with ``RAY_AIR_NEW_OUTPUT=0``.

The ``pid`` column is the trial's worker process (Tune's result field): the PID of its actor on the Ray
dashboard's Actors page and in its log file's name, ``worker-*-<PID>.out`` (docs/dashboard.md).
"""

from __future__ import annotations

import sys
import time
from typing import Any, List, Optional, Sequence

from ray.tune import ProgressReporter

from .labels import trial_run_label

WIDTH = 100
LABEL_WIDTH = 42
HEARTBEAT_S = 300.0  # a block even when nothing changed, so a long epoch does not look like a hang


def _number(value: Any, spec: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return format(int(value) if spec == "d" else value, spec)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SweepReporter(ProgressReporter):
    """Tune's `ProgressReporter` interface, printing vitsweep's compact status table."""

    def __init__(self, metric: str = "val/acc1", mode: str = "max", interval_s: float = 30.0, file=None) -> None:
        self.metric = metric
        self.mode = mode
        self.interval_s = interval_s
        self.file = file
        self._start = time.time()
        self._last = 0.0
        self._reported: tuple = ()
        self._total: Optional[int] = None

    def setup(self, start_time: Optional[float] = None, total_samples: Optional[int] = None,
              metric: Optional[str] = None, mode: Optional[str] = None, **kwargs: Any) -> None:
        self._start = start_time or self._start
        self._total = total_samples
        self.metric = metric or self.metric
        self.mode = mode or self.mode

    @staticmethod
    def _state(trials: List) -> tuple:
        return tuple((t.trial_id, t.status, (t.last_result or {}).get("epoch")) for t in trials)

    def should_report(self, trials: List, done: bool = False) -> bool:
        """At the end; otherwise every `interval_s` when a trial changed (status or epoch), and at least
        every `HEARTBEAT_S`."""
        waited = time.time() - self._last
        changed = self._state(trials) != self._reported
        return done or (waited >= self.interval_s and changed) or waited >= HEARTBEAT_S

    def report(self, trials: List, done: bool, *sys_info: str) -> None:
        self._last = time.time()
        self._reported = self._state(trials)
        print(self.render(trials, done, sys_info), file=self.file or sys.stdout, flush=True)

    def _score(self, trial) -> Optional[float]:
        value = (trial.last_result or {}).get(self.metric)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def best(self, trials: Sequence) -> Optional[Any]:
        """The best trial among those that ended (Tune's TERMINATED: finished or stopped early by the
        scheduler), as comparison.md ranks them: a running, paused or interrupted trial's metric is
        one epoch's, not its result, and errored or diverged trials are never best."""
        scored = [t for t in trials if self._score(t) is not None and t.status == "TERMINATED"
                  and (t.last_result or {}).get("status") != "diverged"]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=self._score)

    def render(self, trials: Sequence, done: bool = False, sys_info: Sequence[str] = ()) -> str:
        """The status block: a header with counts and elapsed time, one row per trial, the best trial."""
        counts: dict = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        state = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        total = f"{len(trials)}" + (f"/{self._total}" if self._total and self._total > len(trials) else "")
        head = f"== vitsweep {'done' if done else 'status'}: {total} trials ({state}) | {_elapsed(time.time() - self._start)}"
        lines = [_clip(head, WIDTH)]
        lines += [_clip(s.strip(), WIDTH) for s in sys_info if "resource" in s.lower()]
        metric = _clip(self.metric, 10)
        lines.append(f"{'trial':<{LABEL_WIDTH}} {'status':<10} {'ep':>3} {metric:>10} {'train/loss':>10} {'img/s':>8} "
                 f"{'pid':>7}")
        for t in trials:
            r = t.last_result or {}
            status = "DIVERGED" if r.get("status") == "diverged" else t.status
            lines.append(
                f"{_clip(trial_run_label(t), LABEL_WIDTH):<{LABEL_WIDTH}} {status:<10} {_number(r.get('epoch'), 'd'):>3} "
                f"{_number(self._score(t), '.4f'):>10} {_number(r.get('train/loss'), '.4f'):>10} "
                f"{_number(r.get('throughput/train_img_s'), '.1f'):>8} {_number(r.get('pid'), 'd'):>7}"
            )
        best = self.best(trials)
        if best is not None:
            lines.append(_clip(f"best: {trial_run_label(best)}  {self.metric}={self._score(best):.4f} "
                               f"(epoch {best.last_result.get('epoch')}, trial {best.trial_id})", WIDTH))
        return "\n".join(lines)
