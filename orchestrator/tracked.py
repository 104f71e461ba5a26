"""What every tracker logs for a trial: its metrics (`tracked_metrics`) and its flat hyperparameters
(`trial_hparams`); shared by `orchestrator.trackers` and `orchestrator.tracker_callbacks`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Union

from finetune.config import TrainConfig
from finetune.io_utils import finite_or_none
from finetune.tb_writer import flat_hparams
from trainables.layout import flatten_trial_config


def tracked_metrics(result: Mapping[str, Any]) -> Dict[str, float]:
    """The metrics of one report as TensorBoard logs them: every finite number named ``group/name``
    (``val/acc1``, ``cost/gflops``) or ``lr``; Ray's bookkeeping (``training_iteration``, ``pid``, ...),
    ``epoch`` (the step) and the config are left out."""
    out = {}
    for key, value in result.items():
        if ("/" in key or key == "lr") and not isinstance(value, bool) and isinstance(value, (int, float)):
            value = finite_or_none(value)
            if value is not None:
                out[key] = float(value)
    return out


def trial_hparams(config: Mapping[str, Any]) -> Dict[str, Union[bool, int, float, str]]:
    """A trial config's hyperparameters, as its TensorBoard session holds them."""
    return flat_hparams(TrainConfig.from_dict(flatten_trial_config(dict(config))).to_dict())
