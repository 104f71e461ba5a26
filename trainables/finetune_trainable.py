"""The Ray Tune function trainable: a trial config -> `finetune.train.run_training`, one
``tune.report(metrics, checkpoint=...)`` per epoch, resumed from ``tune.get_checkpoint()``.

Everything Ray-specific lives here, as a `Callback`; the training loop never sees Ray. Data is built
inside the trial (nothing large travels through the object store). Each trial writes its run outputs
(result.json, weights, preprocessing.json, TensorBoard events under tb/) to ``<trial dir>/run/`` — a
subdirectory, because Tune itself writes ``result.json`` (its JSON-lines log) in the trial directory.
At the end the trainable uploads ``run/`` itself, synchronously, to the trial's directory in the sweep's
storage (Tune's storage context: the same filesystem as the experiment). Tune's artifact sync also
uploads it with each checkpoint, but that sync is asynchronous and its final round can be lost when the
actor is reused (seen with S3 and ``reuse_actors``).

The last epoch's report (metrics and checkpoint) is sent after the run's outputs are written locally
(weights and sidecar, result.json, the TensorBoard session end), not before: that work is then inside
the trial's last step (Tune's ``time_total_s``). If it fails, the trial fails and (with
``max_failures``) is retried from the previous epoch's checkpoint. The upload of ``run/`` stays after the
report, so ``run/result.json`` in storage still means the final result and checkpoint were reported. A
trial restored from its final checkpoint (the driver died between the last report and the trial's end)
trains nothing, writes its outputs again and reports the final metrics once more, so that Tune
completes it.

Node identity: every checkpoint holds ``nodes.json``, the Ray nodes (id and IP) the trial has run on, in
order; a restored trial reads it back and appends its current node, and run/result.json records the
list (``nodes``) and the last one (``node``). A data set missing on the trial's node fails the trial
with that node named, and so does a GPU Ray assigned that CUDA cannot see (`check_placement`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray
from ray import tune

from finetune.callbacks import Callback, TrainState
from finetune.checkpoint import save_checkpoint
from finetune.config import TrainConfig
from finetune.errors import ConfigError, DataError
from finetune.io_utils import copy_tree_atomically
from finetune.train import release_device_memory, run_training

from . import ray_metrics
from .layout import ARCH_KEY, DDP_KEY, LABEL_KEY, RUN_SUBDIR, flatten_trial_config

_logger = logging.getLogger(__name__)


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


NODES_FILE = "nodes.json"


def current_node() -> Dict[str, str]:
    """The Ray node this process runs on: id and IP."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def read_nodes(checkpoint_dir: Optional[str]) -> List[Dict[str, str]]:
    """The nodes recorded in a checkpoint (none in one written before node identity was recorded)."""
    path = os.path.join(checkpoint_dir, NODES_FILE) if checkpoint_dir else None
    if path is None or not os.path.isfile(path):
        return []
    with open(path) as fh:
        nodes = json.load(fh)
    return [dict(node_id=str(n["node_id"]), node_ip=str(n["node_ip"])) for n in nodes]


FINAL_FILES = ("weights.safetensors", "weights.json", "result.json")


def persist_run_outputs(out_dir: str) -> None:
    """Copy the finished run's outputs to ``<trial dir in storage>/run``, before the trial returns."""
    import pyarrow.fs as pafs

    storage = tune.get_context().get_storage()
    dest = f"{storage.trial_fs_path}/{RUN_SUBDIR}"
    fs = storage.storage_filesystem
    if isinstance(fs, pafs.LocalFileSystem) and os.path.realpath(dest) == os.path.realpath(out_dir):
        return  # already there
    if not isinstance(fs, pafs.LocalFileSystem):  # an object store writes each object whole
        pafs.copy_files(out_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    # A local disk: Ray's artifact sync copies in place (a full disk leaves truncated files under the
    # real names). Wait for its sync in flight, copy each file beside and rename it, result.json last,
    # then drop the local copies of the final files so Ray's last sync (after the trial returns) does
    # not write them again.
    syncer = getattr(storage, "syncer", None)
    if syncer is not None:
        try:
            syncer.wait()
        except Exception as err:  # that sync failed (a full disk): the copy below puts every file in place
            _logger.warning("Ray's artifact sync of %s failed: %s", out_dir, err)
    copy_tree_atomically(out_dir, dest)
    for name in FINAL_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, name))


def _on_node(err: Exception, node: Dict[str, str]) -> Exception:
    """`err` (the same class) with the node named: which machine lacks the data."""
    return type(err)(f"{err} (on Ray node {node['node_ip']}, node id {node['node_id']})")


def check_placement(cfg: TrainConfig, node: Dict[str, str]) -> None:
    """A trial Ray gave a GPU must see one: otherwise (a CPU-only torch wheel, a driver mismatch on one
    node) ``device: auto`` would train on the CPU and report the CPU's img/s in the GPU column. Only an
    explicit ``device: cpu`` trains on the CPU then."""
    import torch

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids or cfg.device == "cpu" or torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(
        f"CUDA is missing: Ray assigned GPU {', '.join(str(g) for g in gpu_ids)} to this trial on node "
        f"{node['node_ip']} (CUDA_VISIBLE_DEVICES={visible!r}, node id {node['node_id']}) but torch "
        f"{torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device there, and device={cfg.device!r} "
        "would train on the CPU. Install a CUDA build of torch and a matching driver on that node, or set "
        "device: cpu to train on the CPU on purpose"
    )


def trial_config(config: Dict[str, Any]) -> Tuple[TrainConfig, str]:
    """The trial's TrainConfig and its label (the variant block's, else the variant's name)."""
    cfg = TrainConfig.from_dict(flatten_trial_config(config))
    return cfg, (config.get(ARCH_KEY) or {}).get(LABEL_KEY) or cfg.variant


def restore_to_temp(checkpoint) -> Optional[str]:
    """A temporary local copy of Ray's `checkpoint` to resume from (None: start afresh); the caller
    removes it."""
    if checkpoint is None:
        return None
    restore_dir = tempfile.mkdtemp(prefix="vitsweep-restore-")
    checkpoint.to_directory(restore_dir)
    return restore_dir


FINAL_STATUSES = ("finished", "diverged")


class TuneReportCallback(Callback):
    """After every epoch: write a training checkpoint (with the trial's nodes) to a temp dir and report
    it with the metrics.

    With ``defer_final=True`` the last epoch's report (status ``finished`` or ``diverged``) is held back
    instead: `train_vit` sends it with `report_final` once the run's outputs are written locally, so
    that the trial's end-of-run writes (weights and sidecar, result.json, TensorBoard) are inside its
    last reported step (Tune's ``time_total_s``) rather than in the gap before the next trial.
    """

    def __init__(self, label: str, nodes: Optional[List[Dict[str, str]]] = None, *, defer_final: bool = False) -> None:
        self.label = label
        self.nodes = list(nodes or [])
        self.reports = 0
        self.defer_final = defer_final
        self.pending: Optional[Dict[str, Any]] = None  # the held-back final report: metrics, checkpoint dir
        self.publishes = True  # Ray gauges and the log prefix: one process per trial (rank 0 of a DDP trial)

    def on_fit_start(self, state: TrainState) -> None:
        if self.publishes:
            ray_metrics.announce_trial(self.label, state)  # the worker's log lines carry the trial's label

    def on_train_batch_end(self, state: TrainState, batch_idx: int) -> None:
        if self.publishes:
            ray_metrics.publish_step(self.label, state)  # the running loss as a Ray gauge; no host sync

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        self.reports += 1
        if self.publishes:
            ray_metrics.publish_epoch(self.label, state, metrics)  # live Ray gauges (trainables.ray_metrics)
        metrics = {**reportable(metrics), "variant_label": self.label}
        final = self.defer_final and metrics.get("status") in FINAL_STATUSES
        if metrics.get("status") == "diverged":
            # A diverged model is not worth restoring; the loop stops after this epoch.
            if final:
                self.pending = {"metrics": metrics, "checkpoint": None}
            else:
                self._report(metrics, None)
            return
        if final:
            directory = tempfile.mkdtemp(prefix="vitsweep-ckpt-")
            self.pending = {"metrics": metrics, "checkpoint": directory}
            self._write_checkpoint(state, directory)
            return
        with tempfile.TemporaryDirectory(prefix="vitsweep-ckpt-") as directory:
            self._write_checkpoint(state, directory)
            self._report(metrics, directory)

    def _report(self, metrics: Dict[str, Any], directory: Optional[str]) -> None:
        """One report to Tune (`trainables.distributed` overrides it with Ray Train's report)."""
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    def _write_checkpoint(self, state: TrainState, directory: str) -> None:
        save_checkpoint(state, directory)
        with open(os.path.join(directory, NODES_FILE), "w") as fh:
            json.dump(self.nodes, fh)

    def report_final(self) -> bool:
        """Send the held-back final report (False: none was held)."""
        if self.pending is None:
            return False
        pending, self.pending = self.pending, None
        try:
            self._report(pending["metrics"], pending["checkpoint"])
        finally:
            if pending["checkpoint"]:
                shutil.rmtree(pending["checkpoint"], ignore_errors=True)
        return True

    def discard(self) -> None:
        """Drop a held-back report whose run failed after the last epoch (its checkpoint dir too)."""
        if self.pending is not None and self.pending["checkpoint"]:
            shutil.rmtree(self.pending["checkpoint"], ignore_errors=True)
        self.pending = None


def train_vit(config: Dict[str, Any], callbacks: Sequence[Callback] = ()) -> None:
    """Ray Tune function trainable for one configuration (layout: `trainables.layout`).

    `callbacks` run after Tune's reporter, e.g. fault injection from `finetune.faults`; pass them with
    ``tune.with_parameters(train_vit, callbacks=[...])``.
    """
    if (config.get(DDP_KEY) or {}).get("workers", 1) > 1:
        raise ConfigError("this trial is data-parallel (resources.workers > 1): its trainable is "
                          "trainables.distributed.train_vit_ddp, not train_vit")
    if not config:
        # Not a vitsweep trial: Ray 2.60's restored grid generator can add one trial with an empty
        # config when the driver was killed mid-save (seen under `vitsweep resume`). Every vitsweep
        # trial carries at least its `arch` block; run nothing, and the report skips it.
        return
    cfg, label = trial_config(config)
    out_dir = os.path.join(tune.get_context().get_trial_dir(), RUN_SUBDIR)
    restore_dir = None
    reporter: Optional[TuneReportCallback] = None
    try:
        restore_dir = restore_to_temp(tune.get_checkpoint())
        node = current_node()
        check_placement(cfg, node)
        nodes = [*read_nodes(restore_dir), node]
        reporter = TuneReportCallback(label, nodes, defer_final=True)
        try:
            result = run_training(
                cfg,
                out_dir,
                callbacks=[reporter, *callbacks],
                resume_from=restore_dir,
                progress=False,
                local_checkpoints=False,
                extra_result={"node": node, "nodes": nodes},
            )
        except (DataError, ConfigError) as err:
            # The data is read on this node: a path or hub cache missing here is this node's problem.
            raise _on_node(err, node) from err
        # The final report goes out after the local writes, before the upload: run/result.json in storage
        # still means the trial's final result and checkpoint were reported (a resume, and the report,
        # rely on it); a driver stopped in between resumes the trial from its final checkpoint.
        if not reporter.report_final() and reporter.reports == 0 and result.get("metrics"):
            # Restored from the final epoch's checkpoint (the driver died after the last report but
            # before the trial was marked done): nothing left to train, but Tune needs a result to
            # complete the trial, otherwise its searcher keeps the trial's slot and stalls the sweep.
            tune.report({**reportable(result["metrics"]), "variant_label": label})
        persist_run_outputs(out_dir)
    finally:
        if reporter is not None:
            reporter.discard()
        if restore_dir is not None:
            shutil.rmtree(restore_dir, ignore_errors=True)
        # Return cached GPU memory before the next trial (a reused actor) or before the actor goes.
        release_device_memory()
