"""Live trial metrics as Ray metrics: each trial sets `ray.util.metrics.Gauge`s named ``vitsweep_<metric>``,
tagged with the experiment, the trial id, the variant and the trial's label.

Ray exports them in Prometheus format on each node's metrics endpoint (``ray start --metrics-export-port``,
or ``vitsweep run --metrics-export-port`` for a local instance) as ``ray_vitsweep_<metric>`` lines, which the
dashboard's Grafana (and docs/grafana-vitsweep.json) draws, one line per trial. This is Ray's own path for
an application's numbers; nothing is served by vitsweep itself.

When: every epoch (all of `EPOCH_GAUGES` present in the epoch's metrics), and the training loss and step
every ``log_interval`` steps: the batch hook reads `TrainState.running_loss` (the epoch's mean so far,
which the loop computes then with its one host sync) and sets the two gauges when it changed (~30 us per
`Gauge.set`, measured on a loaded 2-core machine). Ray sends the values to the node's agent every
``metrics_report_interval_ms`` (Ray's default 10 s; ``RAY_metrics_report_interval_ms`` changes it), so
a scrape sees a value at most that late.

Ray 2.60 keeps a gauge's value only for two report intervals after it was last set (then the series
ages out of the endpoint), so a value set once per epoch would vanish between epochs. A daemon thread
in the trial's process sets the trial's latest values again every report interval (`_Refresher`): a
trial's series stay on the endpoint while its process runs it, and, with reused actors, until the next
trial starts in that process; they age out when the process ends.

Only the process that runs the trial's loop publishes, and only inside a Ray worker: called anywhere
else (a unit test, `vitsweep train`), `publish_epoch` and `publish_step` do nothing.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional, Tuple

TAG_KEYS = ("experiment", "trial_id", "variant", "label")
PREFIX = "vitsweep_"

# result key -> (gauge name without the prefix, description). The Grafana dashboard has one panel each.
EPOCH_GAUGES: Dict[str, Tuple[str, str]] = {
    "epoch": ("epoch", "completed epochs"),
    "val/acc1": ("val_acc1", "validation top-1 accuracy (fraction) after the last epoch"),
    "val/acc5": ("val_acc5", "validation top-5 accuracy (fraction) after the last epoch"),
    "val/loss": ("val_loss", "validation loss after the last epoch"),
    "train/loss": ("train_loss", "training loss: the epoch's mean so far, every log_interval steps"),
    "throughput/train_img_s": ("train_img_s", "training throughput of the last epoch (images/s)"),
    "throughput/eval_img_s": ("eval_img_s", "evaluation throughput of the last epoch (images/s)"),
    "time/data_wait_frac": ("data_wait_frac", "fraction of the last epoch's training time spent waiting for data"),
    "time/epoch_s": ("epoch_seconds", "wall time of the last epoch (s)"),
    "lr": ("lr", "learning rate at the end of the last epoch"),
    "memory/peak_allocated_mb": ("peak_gpu_mem_mb", "peak GPU memory allocated by torch in the last epoch (MiB)"),
    "memory/peak_reserved_mb": ("peak_gpu_reserved_mb", "peak GPU memory reserved by torch in the last epoch (MiB)"),
    "throughput/mfu": ("mfu", "model FLOPs utilisation of the last epoch (fraction of the GPU's peak)"),
}
STEP_GAUGES: Dict[str, Tuple[str, str]] = {
    "step": ("step", "optimizer steps done"),
}

_gauges: Dict[str, Any] = {}  # gauge name -> ray.util.metrics.Gauge, one per name in this process
_trial: Dict[str, Any] = {}  # "key" -> (trial id, label), "tags" -> the trial's tags


def gauge_name(key: str) -> str:
    """``val/acc1`` -> ``vitsweep_val_acc1`` (the exported line is ``ray_vitsweep_val_acc1``)."""
    table = EPOCH_GAUGES.get(key) or STEP_GAUGES[key]
    return PREFIX + table[0]


def _gauge(key: str):
    from ray.util.metrics import Gauge

    name = gauge_name(key)
    if name not in _gauges:
        description = (EPOCH_GAUGES.get(key) or STEP_GAUGES[key])[1]
        _gauges[name] = Gauge(name, description=description, tag_keys=TAG_KEYS)
    return _gauges[name]


def _number(value: Any) -> Optional[float]:
    """A finite int or float (not a bool), else None: a NaN loss is not drawn (the trial's status says why)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Refresher:
    """The current trial's latest values, set again every report interval by a daemon thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: Dict[str, float] = {}
        self.tags: Dict[str, str] = {}
        self.thread: Optional[threading.Thread] = None

    def set(self, tags: Dict[str, str], values: Dict[str, float]) -> None:
        with self.lock:
            if tags is not self.tags:  # a new trial in this process: the old one's values go
                self.tags, self.values = tags, {}
            self.values.update(values)
            for key, value in values.items():
                _gauge(key).set(value, tags=tags)
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="vitsweep-ray-metrics", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        import ray

        period = max(1.0, ray._config.metrics_report_interval_ms() / 1000.0)
        while True:
            time.sleep(period)
            with self.lock:
                for key, value in self.values.items():
                    _gauge(key).set(value, tags=self.tags)


_refresher = _Refresher()


def trial_tags(label: str, variant: str) -> Optional[Dict[str, str]]:
    """The current trial's tags, or None outside a Ray Tune trial (nothing is published then)."""
    import ray

    if not ray.is_initialized():
        return None
    from ray import tune

    try:
        context = tune.get_context()
        trial_id, experiment = context.get_trial_id(), context.get_experiment_name()
        trial_dir = context.get_trial_dir()
    except (RuntimeError, AttributeError):  # not inside a trial
        return None
    if not trial_id:
        return None
    key = (trial_id, label)
    if _trial.get("key") != key:
        _trial["key"] = key
        _trial["tags"] = {"experiment": str(experiment or ""), "trial_id": str(trial_id), "variant": str(variant),
                          "label": run_label_of(trial_dir, trial_id, label)}
    return _trial["tags"]


def run_label_of(trial_dir: Optional[str], trial_id: str, label: str) -> str:
    """The trial's run label as its directory spells it (`orchestrator.sweep.trial_dirname`:
    ``<label>_<trial id>``, e.g. ``linformer_k=64_lr=0.0005_seed1``: the console's label with ``_`` for
    spaces, and TensorBoard's run name); `label` (the variant block's) for a directory named otherwise."""
    base = os.path.basename(str(trial_dir or "").rstrip("/"))
    suffix = f"_{trial_id}"
    return base[: -len(suffix)] if base.endswith(suffix) and len(base) > len(suffix) else label


def _variant(state: Any) -> str:
    config = getattr(state, "config", None)
    return str(config.get("variant", "")) if isinstance(config, Mapping) else ""


def publish_epoch(label: str, state: Any, metrics: Mapping[str, Any]) -> int:
    """Set every gauge of `EPOCH_GAUGES` present (finite) in an epoch's `metrics`; returns how many."""
    tags = trial_tags(label, _variant(state))
    if tags is None:
        return 0
    values = {key: _number(metrics.get(key)) for key in EPOCH_GAUGES}
    values = {key: value for key, value in values.items() if value is not None}
    step = _number(getattr(state, "global_step", None))
    if step is not None:
        values["step"] = step
    _refresher.set(tags, values)
    return len(values) - (step is not None)


def publish_step(label: str, state: Any) -> bool:
    """After a batch: the running training loss and the step, when the loop has set a new running loss
    (every ``log_interval`` steps); no host sync, nothing set on the other batches."""
    loss = _number(getattr(state, "running_loss", None))
    if loss is None:
        return False
    tags = trial_tags(label, _variant(state))
    if tags is None or (tags is _refresher.tags and _refresher.values.get("train/loss") == loss):
        return False  # unchanged since the last log interval: nothing to set
    _refresher.set(tags, {"train/loss": loss, "step": float(state.global_step)})
    return True


def announce_trial(label: str, state: Any) -> Optional[str]:
    """Name this worker's log lines after the trial: ``(linformer k=64 seed0 4f2a1_00001 pid=1234) ...`` on
    the driver's console, and a line with the label in the worker's log file (``worker-*-<pid>.out/.err``).

    Ray's log monitor names a worker's lines by the last ``:actor_name:NAME`` line in its log files; Ray
    itself writes one, ``repr()`` of the actor (Tune's ``ImplicitFunc``: the trainable's name), when the
    actor starts. Writing it again at each trial start names the lines after the trial, also when a
    reused actor runs several trials in turn. Outside a Ray Tune trial: nothing (returns None)."""
    import sys

    from ray._private import ray_constants

    tags = trial_tags(label, _variant(state))
    if tags is None or ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX:
        return None
    name = f"{tags['label']} {tags['trial_id']}"
    for stream in (sys.stdout, sys.stderr):
        print(f"{ray_constants.LOG_PREFIX_ACTOR_NAME}{name}", file=stream, flush=True)
    return name
