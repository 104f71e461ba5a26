"""The Ray Tune function trainable: a trial config -> `finetune.train.run_training`, one
``tune.report(metrics, checkpoint=...)`` per epoch, resumed from ``tune.get_checkpoint()``.

Everything Ray-specific lives here, as a `Callback`; the training loop never sees Ray. Data is built
inside the trial (nothing large travels through the object store). Each trial writes its run outputs
(result.json, weights, preprocessing.json, TensorBoard events under tb/) to ``<trial dir>/run/`` — a
subdirectory, because Tune itself writes ``result.json`` (its JSON-lines log) in the trial directory.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any, Dict, Sequence

from ray import tune

from finetune.callbacks import Callback, TrainState
from finetune.checkpoint import save_checkpoint
from finetune.config import TrainConfig
from finetune.train import release_device_memory, run_training

from .layout import ARCH_KEY, LABEL_KEY, RUN_SUBDIR, flatten_trial_config


def reportable(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Metrics Tune can store and compare: non-finite floats become None and are listed under
    ``nonfinite`` (a NaN loss must not reach a scheduler's comparison or a checkpoint ranking)."""
    clean: Dict[str, Any] = {}
    nonfinite = []
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            nonfinite.append(key)
        else:
            clean[key] = value
    if nonfinite:
        clean["nonfinite"] = ",".join(sorted(nonfinite))
    return clean


class TuneReportCallback(Callback):
    """After every epoch: write a training checkpoint to a temp dir and report it with the metrics."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.reports = 0

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        self.reports += 1
        metrics = {**reportable(metrics), "variant_label": self.label}
        if metrics.get("status") == "diverged":
            # A diverged model is not worth restoring; the loop stops after this epoch.
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="vitsweep-ckpt-") as directory:
            save_checkpoint(state, directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def train_vit(config: Dict[str, Any], callbacks: Sequence[Callback] = ()) -> None:
    """Ray Tune function trainable for one configuration (layout: `trainables.layout`).

    `callbacks` run after Tune's reporter, e.g. fault injection from `finetune.faults`; pass them with
    ``tune.with_parameters(train_vit, callbacks=[...])``.
    """
    if not config:
        # Not a vitsweep trial: Ray 2.60's restored grid generator can add one trial with an empty
        # config when the driver was killed mid-save (seen under `vitsweep resume`). Every vitsweep
        # trial carries at least its `arch` block; run nothing, and the report skips it.
        return
    cfg = TrainConfig.from_dict(flatten_trial_config(config))
    label = (config.get(ARCH_KEY) or {}).get(LABEL_KEY) or cfg.variant
    out_dir = os.path.join(tune.get_context().get_trial_dir(), RUN_SUBDIR)
    checkpoint = tune.get_checkpoint()
    restore_dir = None
    try:
        if checkpoint is not None:
            restore_dir = tempfile.mkdtemp(prefix="vitsweep-restore-")
            checkpoint.to_directory(restore_dir)
        reporter = TuneReportCallback(label)
        result = run_training(
            cfg,
            out_dir,
            callbacks=[reporter, *callbacks],
            resume_from=restore_dir,
            progress=False,
            local_checkpoints=False,
        )
        if reporter.reports == 0 and result.get("metrics"):
            # Restored from the final epoch's checkpoint (the driver died after the last report but
            # before the trial was marked done): nothing left to train, but Tune needs a result to
            # complete the trial, otherwise its searcher keeps the trial's slot and stalls the sweep.
            tune.report({**reportable(result["metrics"]), "variant_label": label})
    finally:
        if restore_dir is not None:
            shutil.rmtree(restore_dir, ignore_errors=True)
        # Return cached GPU memory before the next trial (a reused actor) or before the actor goes.
        release_device_memory()
