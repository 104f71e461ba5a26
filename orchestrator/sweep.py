"""The sweep driver: a `ResolvedSweep` -> Ray -> `tune.Tuner` -> report; and resume of a stopped sweep.

Order matters: `search_spaces.load_sweep` validates every value (and the local instance's resources)
*before* ``ray.init``, once; only the resources of a cluster joined with ``--address`` are checked
after joining, before any trial starts.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from finetune.errors import ConfigError
from finetune.io_utils import read_tagged_json, write_json
from search_spaces import ResolvedSweep, SweepSpec, load_sweep, validate_resources
from trainables.layout import trial_label

from .report import MARKER, Report, write_report

_logger = logging.getLogger(__name__)

MARKER_FORMAT = "vitsweep-experiment"
DEFAULT_STORAGE = "ray_results"
DEFAULT_TRAINABLE = "trainables.finetune_trainable:train_vit"
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def detect_local_resources(num_cpus: Optional[float] = None, num_gpus: Optional[float] = None) -> Tuple[float, float]:
    """What a local Ray instance would offer: the given numbers, else this machine's CPUs and CUDA GPUs."""
    if num_cpus is None:
        num_cpus = float(os.cpu_count() or 1)
    if num_gpus is None:
        import torch

        num_gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return float(num_cpus), float(num_gpus)


def joins_cluster(address: Optional[str]) -> bool:
    """The sweep runs on an existing Ray: `address`, RAY_ADDRESS (``ray job submit``) or one already
    initialised in this process (a notebook, a test fixture)."""
    import ray

    return bool(address or os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def local_resources(
    address: Optional[str], num_cpus: Optional[float], num_gpus: Optional[float]
) -> Optional[Tuple[float, float]]:
    """What `load_sweep` checks each trial against: the local instance's resources, or None when the
    sweep joins a cluster (checked after joining, `check_cluster`)."""
    return None if joins_cluster(address) else detect_local_resources(num_cpus, num_gpus)


def dashboard_available() -> bool:
    """ray[default] (the dashboard and job server) is installed."""
    try:
        importlib.import_module("ray.dashboard.modules.job.sdk")
        importlib.import_module("aiohttp")
    except ImportError:
        return False
    return True


def init_ray(address: Optional[str], num_cpus: Optional[float], num_gpus: Optional[float]) -> None:
    """Join `address` (or RAY_ADDRESS, set by ``ray job submit``), or start a local instance.

    A local instance binds its dashboard to 127.0.0.1, and has one only if ray[default] is installed.
    An already initialised Ray (a notebook, a test fixture) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    with_dashboard = dashboard_available()
    # address="local": always a new instance, never a stray cluster left by `ray start` on this machine
    kwargs: Dict[str, Any] = {"address": "local", "num_cpus": num_cpus, "num_gpus": num_gpus,
                              "include_dashboard": with_dashboard}
    if with_dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    ray.init(**kwargs)


def check_cluster(spec: SweepSpec) -> None:
    """After joining: the cluster must hold one trial's resources."""
    import ray

    total = ray.cluster_resources()
    validate_resources(spec, total.get("CPU", 0.0), total.get("GPU", 0.0))


def trainable_path(fn: Callable) -> str:
    """``module:qualname`` of the trainable, recorded in the marker for `resume_sweep`. A trainable made
    inside a function (``tune.with_parameters``, a test's factory) cannot be imported again: resuming
    its experiment is refused by `load_trainable` with the reason (resume it from Python instead)."""
    return f"{fn.__module__}:{fn.__qualname__}"


def load_trainable(path: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"trainable {path!r} cannot be imported ({err}); allowed: a module-level function "
                          f"such as {DEFAULT_TRAINABLE!r}") from err
    return obj


def trial_dirname(trial) -> str:
    """Short trial directory names: ``<trial id>_<variant label>`` (Tune's default spells out the config).
    Characters other than letters, digits, ``.``, ``_`` and ``-`` (a plug-in's ``module:Class``, a
    ``/`` in a label) become ``_``."""
    return f"{trial.trial_id}_{_UNSAFE_IN_NAME.sub('_', trial_label(trial.config))}"


def storage_location(storage: str | Path, name: str) -> Tuple[str, Path]:
    """``--storage`` as Tune's ``storage_path`` (made absolute) and the experiment directory in it."""
    root = Path(storage).resolve()
    return str(root), root / name


def _trial_resources(spec: SweepSpec) -> Dict[str, float]:
    return {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]}


def build_tuner(resolved: ResolvedSweep, storage_path: str, name: str, trainable: Optional[Callable] = None):
    """The `tune.Tuner` for a resolved sweep (Ray must be initialised only for `fit`)."""
    from ray import tune

    spec = resolved.spec
    if trainable is None:
        trainable = load_trainable(DEFAULT_TRAINABLE)
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=resolved.make_searcher(),
        scheduler=resolved.make_scheduler(),
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent,
        reuse_actors=spec.reuse_actors,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=spec.num_to_keep,
            checkpoint_score_attribute=spec.metric,
            checkpoint_score_order=spec.mode,
        ),
        # With reuse_actors, Ray gives each reused trial a working directory it syncs to storage only
        # when artifacts are synced; without this the run outputs (weights, TensorBoard, run/result.json)
        # of every trial after an actor's first stay in /tmp/ray and never reach the experiment.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=1,
    )
    return tune.Tuner(
        tune.with_resources(trainable, _trial_resources(spec)),
        param_space=resolved.make_param_space(),
        tune_config=tune_config,
        run_config=run_config,
    )


def write_marker(exp_dir: Path, resolved: ResolvedSweep, trainable: str) -> Path:
    """The experiment marker: what `resume_sweep` rebuilds the sweep from. ``validated``: the values
    were checked against the model's geometry at `run` (resume then skips that check)."""
    from finetune import __version__

    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / MARKER
    write_json(path, {
        "format": MARKER_FORMAT,
        "version": __version__,
        "source": resolved.spec.source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trainable": trainable,
        "validated": resolved.geometry_checked,
        "spec": resolved.spec.to_dict(),
    })
    return path


def read_marker(exp_dir: str | Path) -> Dict[str, Any]:
    """The marker of a vitsweep experiment; anything else is refused with the reason."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ConfigError(f"{str(exp_dir)!r} is not a directory")
    path = exp_dir / MARKER
    if not path.is_file():
        raise ConfigError(f"{str(exp_dir)!r} is not a vitsweep experiment ({MARKER} is missing)")
    return read_tagged_json(path, MARKER_FORMAT, "vitsweep experiment marker", ConfigError)


@dataclass
class SweepOutcome:
    experiment_dir: Path
    report: Report
    num_errors: int
    missing_trials: int = 0


def _finish(exp_dir: Path, results, expected: Optional[int] = None) -> SweepOutcome:
    report = write_report(exp_dir)
    missing = max(0, expected - len(report.records)) if expected is not None else 0
    if missing:
        # Seen with Ray 2.60: with max_concurrent on grid/random, trials are generated lazily, and a
        # driver killed at the wrong moment can leave the restored generator unable to create the rest.
        _logger.warning(
            "%d of %d grid trials were never created in %s; run the sweep again (without "
            "--max-concurrent, every trial is created up front and survives a resume)", missing, expected, exp_dir,
        )
    return SweepOutcome(experiment_dir=exp_dir, report=report, num_errors=results.num_errors, missing_trials=missing)


def run_sweep(
    sweep: Union[ResolvedSweep, SweepSpec],
    *,
    storage: str | Path = DEFAULT_STORAGE,
    name: Optional[str] = None,
    address: Optional[str] = None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    trainable: Optional[Callable] = None,
) -> SweepOutcome:
    """Start or join Ray, run the Tuner, write the report; returns where everything is.

    `sweep` is validated already (`search_spaces.load_sweep`); a `SweepSpec` is resolved here. Only
    resources the sweep was not checked against are checked: a cluster after joining it, or a local
    instance other than the one `load_sweep` was given.
    """
    available = local_resources(address, num_cpus, num_gpus)
    if isinstance(sweep, SweepSpec):
        sweep = load_sweep(sweep, local_resources=available)
    elif available is not None and sweep.local_resources != available:
        validate_resources(sweep.spec, *available)
    spec = sweep.spec
    name = name or f"{spec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    storage_path, exp_dir = storage_location(storage, name)
    init_ray(address, num_cpus, num_gpus)
    if available is None:
        check_cluster(spec)
    trainable = trainable or load_trainable(DEFAULT_TRAINABLE)
    write_marker(exp_dir, sweep, trainable_path(trainable))
    tuner = build_tuner(sweep, storage_path, name, trainable)
    results = tuner.fit()
    return _finish(exp_dir, results, expected=sweep.expected_trials)


def resume_sweep(
    exp_dir: str | Path,
    *,
    address: Optional[str] = None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
) -> SweepOutcome:
    """Continue a stopped sweep: unfinished and errored trials from their last checkpoints; finished
    trials are not run again."""
    from ray import tune

    exp_dir = Path(exp_dir).resolve()
    marker = read_marker(exp_dir)
    if not tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(f"{str(exp_dir)!r} has a vitsweep marker but no Tune state to resume (did the sweep start?)")
    # Markers without "validated" were written by `run`, which always checked the geometry.
    resolved = load_sweep(marker["spec"], source_name=marker.get("source", ""),
                          check_geometry=not marker.get("validated", True))
    trainable = load_trainable(marker.get("trainable") or DEFAULT_TRAINABLE)
    init_ray(address, num_cpus, num_gpus)
    check_cluster(resolved.spec)
    tuner = tune.Tuner.restore(
        str(exp_dir),
        trainable=tune.with_resources(trainable, _trial_resources(resolved.spec)),
        resume_unfinished=True,
        resume_errored=True,
    )
    results = tuner.fit()
    return _finish(exp_dir, results, expected=resolved.expected_trials)
