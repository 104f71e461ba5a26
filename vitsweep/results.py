"""`load_results`: an experiment's trials as a pandas DataFrame, from a directory or a storage URI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd

from orchestrator.labels import config_label
from orchestrator.report import is_report_input
from orchestrator.results import TrialRecord, collect_trials
from orchestrator.storage import resolve_storage
from trainables.layout import RUN_SUBDIR

# The schedule's learning rate at an epoch (the metric ``lr``); the config's peak ``lr`` keeps its name.
LR_METRIC_COLUMN = "lr_schedule"
_FIRST = ["trial_id", "label", "variant", "seed", "status"]
_WHERE = ["error", "num_failures", "path", "weights"]


def _cell(value: Any) -> Any:
    """Lists (``dilation``, ``topk``) as tuples, so columns can be grouped on."""
    return tuple(_cell(v) for v in value) if isinstance(value, list) else value


def _metrics(row: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in row.items():
        if key == "lr":
            out[LR_METRIC_COLUMN] = value
        elif "/" in key or key == "epoch":
            out[key] = value
    return out


def _trial_columns(rec: TrialRecord) -> Dict[str, Any]:
    weights = Path(rec.path) / RUN_SUBDIR / "weights.safetensors"
    return {
        "trial_id": rec.trial_id,
        "label": config_label({"arch": {"variant": rec.config.get("variant", "softmax"), "_label": rec.label},
                               **rec.config}),
        "variant": rec.config.get("variant", "softmax"),
        "seed": rec.config.get("seed"),
        "status": rec.status,
        **{k: _cell(v) for k, v in rec.config.items() if k not in ("variant", "seed")},
        "error": rec.error,
        "num_failures": rec.num_failures,
        "path": str(rec.path),
        "weights": str(weights) if weights.is_file() else None,
    }


def _frame(rows: List[Dict[str, Any]]) -> pd.DataFrame:
    """Columns: the trial's identity, its config keys, where it is, then the metrics."""
    frame = pd.DataFrame(rows)
    seen = list(frame.columns)
    trailing = [c for c in _WHERE if c in seen]
    metrics = [c for c in seen if "/" in c or c in ("epoch", LR_METRIC_COLUMN)]
    first = [c for c in _FIRST if c in seen]
    config = [c for c in seen if c not in {*first, *trailing, *metrics}]
    for column in metrics:  # a metric not measured (None: memory on CPU) is NaN in a float column
        values = frame[column]
        if values.isna().any() and all(isinstance(v, (int, float)) for v in values.dropna()):
            frame[column] = values.astype("float64")
    return frame[first + config + trailing + metrics]


def _local_copy(experiment: str | os.PathLike) -> Path:
    """The experiment's directory: itself when local, else a temp copy of the small files of a URI
    (what `vitsweep report URI` copies: Tune's state and logs, run/result.json, TensorBoard events)."""
    exp = resolve_storage(experiment)
    if exp.is_local:
        return Path(exp.path)
    local = Path(tempfile.mkdtemp(prefix="vitsweep-results-"))
    exp.download_dir("", local, include=is_report_input)
    return local


def load_results(experiment: str | os.PathLike, history: bool = False) -> pd.DataFrame:
    """The trials of `experiment` (``STORAGE/NAME``: a directory, or a URI such as
    ``s3://bucket/prefix/NAME``) as a DataFrame; Ray is not started.

    One row per trial: ``trial_id``, ``label`` (variant and its hyperparameters, ``linformer k=64``),
    ``variant``, ``seed``, ``status`` (finished, stopped early, errored: ..., diverged, unfinished),
    every config key flat (a variant's hyperparameters are columns of their own: ``rank``,
    ``dilation``, ...; lists as tuples), the final epoch's metrics under their names (``val/acc1``,
    ``cost/gflops``, ``memory/peak_allocated_mb``, the inference profile ``infer/latency_b1_ms``,
    ``infer/img_s``, ``infer/peak_mem_b64_mb``, ``infer/mem_source``, ...; ``epoch``; the schedule's last learning rate as
    ``lr_schedule``), ``error``, ``num_failures``, ``path`` (the trial directory) and ``weights`` (its
    weights file, or None). Missing and non-finite values are NaN/None.

    ``history=True``: one row per trial and epoch instead, with the same trial columns and that epoch's
    metrics.
    """
    records = collect_trials(_local_copy(experiment))
    rows = []
    for rec in sorted(records, key=lambda r: (r.label, str(r.config.get("seed")), r.trial_id)):
        base = _trial_columns(rec)
        if history:
            rows += [{**base, **_metrics(h)} for h in rec.history]
        else:
            rows.append({**base, **_metrics(rec.final)})
    return _frame(rows)
