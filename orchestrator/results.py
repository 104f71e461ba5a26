"""Every trial of an experiment directory, read from disk without starting Ray.

Ray's `ExperimentAnalysis` gives each trial's id, directory, config, status, failure count and error
text. vitsweep adds what Ray does not keep: the per-epoch history merged with the run's own
``run/result.json`` (it survives a retry), a one-line error reason, and the trial's outcome (finished,
stopped early, errored, diverged, unfinished).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from finetune.errors import ConfigError, ReportError
from finetune.io_utils import json_safe
from trainables.layout import RUN_SUBDIR, flatten_trial_config, trial_label

from .preflight import STATE_PATTERN, check_state_bytes, check_state_file

MARKER = "vitsweep_experiment.json"

_logger = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    trial_id: str
    path: Path
    label: str
    config: Dict[str, Any]
    status: str
    history: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None
    num_failures: int = 0
    gpus_per_trial: float = 0.0  # the sweep's resources.gpu: below 1, trials shared a GPU

    @property
    def shared_gpu(self) -> bool:
        """The trial had a fraction of a GPU: others ran on the same device, so its img/s and memory
        depend on them."""
        return 0.0 < self.gpus_per_trial < 1.0

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def epochs_run(self) -> int:
        return int(self.final.get("epoch") or 0)


@dataclass
class _TuneTrial:
    """What Tune knows of one trial; `error_text` is the full text of its error file, if any."""

    trial_id: str
    path: Path
    config: Dict[str, Any]
    status: str
    error_text: Optional[str]
    num_failures: int


def _read_json_lines(path: Path) -> List[Dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver; the complete lines still count
    return rows


def _read_json_object(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None (with a warning naming it) if it is corrupt."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _logger.warning("skipping %s: not valid JSON (truncated or corrupt: %s)", path, err)
        return None
    if not isinstance(data, dict):
        _logger.warning("skipping %s: holds a %s, not a JSON object", path, type(data).__name__)
        return None
    return data


def _read_run_result(trial_dir: Path) -> Dict[str, Any]:
    """The run's own result.json; a corrupt one is skipped with a warning (Tune's log still counts)."""
    path = trial_dir / RUN_SUBDIR / "result.json"
    data = _read_json_object(path) if path.is_file() else None
    if data is not None and not isinstance(data.get("history", []), list):
        _logger.warning("skipping %s: its history is not a list", path)
        data = None
    return data or {}


def _history(trial_dir: Path, run_result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per-epoch reports, one per epoch; a restored trial may report an epoch twice: the last wins.

    Tune rewrites its JSON log when it retries a failed trial, so the epochs before the retry survive
    only in the run's own ``run/result.json`` (its history includes the epochs restored from the
    checkpoint); both are read, Tune's rows over the run's. Tune's log is read here line by line, not
    through `ExperimentAnalysis.trial_dataframes`: that drops a trial's whole log for one line cut short
    by a killed driver, and turns None into NaN and integers into floats. Non-finite numbers are None.
    """
    by_epoch: Dict[Any, Dict[str, Any]] = {row.get("epoch"): row for row in run_result.get("history", [])}
    for row in _read_json_lines(trial_dir / "result.json"):
        by_epoch[row.get("epoch", row.get("training_iteration"))] = row
    return [json_safe(by_epoch[k]) for k in sorted(by_epoch, key=lambda e: (e is None, e))]


def _error_reason(error_text: Optional[str]) -> str:
    lines = [l.strip() for l in (error_text or "").splitlines() if l.strip()]
    return lines[-1][:200] if lines else "unknown error (no error file)"


def _classify(status: str, history: List[Dict[str, Any]], config: Dict[str, Any], scheduler: str,
              error: Optional[str], run_status: Optional[str]) -> str:
    last = history[-1] if history else {}
    if status == "ERROR":
        return f"errored: {error}"
    if last.get("status") == "diverged" or run_status == "diverged":
        return "diverged"
    epochs = config.get("epochs")
    if run_status == "finished" or (epochs is not None and last.get("epoch") == epochs):
        return "finished"
    if status == "TERMINATED":
        return "stopped early (ASHA)" if scheduler == "asha" else "stopped early"
    return "unfinished"


def _tune_trials(exp_dir: Path) -> Iterator[_TuneTrial]:
    """The trials of Tune's experiment state, through Ray's public reader (it starts no Ray instance).

    Ray unpickles parts of that state, among them a reference to `orchestrator.sweep.trial_dirname`:
    report only directories you trust (as for resume), and keep that function's name."""
    import pickle

    from ray.tune import ExperimentAnalysis

    newest = max(exp_dir.glob(STATE_PATTERN))  # the one ExperimentAnalysis reads
    source = str(exp_dir)
    try:
        try:
            check_state_file(newest)
        except ConfigError as err:
            last_good = _last_good_state(exp_dir)
            if last_good is None:
                raise
            _logger.warning("%s; reporting from the last intact copy the driver kept (%s)", err, last_good.name)
            newest, source = last_good, str(last_good)
        analysis = ExperimentAnalysis(source)
    except ConfigError as err:
        raise ReportError(f"{err}; cannot report {str(exp_dir)!r}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReportError(f"Tune's experiment state {str(newest)!r} cannot be read ({type(err).__name__}: {err}); "
                          f"cannot report {str(exp_dir)!r}") from None
    for trial in analysis.trials:
        yield _TuneTrial(trial.trial_id, Path(trial.path), trial.config, trial.status,
                         trial.get_error(), int(trial.num_failures or 0))


def _last_good_state(exp_dir: Path) -> Optional[Path]:
    """The driver's last intact copy of Tune's state (`orchestrator.state_keeper`), if there is one."""
    from .state_keeper import LAST_GOOD, intact_state

    path = exp_dir / LAST_GOOD
    return path if path.is_file() and intact_state(path, check_state_bytes) is not None else None


def _copied_trials(exp_dir: Path) -> Iterator[_TuneTrial]:
    """Trial folders without Tune's experiment state (copied): statuses come from the run outputs alone."""
    for params in sorted(exp_dir.glob("*/params.json")):
        config = _read_json_object(params)
        if config is None:
            continue  # warned: the trial's config is unknown
        error_file = params.parent / "error.txt"
        error_text = error_file.read_text(errors="replace") if error_file.is_file() else None
        yield _TuneTrial(params.parent.name, params.parent, config,
                         "ERROR" if error_text is not None else "TERMINATED", error_text, 0)


def _marker_gpus(marker: Path) -> float:
    """The GPUs per trial the marker's sweep asked for (0 when unknown)."""
    try:
        gpu = json.loads(marker.read_bytes())["spec"]["resources"]["gpu"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    return float(gpu) if isinstance(gpu, (int, float)) and not isinstance(gpu, bool) else 0.0


def _marker_scheduler(marker: Path) -> str:
    try:
        data = json.loads(marker.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"the experiment marker {str(marker)!r} is corrupt (not valid JSON: {err}); restore it "
                          "or delete it to report the trials without it") from None
    spec = data.get("spec") if isinstance(data, dict) else None
    scheduler = spec.get("scheduler", "fifo") if isinstance(spec, dict) else None
    if not isinstance(scheduler, str):
        raise ReportError(f"the experiment marker {str(marker)!r} is not a vitsweep marker (no spec.scheduler)")
    return scheduler


def collect_trials(exp_dir: str | Path) -> List[TrialRecord]:
    """Every trial of the experiment in `exp_dir`, read from disk."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ReportError(f"{str(exp_dir)!r} is not a directory")
    marker = exp_dir / MARKER
    scheduler = _marker_scheduler(marker) if marker.is_file() else "fifo"
    gpus = _marker_gpus(marker) if marker.is_file() else 0.0
    has_state = any(exp_dir.glob("experiment_state-*.json"))
    trials = list(_tune_trials(exp_dir) if has_state else _copied_trials(exp_dir))
    if not trials:
        raise ReportError(f"{str(exp_dir)!r} holds no trials (is it a Ray Tune experiment directory?)")

    records = []
    for trial in trials:
        if not trial.config:  # an empty-config trial from Ray's restored generator (see trainables.train_vit)
            continue
        run_result = _read_run_result(trial.path)
        history = _history(trial.path, run_result)
        flat = flatten_trial_config(trial.config)
        error = _error_reason(trial.error_text) if trial.status == "ERROR" else None
        records.append(TrialRecord(
            trial_id=trial.trial_id, path=trial.path, label=trial_label(trial.config), config=flat,
            status=_classify(trial.status, history, flat, scheduler, error, run_result.get("status")),
            history=history, error=error, num_failures=trial.num_failures, gpus_per_trial=gpus,
        ))
    return records
