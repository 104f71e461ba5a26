"""The sweep driver: a `ResolvedSweep` -> Ray -> `tune.Tuner` -> report; and resume of a stopped sweep.

Order matters: `search_spaces.load_sweep` validates every value (and the local instance's resources)
*before* ``ray.init``, once; the storage is checked next (`orchestrator.storage.check_writable`), still
before Ray starts; only the resources of a cluster joined with ``--address`` are checked after joining,
before any trial starts.

Everything vitsweep writes goes through one `Storage` (a local/NFS directory or an object-store URI):
Ray Tune writes its state and checkpoints with the storage's filesystem, the marker and the report go
through the same object, and each trial's run outputs reach it with Tune's artifact sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import logging
import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from finetune.errors import ConfigError
from finetune.io_utils import json_safe
from search_spaces import ResolvedSweep, SweepOverrides, SweepSpec, load_sweep, validate_resources

from .data_cache import prepare_data_cache
from .report import MARKER, Report, report_storage
from .storage import Storage, check_writable, resolve_storage
from .interrupts import graceful_stop
from .lock import experiment_lock
from .state_keeper import keep_last_good_state
from .preflight import (
    check_cluster_address, check_name, check_new_experiment, check_state_bytes, check_tune_state, loopback_node,
)

_logger = logging.getLogger(__name__)

MARKER_FORMAT = "vitsweep-experiment"
DEFAULT_STORAGE = "ray_results"
DEFAULT_TRAINABLE = "trainables.finetune_trainable:train_vit"
# A sweep with resources.workers > 1: each trial drives a Ray Train TorchTrainer (docs/distributed.md).
DDP_TRAINABLE = "trainables.distributed:train_vit_ddp"


def default_trainable(spec: SweepSpec) -> str:
    return DDP_TRAINABLE if spec.workers > 1 else DEFAULT_TRAINABLE


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
    # find_spec, not import: the dashboard runs in its own process, and importing its job SDK here
    # cost the driver ~1.3 s.
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("ray.dashboard.modules.job.sdk", "aiohttp"))
    except (ImportError, ValueError):
        return False


def quiet_tune_output() -> None:
    """Tune's console and loggers as vitsweep wants them, for `run` and `resume` (Tune reads both
    variables in `fit`; a value set by the user is kept):

    - ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: Tune adds no loggers of its own; `build_tuner` passes its
      JSON and CSV loggers (the report reads ``result.json``) but not its TensorBoard logger, which would
      write a second run per trial beside the trial's own ``run/tb`` (and print a ``tensorboard --logdir``
      hint for Ray's staging directory).
    - ``RAY_AIR_NEW_OUTPUT=0``: Tune's classic output path, the one that honours
      ``RunConfig(progress_reporter=...)``, vitsweep's compact table (`orchestrator.console`).
    """
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def init_ray(address: Optional[str], num_cpus: Optional[float], num_gpus: Optional[float],
             metrics_export_port: Optional[int] = None) -> None:
    """Join `address` (or RAY_ADDRESS, set by ``ray job submit``), or start a local instance.

    A local instance binds its dashboard to 127.0.0.1, and has one only if ray[default] is installed.
    With `metrics_export_port` (checked by `orchestrator.monitoring.check_metrics_port`) it exports its
    metrics on http://127.0.0.1:PORT/metrics (`orchestrator.monitoring`).
    An already initialised Ray (a notebook, a test fixture) is used as it is.
    """
    import ray

    quiet_tune_output()
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
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    with loopback_node() as loopback:  # every server of a local instance on 127.0.0.1 only
        ray.init(**kwargs, **loopback)
    if metrics_export_port is not None:
        from .monitoring import metrics_url

        print(f"metrics:    {metrics_url(metrics_export_port)} (Prometheus; ray_vitsweep_* per trial)", flush=True)


def check_export_port(port: Optional[int], address: Optional[str]) -> Optional[int]:
    """A local instance's metrics export port: valid and free (`orchestrator.monitoring`), on a local
    instance only, with ray[default] installed (Ray's metrics agent is part of the dashboard agent)."""
    from .monitoring import check_metrics_port, metrics_port_for

    port = check_metrics_port(port)
    if port is None:
        return None
    metrics_port_for(port, joins_cluster(address))
    if not dashboard_available():
        raise ConfigError("--metrics-export-port needs Ray's metrics agent, part of ray[default]: "
                          "pip install 'vitsweep[dashboard]'")
    return port


# Stands in for a data path that exists only on the cluster's nodes while the rest is validated here:
# a well-formed hub id (never contacted by validation, and its class count unknown, as the path's is).
_DATA_STAND_IN = "hf:vitsweep/data-on-the-cluster-nodes"


def data_paths_elsewhere(spec: SweepSpec) -> Dict[str, str]:
    """The sweep's data specs whose local path (``imagefolder:``, ``cache:``, ``imagenet100:DIR``,
    ``hf:DIR``) does not exist on this machine -> the path."""
    from finetune.data import parse_data_spec
    from finetune.data.spec import is_local_path
    from search_spaces.validate import trial_configs

    away = {}
    for _, _, flat in trial_configs(spec):
        data = flat.get("data")
        if not isinstance(data, str):
            continue
        ds = parse_data_spec(data)
        has_path = ds.target is not None and (ds.kind in ("imagefolder", "cache", "imagenet100")
                                              or (ds.kind == "hf" and is_local_path(ds.target)))
        if has_path and not os.path.exists(os.path.expanduser(ds.target)):
            away[data] = ds.target
    return away


def _replace_strings(obj: Any, mapping: Dict[str, str]) -> Any:
    if isinstance(obj, str):
        return mapping.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _replace_strings(v, mapping) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_replace_strings(v, mapping) for v in obj]
    return obj


def load_cluster_sweep(source: Any, overrides: Optional[SweepOverrides] = None) -> ResolvedSweep:
    """`load_sweep` for a sweep whose trials run on a cluster's nodes, which read the data, not this
    machine: everything is checked here as for a local run (structure, every value, the model's
    geometry), except that a data path that does not exist here is left to each trial's node (a trial
    whose node lacks it fails naming the node and the path). Resources are checked after joining."""
    from search_spaces.validate import check_trial_configs

    resolved = load_sweep(source, overrides, check_geometry=False)
    away = data_paths_elsewhere(resolved.spec)
    for path in sorted(set(away.values())):
        _logger.warning("data path %s does not exist on this machine; each trial checks it on its own node", path)
    stand_ins = {data: ("imagenet100" if data.startswith("imagenet100:") else _DATA_STAND_IN) for data in away}
    spec = SweepSpec.from_dict(_replace_strings(resolved.spec.to_dict(), stand_ins)) if away else resolved.spec
    check_trial_configs(spec, check_geometry=True)
    return dataclasses.replace(resolved, geometry_checked=True)


def load_run_sweep(source: Any, overrides: Optional[SweepOverrides] = None, *, address: Optional[str] = None,
                   num_cpus: Optional[float] = None, num_gpus: Optional[float] = None) -> ResolvedSweep:
    """What `vitsweep run` validates before Ray starts: a local run checks everything here, the data
    included, and each trial's resources against the local instance; a run that joins a cluster uses
    `load_cluster_sweep`."""
    available = local_resources(address, num_cpus, num_gpus)
    if available is None:
        return load_cluster_sweep(source, overrides)
    return load_sweep(source, overrides, local_resources=available)


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
    """``<run label>_<trial id>``, e.g. ``atrous_linear_dil=1,2,3_w=3_m=64_seed0_a1b2c_00004``: TensorBoard
    names each run by its directory, so the label (`orchestrator.labels.trial_run_label`) names the run;
    the trial id keeps it unique. Runs of characters other than letters, digits and ``.,=+_-`` (spaces,
    a plug-in's ``module:Class``, a ``/``) become ``_`` (`orchestrator.labels.safe_name`)."""
    from .labels import safe_name, trial_run_label

    return f"{safe_name(trial_run_label(trial))}_{trial.trial_id}"


def as_storage(storage: str | Path | Storage) -> Storage:
    """``--storage`` (a path or a URI, see `orchestrator.storage.resolve_storage`) as a `Storage`."""
    return storage if isinstance(storage, Storage) else resolve_storage(storage)


def default_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _trial_resources(spec: SweepSpec) -> Dict[str, float]:
    """What Tune reserves for a trial's process. A data-parallel trial (``resources.workers`` > 1) only
    drives a `TorchTrainer` whose workers ask Ray for their own CPUs/GPUs: Tune reserves a token (one byte
    of the ``memory`` resource, as Ray refuses an empty request) and `_max_concurrent` bounds the trials."""
    if spec.workers > 1:
        return {"cpu": 0, "gpu": 0, "memory": 1}
    return {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]}


def _max_concurrent(spec: SweepSpec) -> Optional[int]:
    """The sweep's limit on running trials; for data-parallel trials also what the cluster can place at
    once (each trial's workers x per-worker resources), so that no trial waits on workers Ray cannot start."""
    import ray

    if spec.workers <= 1 or not ray.is_initialized():
        return spec.max_concurrent
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0.0) / (spec.workers * spec.resources["cpu"])]
    if spec.resources["gpu"]:
        fits.append(total.get("GPU", 0.0) / (spec.workers * spec.resources["gpu"]))
    limit = max(1, int(min(fits)))
    return min(limit, spec.max_concurrent) if spec.max_concurrent else limit


def build_tuner(resolved: ResolvedSweep, storage: Storage, name: str, trainable: Optional[Callable] = None,
                loggers: Sequence[str] = ()):
    """The `tune.Tuner` for a resolved sweep, writing to ``storage/name`` (Ray must be initialised only
    for `fit`). `loggers`: trackers besides TensorBoard (``mlflow``, ``wandb``; `orchestrator.trackers`)."""
    from ray import tune

    from .console import SweepReporter
    from .trackers import tune_callbacks

    spec = resolved.spec
    if trainable is None:
        trainable = load_trainable(default_trainable(spec))
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=resolved.make_searcher(),
        scheduler=resolved.make_scheduler(),
        num_samples=spec.num_samples,
        max_concurrent_trials=_max_concurrent(spec),
        reuse_actors=spec.actor_reuse,  # the rule: SweepSpec.actor_reuse
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage.ray_storage_path,
        storage_filesystem=storage.ray_storage_filesystem,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=spec.num_to_keep,
            checkpoint_score_attribute=spec.metric,
            checkpoint_score_order=spec.mode,
        ),
        # Each trial writes its run outputs (weights, TensorBoard, run/result.json) into its working
        # directory on its own node; artifact sync uploads them to the storage with every checkpoint
        # and at the end. Without it they stay in /tmp/ray on that node (and with reuse_actors, every
        # trial after an actor's first loses them even on one machine).
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # JSON/CSV logs, the HParams config and the trackers; no Tune TensorBoard logger (quiet_tune_output)
        callbacks=tune_callbacks(resolved, loggers, name),
        progress_reporter=SweepReporter(spec.metric, spec.mode),
        verbose=1,
    )
    return tune.Tuner(
        tune.with_resources(trainable, _trial_resources(spec)),
        param_space=resolved.make_param_space(),
        tune_config=tune_config,
        run_config=run_config,
    )


def write_marker(exp: Storage, resolved: ResolvedSweep, trainable: str) -> None:
    """The experiment marker: what `resume_sweep` rebuilds the sweep from. ``validated``: the values
    were checked against the model's geometry at `run` (resume then skips that check). ``storage``: the
    printable URI (never a secret)."""
    from finetune import __version__

    marker = {
        "format": MARKER_FORMAT,
        "version": __version__,
        "source": resolved.spec.source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "storage": exp.uri,
        "trainable": trainable,
        "validated": resolved.geometry_checked,
        "spec": resolved.spec.to_dict(),
    }
    exp.write_bytes(MARKER, (json.dumps(json_safe(marker), indent=2, sort_keys=True) + "\n").encode())


def read_marker(exp: Storage) -> Dict[str, Any]:
    """The marker of a vitsweep experiment; anything else is refused with the reason."""
    if not exp.is_dir():
        raise ConfigError(f"{exp.uri!r} is not a directory (or holds nothing)")
    try:
        raw = exp.read_bytes(MARKER)
    except FileNotFoundError:
        raise ConfigError(f"{exp.uri!r} is not a vitsweep experiment ({MARKER} is missing)") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"vitsweep experiment marker in {exp.uri!r} is not valid JSON (corrupt?): {err}") from None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{exp.uri!r}: {MARKER} is not a vitsweep experiment marker (format={found!r}, "
                          f"expected {MARKER_FORMAT!r})")
    return data


@dataclass
class SweepOutcome:
    """`experiment`: where the results are (``STORAGE/NAME``); `experiment_dir`: the local directory the
    report was built in (the experiment itself on local storage, a local copy for a URI)."""

    experiment: Storage
    experiment_dir: Path
    report: Report
    num_errors: int
    missing_trials: int = 0
    interrupted_by: int = 0  # the signal (SIGINT, SIGTERM) that stopped the sweep early; 0: none


@contextlib.contextmanager
def _disk_errors(exp: Storage):
    """A full (or read-only) disk while the sweep runs or reports: one line that says what failed and
    how to continue once space is back; the last intact Tune state is kept (`state_keeper`)."""
    from finetune.outputs import disk_error_message

    try:
        yield
    except OSError as err:
        message = disk_error_message(err)
        if message is None:
            raise
        raise ConfigError(f"the sweep could not write: {message.split('; files written')[0]}; finished trials and "
                          f"the last intact Tune state are kept; once space is back: vitsweep resume {exp.uri}") from None


def _finish(exp: Storage, results, expected: Optional[int] = None) -> SweepOutcome:
    report, local_dir = report_storage(exp)
    missing = max(0, expected - len(report.records)) if expected is not None else 0
    if missing:
        # Seen with Ray 2.60: with max_concurrent on grid/random, trials are generated lazily, and a
        # driver killed at the wrong moment can leave the restored generator unable to create the rest.
        _logger.warning(
            "%d of %d grid trials were never created in %s; run the sweep again (without "
            "--max-concurrent, every trial is created up front and survives a resume)", missing, expected, exp.uri,
        )
    return SweepOutcome(experiment=exp, experiment_dir=local_dir, report=report, num_errors=results.num_errors,
                        missing_trials=missing)


def run_sweep(
    sweep: Union[ResolvedSweep, SweepSpec],
    *,
    storage: str | Path | Storage = DEFAULT_STORAGE,
    name: Optional[str] = None,
    address: Optional[str] = None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    trainable: Optional[Callable] = None,
    overwrite: bool = False,
    loggers: Sequence[str] = (),
    metrics_export_port: Optional[int] = None,
) -> SweepOutcome:
    """Check the storage, start or join Ray, run the Tuner, write the report; returns where everything is.

    `sweep` is validated already (`search_spaces.load_sweep`); a `SweepSpec` is resolved here. Only
    resources the sweep was not checked against are checked: a cluster after joining it, or a local
    instance other than the one `load_sweep` was given. `storage` is a local/NFS path or a URI; it is
    checked writable before Ray starts. An existing experiment at ``storage/name`` is refused, or with
    `overwrite` moved aside (`orchestrator.preflight.check_new_experiment`); the experiment lock is held
    from before Ray starts until the report is written. A sweep with ``data_cache`` gets its decode-once
    cache built (or reused) first, before Ray starts (`orchestrator.data_cache`). `loggers`: ``mlflow``, ``wandb`` besides
    TensorBoard (checked first, `orchestrator.trackers.check_loggers`). `metrics_export_port`: a local
    instance's Prometheus port on 127.0.0.1 (`orchestrator.monitoring`).
    """
    from .trackers import check_loggers

    loggers = check_loggers(loggers)
    metrics_export_port = check_export_port(metrics_export_port, address)
    available = local_resources(address, num_cpus, num_gpus)
    if isinstance(sweep, SweepSpec):
        sweep = load_sweep(sweep, local_resources=available)
    elif available is not None and sweep.local_resources != available:
        validate_resources(sweep.spec, *available)
    spec = sweep.spec
    root = as_storage(storage)
    name = check_name(name) if name is not None else default_name(spec)
    check_cluster_address(address)
    check_writable(root)
    exp = root.join(name)
    check_new_experiment(exp, overwrite)
    with experiment_lock(exp, "run"):
        sweep = prepare_data_cache(sweep, joining=available is None,
                                   reload=lambda values: _reload(values, spec.source, available))
        spec = sweep.spec
        init_ray(address, num_cpus, num_gpus, metrics_export_port)
        if available is None:
            check_cluster(spec)
        trainable = trainable or load_trainable(default_trainable(spec))
        write_marker(exp, sweep, trainable_path(trainable))
        tuner = build_tuner(sweep, root, name, trainable, loggers)
        with _disk_errors(exp), graceful_stop(exp.uri) as stop:  # the report too: a second Ctrl-C there still prints the hint
            with keep_last_good_state(exp, check_state_bytes):
                results = tuner.fit()
            outcome = _finish(exp, results, expected=sweep.expected_trials)
    outcome.interrupted_by = stop.signum or 0
    return outcome


def _reload(values: Dict[str, Any], source: str, available: Optional[Tuple[float, float]]) -> ResolvedSweep:
    """The sweep `values` validated again, as `vitsweep run` validated the original (local or cluster)."""
    resolved = load_cluster_sweep(values) if available is None else load_sweep(values, local_resources=available)
    resolved.spec.source = source
    return resolved


def resume_sweep(
    experiment: str | Path | Storage,
    *,
    address: Optional[str] = None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    metrics_export_port: Optional[int] = None,
) -> SweepOutcome:
    """Continue a stopped sweep in `experiment` (``STORAGE/NAME``, a path or a URI): unfinished and
    errored trials from their last checkpoints; finished trials are not run again."""
    from ray import tune

    exp = as_storage(experiment)
    marker = read_marker(exp)
    if exp.is_local and not os.access(exp.path, os.W_OK | os.X_OK):
        ro = bool(os.statvfs(exp.path).f_flag & os.ST_RDONLY)
        raise ConfigError(f"experiment {exp.uri!r} {'is on a read-only filesystem' if ro else 'is not writable'}; "
                          "resume writes Tune's state and the trials' checkpoints there (`vitsweep report "
                          f"{exp.uri} --out NEW_DIR` reads it without writing)")
    if not tune.Tuner.can_restore(exp.ray_storage_path, storage_filesystem=exp.ray_storage_filesystem):
        raise ConfigError(f"{exp.uri!r} has a vitsweep marker but no Tune state to resume (did the sweep start?)")
    # Markers without "validated" were written by `run`, which always checked the geometry.
    resolved = load_sweep(marker["spec"], source_name=marker.get("source", ""),
                          check_geometry=not marker.get("validated", True))
    trainable = load_trainable(marker.get("trainable") or default_trainable(resolved.spec))
    check_cluster_address(address)
    metrics_export_port = check_export_port(metrics_export_port, address)
    with experiment_lock(exp, "resume"):
        check_tune_state(exp)  # a corrupt state would make Tune start the experiment afresh
        init_ray(address, num_cpus, num_gpus, metrics_export_port)
        check_cluster(resolved.spec)
        tuner = tune.Tuner.restore(
            exp.ray_storage_path,
            trainable=tune.with_resources(trainable, _trial_resources(resolved.spec)),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=exp.ray_storage_filesystem,
        )
        with _disk_errors(exp), graceful_stop(exp.uri) as stop:  # the report too: a second Ctrl-C there still prints the hint
            with keep_last_good_state(exp, check_state_bytes):
                results = tuner.fit()
            outcome = _finish(exp, results, expected=resolved.expected_trials)
    outcome.interrupted_by = stop.signum or 0
    return outcome
