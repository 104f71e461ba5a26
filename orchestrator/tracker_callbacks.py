"""Ray's MLflow and W&B logger callbacks, as vitsweep configures them (`orchestrator.trackers`): one run
per trial named by its label, the trial's flat hyperparameters, `tracked_metrics` at step = epoch.

A module of its own because Ray's integrations import mlflow and wandb, seconds a sweep without
``--log mlflow,wandb`` should not pay; `trackers.tune_callbacks` imports it only when asked.
"""

from __future__ import annotations

from typing import Dict

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem

from .labels import trial_run_label
from .tracked import tracked_metrics, trial_hparams


class MLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow logger, one MLflow run per trial named by its label (``linformer k=64 seed0``),
    with the trial's flat hyperparameters as params and `tracked_metrics` at step = epoch."""

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            tags = {**self.tags, "trial_id": trial.trial_id, "trial_name": str(trial)}
            run = self.mlflow_util.start_run(tags=tags, run_name=trial_run_label(trial), set_active=False)
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial_hparams(trial.config))

    def log_trial_result(self, iteration: int, trial, result: Dict) -> None:
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=tracked_metrics(result),
                                     step=step)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self.mlflow_util.end_run(run_id=self._trial_runs[trial], status="FAILED" if failed else "FINISHED")


class WandbCallback(WandbLoggerCallback):
    """Ray's W&B logger (one W&B run per trial, from a logging actor), named by the trial's label,
    grouped by experiment, with the trial's flat hyperparameters as config and `tracked_metrics`."""

    def log_trial_start(self, trial) -> None:
        self._start_logging_actor(
            trial, [*self._exclude_results, *self.excludes, "config"],
            id=trial.trial_id, name=trial_run_label(trial), resume=False, reinit=True, allow_val_change=True,
            group=self.group or trial.experiment_dir_name, project=self.project,
            config=trial_hparams(trial.config), **self.kwargs,
        )

    def log_trial_result(self, iteration: int, trial, result: Dict) -> None:
        if trial not in self._trial_logging_actors:
            self.log_trial_start(trial)
        self._trial_queues[trial].put((_QueueItem.RESULT, tracked_metrics(result)))
