"""Faults injected for real into sweeps on a local Ray instance (2 CPUs), with the real trainable:
a trial worker SIGKILLed mid-epoch, a trial raising, a NaN loss, a CUDA out-of-memory error.

Faults come from `finetune.faults`, plugged in through the loop's callbacks with
``tune.with_parameters(train_vit, callbacks=[...])``; `only_if` picks the trial to fault.
"""

from __future__ import annotations

import json

import pytest
import ray
from ray import tune

from finetune.faults import KillOnce, NaNLossAt, OutOfMemoryAt, RaiseOnce
from orchestrator.sweep import run_sweep
from search_spaces import SweepSpec
from trainables.finetune_trainable import train_vit

pytestmark = pytest.mark.slow

# 64 training images in batches of 16: 4 updates per epoch; a fault at (epoch 1, batch 1) is mid-epoch
# 2, after the epoch-1 checkpoint was reported.
FIXED = {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
         "patch_size": 4, "depth": 2, "num_workers": 0, "augment": "none", "topk": [1, 2],
         "data": "synthetic:classes=4,size=32,n=64,n_val=32", "epochs": 2, "batch_size": 16,
         "warmup_epochs": 0.5, "lr": 1e-3}
COMPARED = ("val/acc1", "val/loss", "train/loss")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def _spec(**values) -> SweepSpec:
    values["fixed"] = {**FIXED, **values.get("fixed", {})}
    return SweepSpec.from_dict(values)


def _checkpoint_epochs(record):
    """The epoch of each checkpoint the trial reported, in order: a trial restarted from scratch
    would report epoch 1 again (three checkpoints: 1, 1, 2; num_to_keep=2 keeps the last two)."""
    epochs = []
    for ckpt in sorted(record.path.glob("checkpoint_*")):
        epochs.append(json.loads((ckpt / "meta.json").read_text())["epoch"])
    return epochs


def test_sigkilled_trial_worker_restarts_from_its_checkpoint_with_identical_metrics(local_ray, tmp_path):
    # Two trials that differ only in log_interval (when the host reads the loss; no effect on numbers).
    marker = tmp_path / "killed.marker"
    kill = KillOnce(marker, epoch=1, batch=1, only_if={"log_interval": 4})
    spec = _spec(search={"log_interval": {"grid": [2, 4]}}, max_failures=1)
    outcome = run_sweep(spec, storage=tmp_path, name="kill", trainable=tune.with_parameters(train_vit, callbacks=[kill]))

    assert marker.is_file(), "the fault never fired"
    assert outcome.num_errors == 0, [r.error for r in outcome.report.records]
    by_interval = {r.config["log_interval"]: r for r in outcome.report.records}
    killed, clean = by_interval[4], by_interval[2]
    assert killed.num_failures == 1 and clean.num_failures == 0
    assert killed.status == clean.status == "finished"
    assert _checkpoint_epochs(killed) == [1, 2], "the restarted trial did not continue from its epoch-1 checkpoint"
    assert [h["epoch"] for h in killed.history] == [1, 2]
    for key in COMPARED:
        assert killed.final[key] == clean.final[key], key
        assert killed.history[0][key] == clean.history[0][key], key


def test_raise_nan_and_oom_in_one_sweep_are_recorded_and_the_others_finish(local_ray, tmp_path):
    faults = [
        RaiseOnce(epoch=1, batch=0, message="injected crash", only_if={"variant": "softmax", "lr": 2e-3}),
        OutOfMemoryAt(epoch=0, batch=1, only_if={"variant": "softmax", "lr": 3e-3}),
        NaNLossAt(epoch=0, batch=1, only_if={"variant": "performer"}),
    ]
    spec = _spec(variants=[{"variant": "softmax", "search": {"lr": {"grid": [1e-3, 2e-3, 3e-3]}}},
                           {"variant": "performer", "fixed": {"features": 16}}])
    outcome = run_sweep(spec, storage=tmp_path, name="faults",
                        trainable=tune.with_parameters(train_vit, callbacks=faults))
    exp = outcome.experiment_dir
    assert outcome.num_errors == 2
    records = {(r.config["variant"], r.config["lr"]): r for r in outcome.report.records}
    ok, crashed, oom = records["softmax", 1e-3], records["softmax", 2e-3], records["softmax", 3e-3]
    nan = records["performer", 1e-3]

    # the healthy trial is unaffected
    assert ok.status == "finished" and [h["epoch"] for h in ok.history] == [1, 2]
    # a crash: errored with its reason, after the epoch it completed
    assert crashed.status.startswith("errored:") and "InjectedFault" in crashed.error
    assert "injected crash (epoch 1, batch 0)" in crashed.error
    assert [h["epoch"] for h in crashed.history] == [1]
    # out of memory: the reason and what to change
    assert oom.status.startswith("errored:") and "TrainingOOMError" in oom.error
    assert "out of device memory with batch_size=16" in oom.error
    # NaN loss: a status, not a crash; reported as zero accuracy, NaN as null
    assert nan.status == "diverged" and nan.error is None
    assert nan.final["status"] == "diverged" and nan.final["val/acc1"] == 0.0 and nan.final["val/loss"] is None
    assert nan.final["nonfinite"] == "train/loss,val/loss"

    md = (exp / "comparison.md").read_text()
    assert "| diverged |" in md and "## Errors" in md
    assert f"`{crashed.trial_id}` (softmax): " in md and "injected crash (epoch 1, batch 0)" in md
    assert f"`{oom.trial_id}` (softmax): " in md and "out of device memory" in md
    # performer's only configuration diverged: it is not marked best; softmax's finished one is
    best = {row.label: row for row in outcome.report.rows if row.best}
    assert set(best) == {"softmax"} and best["softmax"].trials == [ok]
    assert "| **performer** |" not in md
    # nor does Tune rank it best, though it reported val/acc1 for an epoch
    analysis = tune.ExperimentAnalysis(str(exp))
    assert analysis.get_best_trial("val/acc1", "max", scope="last").trial_id == ok.trial_id


def test_raising_trial_with_max_failures_is_retried_from_its_checkpoint(local_ray, tmp_path):
    marker = tmp_path / "raised.marker"
    fault = RaiseOnce(epoch=1, batch=2, marker_path=marker)
    outcome = run_sweep(_spec(max_failures=1), storage=tmp_path, name="retry",
                        trainable=tune.with_parameters(train_vit, callbacks=[fault]))
    assert marker.is_file()
    (record,) = outcome.report.records
    assert outcome.num_errors == 0 and record.status == "finished" and record.num_failures == 1
    assert _checkpoint_epochs(record) == [1, 2], "the retry did not continue from its epoch-1 checkpoint"
    # the report keeps the epoch trained before the failure (Tune's own log of the trial restarts)
    assert [h["epoch"] for h in record.history] == [1, 2]
    assert "| finished |" in (outcome.experiment_dir / "comparison.md").read_text()


def test_reused_actors_keep_every_trials_run_outputs(local_ray, tmp_path):
    """reuse_actors: Ray moves a reused trial's working directory; its weights, TensorBoard events and
    run/result.json must still reach the experiment directory."""
    spec = _spec(fixed={"epochs": 1, "max_train_batches": 1, "max_val_batches": 1},
                 search={"lr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}}, reuse_actors=True, num_to_keep=1)
    outcome = run_sweep(spec, storage=tmp_path, name="reuse")
    assert outcome.num_errors == 0 and len(outcome.report.records) == 4
    for record in outcome.report.records:
        run = record.path / "run"
        assert json.loads((run / "result.json").read_text())["config"]["lr"] == record.config["lr"], record.trial_id
        assert (run / "weights.safetensors").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
