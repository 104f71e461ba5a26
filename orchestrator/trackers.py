"""Where a sweep's trials are logged besides Tune's own JSON/CSV logs: TensorBoard (always), MLflow and
Weights & Biases (``vitsweep run --log mlflow,wandb``). Every destination gets the same hyperparameters
(`finetune.tb_writer.flat_hparams` of the trial's config: every training key and the variant's own
hyperparameters, flat) and the same metric names (``val/acc1``, ``cost/gflops``, ...; `tracked_metrics`).

TensorBoard: each trial writes its own run (scalars and its HParams session, `finetune.train`); the
driver writes the one HParams experiment config at the experiment root (`HParamsConfigCallback`), whose
columns are every swept key of every variant of the sweep (`hparam_columns`). MLflow and W&B use Ray's
own callbacks (`ray.air.integrations`), told to log that set instead of Ray's nested trial config.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Sequence, Union

from ray.tune import Callback

from finetune.errors import ConfigError
from finetune.models.attention import get_attention_class
from finetune.tb_writer import BOOL, NUMBER, STRING, flat_hparams, metric_names, write_hparams_config
from search_spaces import ResolvedSweep

from .tracked import tracked_metrics, trial_hparams  # noqa: F401 (public here too)

LOGGERS = ("tensorboard", "mlflow", "wandb")
# Ray's MLflow and W&B integrations import mlflow / wandb (~4 s): their callbacks live in
# `orchestrator.tracker_callbacks`, imported only by a sweep that logs to them.
_TRACKER_CALLBACKS = ("MLflowCallback", "WandbCallback")


def __getattr__(name: str) -> Any:
    if name in _TRACKER_CALLBACKS:  # `from orchestrator.trackers import MLflowCallback` still works
        from . import tracker_callbacks

        return getattr(tracker_callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return BOOL
    return NUMBER if isinstance(value, (int, float)) else STRING


def hparam_columns(resolved: ResolvedSweep) -> Dict[str, Union[str, List[Any]]]:
    """The HParams columns of a sweep: ``label``, ``variant``, ``seed``, the shared keys the sweep
    searches, each variant block's searched keys, and every hyperparameter each variant declares."""
    spec = resolved.spec
    example = flat_hparams(resolved.checked_configs[0].to_dict()) if resolved.checked_configs else {}
    columns: Dict[str, Union[str, List[Any]]] = {"label": STRING, "variant": [b.variant for b in spec.variants],
                                                 "seed": NUMBER}
    declared: Dict[str, Any] = {}
    for block in spec.variants:
        declared.update(get_attention_class(block.variant).hparams)
    for key in [*spec.search, *(k for b in spec.variants for k in b.search)]:
        if key not in declared:
            columns.setdefault(key, _kind(example.get(key, 0.0)))
    for key, hp in declared.items():
        columns.setdefault(key, STRING if hp.sequence or hp.type is str else (BOOL if hp.type is bool else NUMBER))
    return columns


def sweep_metric_names(resolved: ResolvedSweep) -> List[str]:
    """Every scalar a trial of this sweep logs (top-k and the swap metrics as configured)."""
    topk = sorted({k for cfg in resolved.checked_configs for k in cfg.topk}) or [1, 5]
    return metric_names(topk, any(cfg.eval_at_start for cfg in resolved.checked_configs))


class HParamsConfigCallback(Callback):
    """Driver side: write TensorBoard's HParams experiment config once, at the experiment root, when the
    first trial starts (into Tune's driver staging directory, which Tune uploads with its own state, so
    it reaches a URI storage too)."""

    def __init__(self, columns: Mapping[str, Union[str, Sequence[Any]]], metrics: Sequence[str],
                 description: str = "") -> None:
        self.columns = dict(columns)
        self.metrics = list(metrics)
        self.description = description
        self.written = False

    def on_trial_start(self, iteration: int, trials: List, trial, **info) -> None:
        if not self.written:
            write_hparams_config(trial.storage.experiment_driver_staging_path, self.columns, self.metrics,
                                 self.description)
            self.written = True


def check_loggers(names: Sequence[str]) -> List[str]:
    """`--log` values, checked before Ray starts: known names, installed packages, a usable MLflow store
    and W&B credentials (or ``WANDB_MODE=offline``)."""
    out: List[str] = []
    for name in names:
        for part in (p.strip() for p in name.split(",")):
            if part not in LOGGERS:
                raise ConfigError(f"--log {part!r}: allowed: {', '.join(LOGGERS)}")
            if part not in out:
                out.append(part)
    if "mlflow" in out:
        _check_mlflow()
    if "wandb" in out:
        _check_wandb()
    return out


def _check_mlflow() -> None:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--log mlflow needs MLflow: pip install 'vitsweep[mlflow]'") from None
    try:
        mlflow.tracking.MlflowClient().search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"--log mlflow: the tracking store {mlflow.get_tracking_uri()!r} is not usable: {first} "
                          "(set MLFLOW_TRACKING_URI, e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)") from None


def _check_wandb() -> None:
    try:
        import wandb
    except ImportError:
        raise ConfigError("--log wandb needs wandb: pip install 'vitsweep[wandb]'") from None
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return
    wandb.ensure_configured()  # reads a `wandb login` key from the netrc/settings, no network
    if not getattr(getattr(wandb, "api", None), "api_key", None):
        raise ConfigError("--log wandb needs WANDB_API_KEY (or `wandb login`), or WANDB_MODE=offline to log locally")


def tune_callbacks(resolved: ResolvedSweep, loggers: Sequence[str] = (), name: str = "") -> List[Callback]:
    """The driver's callbacks: Tune's JSON and CSV loggers (the report reads ``result.json``), the HParams
    config, and the trackers in `loggers`. Tune's TensorBoard logger is not among them: each trial
    writes its own TensorBoard run, and a second set of event files would double every run."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    description = f"vitsweep sweep {name or resolved.spec.name}: " + ", ".join(b.label for b in resolved.spec.variants)
    callbacks: List[Callback] = [JsonLoggerCallback(), CSVLoggerCallback(),
                                 HParamsConfigCallback(hparam_columns(resolved), sweep_metric_names(resolved), description)]
    if "mlflow" in loggers:
        from .tracker_callbacks import MLflowCallback

        callbacks.append(MLflowCallback(experiment_name=name or resolved.spec.name))
    if "wandb" in loggers:
        from .tracker_callbacks import WandbCallback

        callbacks.append(WandbCallback(project=os.environ.get("WANDB_PROJECT") or "vitsweep", group=name or None))
    return callbacks
