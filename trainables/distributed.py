"""A data-parallel trial: the Tune trial drives one Ray Train `TorchTrainer`, whose N workers run the same
`finetune.train.run_training` in a DDP process group that Ray Train creates (NCCL on GPUs, gloo on CPUs).

`orchestrator.sweep` passes `train_vit_ddp` to Tune instead of `train_vit` when the sweep's
``resources.workers`` is above 1. This is the composition Ray documents for Ray 2.60 (Train V2, the default there): a Tune *function*
trainable launches a `TorchTrainer` per trial; each worker calls ``ray.train.report(metrics,
checkpoint=...)`` and Ray's ``ray.tune.integration.ray_train.TuneReportCallback`` hands rank 0's metrics
to Tune. So:

- metrics: `finetune.loop.fit` all-reduces them before any callback sees them; every rank reports the
  same numbers (Ray Train needs a report from every worker), rank 0's reach Tune, once per epoch;
- checkpoints: rank 0 writes the usual vitsweep checkpoint (`finetune.checkpoint`, plus ``nodes.json``)
  and reports it; Ray Train keeps the latest ``num_to_keep`` under ``<trial dir>/ddp/`` in the sweep's
  storage. The Tune trial itself holds no checkpoint;
- faults: a worker that dies fails the worker group; Ray Train's ``FailureConfig(max_failures)`` (the
  sweep's ``max_failures``) restarts all workers, which resume from the latest reported checkpoint
  (`ray.train.get_checkpoint`). A Tune-level retry or ``vitsweep resume`` starts a `TorchTrainer` with
  the same name and storage, which finds the same checkpoints (Ray Train's run snapshot);
- outputs: rank 0 writes ``run/`` (result.json, weights, tb/) on its node and uploads it to the trial's
  directory in storage before its last report returns.

Tune reserves only a token for the driving trial (`orchestrator.sweep._trial_resources`); the workers
ask Ray for ``resources.cpu``/``resources.gpu`` each.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Sequence

import ray
import ray.train
from ray import tune

from finetune.callbacks import Callback
from finetune.distributed import DistContext
from finetune.errors import ConfigError, DataError
from finetune.train import release_device_memory, run_training

from .finetune_trainable import (TuneReportCallback, _on_node, check_placement, current_node, read_nodes, reportable,
                                 restore_to_temp, trial_config)
from .layout import DDP_KEY, RUN_SUBDIR

# Ray Train's run directory inside the trial's directory in storage (its checkpoints, its run snapshot).
TRAIN_RUN_NAME = "ddp"


class TrainReportCallback(TuneReportCallback):
    """`TuneReportCallback`, reporting through Ray Train from every worker: rank 0 writes and attaches
    the checkpoint, the other ranks report the same (already reduced) metrics without one."""

    def __init__(self, label: str, nodes, *, is_main: bool, defer_final: bool = False) -> None:
        super().__init__(label, nodes, defer_final=defer_final)
        self.is_main = is_main
        self.publishes = is_main  # one series of Ray gauges per trial, not one per worker

    def _write_checkpoint(self, state, directory: str) -> None:
        if self.is_main:
            super()._write_checkpoint(state, directory)

    def _report(self, metrics: Dict[str, Any], directory: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory and self.is_main else None
        ray.train.report(metrics, checkpoint=checkpoint)


def upload_run_outputs(out_dir: str, dest: str, filesystem) -> None:
    """Copy rank 0's ``run/`` to ``dest`` (the trial's run directory in storage) unless it is that."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem) and os.path.realpath(dest) == os.path.realpath(out_dir):
        return
    pafs.copy_files(out_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


def train_worker(loop_config: Dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial (the process group exists already)."""
    import ray.train.torch

    cfg, label = trial_config(loop_config["config"])
    node = current_node()
    check_placement(cfg, node)  # a worker Ray gave a GPU must see one (as a one-process trial)
    dist = DistContext.from_initialized(ray.train.torch.get_device())
    restore_dir = None
    reporter: Optional[TrainReportCallback] = None
    try:
        restore_dir = restore_to_temp(ray.train.get_checkpoint())
        nodes = [*read_nodes(restore_dir), node]
        reporter = TrainReportCallback(label, nodes, is_main=dist.is_main, defer_final=True)
        try:
            result = run_training(
                cfg, loop_config["out_dir"], callbacks=[reporter, *loop_config["callbacks"]],
                resume_from=restore_dir, progress=False, local_checkpoints=False,
                extra_result={"node": node, "nodes": nodes}, dist=dist,
            )
        except (DataError, ConfigError) as err:
            raise _on_node(err, node) from err
        if not reporter.report_final() and reporter.reports == 0 and result.get("metrics"):
            ray.train.report({**reportable(result["metrics"]), "variant_label": label})  # restored at its end
        if dist.is_main:
            upload_run_outputs(loop_config["out_dir"], loop_config["run_dest"], loop_config["filesystem"])
    finally:
        if reporter is not None:
            reporter.discard()
        if restore_dir is not None:
            shutil.rmtree(restore_dir, ignore_errors=True)
        release_device_memory()


def train_vit_ddp(config: Dict[str, Any], callbacks: Sequence[Callback] = ()) -> None:
    """The Tune trial of a data-parallel configuration: one `TorchTrainer` over ``config[DDP_KEY]``."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback as RayTuneReportCallback

    ddp = config[DDP_KEY]
    context = tune.get_context()
    storage = context.get_storage()
    per_worker = {"CPU": float(ddp["cpu"])}
    if ddp["gpu"]:
        per_worker["GPU"] = float(ddp["gpu"])
    loop_config = {
        "config": config,
        "out_dir": os.path.join(context.get_trial_dir(), RUN_SUBDIR),
        "run_dest": f"{storage.trial_fs_path}/{RUN_SUBDIR}",
        "filesystem": storage.storage_filesystem,
        "callbacks": list(callbacks),
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=int(ddp["workers"]), use_gpu=bool(ddp["gpu"]),
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=int(ddp["max_failures"])),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(ddp["num_to_keep"])),
            callbacks=[RayTuneReportCallback()],
        ),
    )
    trainer.fit()
