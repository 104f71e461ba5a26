"""The sweep driver: spec -> validated -> Ray -> `tune.Tuner` -> report; and resume of a stopped sweep.

Order matters: every value is validated (and the local instance's resources checked) *before*
``ray.init``; only resources of a cluster joined with ``--address`` are checked after joining, before
any trial starts.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from finetune.config import ConfigError
from finetune.io_utils import read_tagged_json, write_json
from search_spaces import SweepSpec, count_trials, get_preset, load_config_file, validate_resources, validate_spec

from .report import MARKER, Report, write_report

_logger = logging.getLogger(__name__)

MARKER_FORMAT = "vitsweep-experiment"
DEFAULT_STORAGE = "ray_results"
DEFAULT_TRAINABLE = "trainables.finetune_trainable:train_vit"


def load_spec(preset: Optional[str] = None, config: Optional[str] = None) -> SweepSpec:
    """The sweep named by ``--preset`` or read from ``--config`` (exactly one)."""
    if (preset is None) == (config is None):
        raise ConfigError("give exactly one of --preset NAME or --config FILE")
    return get_preset(preset) if preset is not None else load_config_file(config)


def apply_overrides(
    spec: SweepSpec,
    *,
    num_samples: Optional[int] = None,
    gpus_per_trial: Optional[float] = None,
    cpus_per_trial: Optional[float] = None,
    max_concurrent: Optional[int] = None,
    scheduler: Optional[str] = None,
    searcher: Optional[str] = None,
    max_failures: Optional[int] = None,
    fixed: Optional[Dict[str, Any]] = None,
) -> SweepSpec:
    """CLI flags over the preset; the result is parsed again, so bad flags fail like bad presets."""
    resources = {}
    if gpus_per_trial is not None:
        resources["gpu"] = gpus_per_trial
    if cpus_per_trial is not None:
        resources["cpu"] = cpus_per_trial
    return spec.override(
        num_samples=num_samples, max_concurrent=max_concurrent, scheduler=scheduler, searcher=searcher,
        max_failures=max_failures, resources=resources or None, fixed=fixed or None,
    )


def detect_local_resources(num_cpus: Optional[float] = None, num_gpus: Optional[float] = None) -> Tuple[float, float]:
    """What a local Ray instance would offer: the given numbers, else this machine's CPUs and CUDA GPUs."""
    if num_cpus is None:
        num_cpus = float(os.cpu_count() or 1)
    if num_gpus is None:
        import torch

        num_gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return float(num_cpus), float(num_gpus)


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
    """Short trial directory names: ``<trial id>_<variant label>`` (Tune's default spells out the config)."""
    from trainables.layout import trial_label

    return f"{trial.trial_id}_{trial_label(trial.config)}"


def _max_epochs(spec: SweepSpec) -> int:
    from search_spaces.validate import trial_configs

    return max(int(flat.get("epochs", 10)) for _, _, flat in trial_configs(spec))


def build_tuner(spec: SweepSpec, storage: str | Path, name: str, trainable: Optional[Callable] = None):
    """The `tune.Tuner` for `spec` (Ray must be initialised only for `fit`)."""
    from ray import tune

    from search_spaces.tune_space import make_scheduler, make_searcher, param_space

    if trainable is None:
        trainable = load_trainable(DEFAULT_TRAINABLE)
    resources = {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]}
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=make_searcher(spec),
        scheduler=make_scheduler(spec, _max_epochs(spec)),
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent,
        reuse_actors=spec.reuse_actors,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(Path(storage).resolve()),
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
        tune.with_resources(trainable, resources),
        param_space=param_space(spec),
        tune_config=tune_config,
        run_config=run_config,
    )


def write_marker(exp_dir: Path, spec: SweepSpec, trainable: str) -> Path:
    from finetune import __version__

    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / MARKER
    write_json(path, {
        "format": MARKER_FORMAT,
        "version": __version__,
        "source": spec.source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trainable": trainable,
        "spec": spec.to_dict(),
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
    spec: SweepSpec,
    *,
    storage: str | Path = DEFAULT_STORAGE,
    name: Optional[str] = None,
    address: Optional[str] = None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    trainable: Optional[Callable] = None,
) -> SweepOutcome:
    """Validate, start or join Ray, run the Tuner, write the report; returns where everything is."""
    import ray

    validate_spec(spec)
    joining = bool(address or os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    if not joining:
        validate_resources(spec, *detect_local_resources(num_cpus, num_gpus))
    name = name or f"{spec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    storage = Path(storage).resolve()
    init_ray(address, num_cpus, num_gpus)
    if joining:
        check_cluster(spec)
    exp_dir = storage / name
    trainable = trainable or load_trainable(DEFAULT_TRAINABLE)
    write_marker(exp_dir, spec, trainable_path(trainable))
    tuner = build_tuner(spec, storage, name, trainable)
    results = tuner.fit()
    return _finish(exp_dir, results, expected=count_trials(spec) if spec.searcher == "grid" else None)


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
    spec = SweepSpec.from_dict(marker["spec"], source=marker.get("source", ""))
    trainable = load_trainable(marker.get("trainable") or DEFAULT_TRAINABLE)
    init_ray(address, num_cpus, num_gpus)
    check_cluster(spec)
    tuner = tune.Tuner.restore(
        str(exp_dir),
        trainable=tune.with_resources(trainable, {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]}),
        resume_unfinished=True,
        resume_errored=True,
    )
    results = tuner.fit()
    return _finish(exp_dir, results, expected=count_trials(spec) if spec.searcher == "grid" else None)
