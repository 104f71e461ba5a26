"""Data-parallel trials on a local Ray instance (2 CPUs, gloo): `--workers-per-trial 2` runs each trial as
a Ray Train `TorchTrainer` of 2 DDP workers inside Tune (`trainables.distributed`).

- a 2-worker sweep finishes every trial, and each trial's run/result.json says world_size 2;
- one worker's process SIGKILLed mid-epoch 2 (a real ``os.kill``; its PID is in the marker it writes):
  Ray Train restarts the worker group from the epoch-1 checkpoint and every epoch is reported once.
"""

from __future__ import annotations

import json

import pytest
import ray
from ray import tune

from finetune.faults import KillOnce
from orchestrator.sweep import run_sweep
from search_spaces import SweepSpec
from trainables.distributed import train_vit_ddp

pytestmark = pytest.mark.slow

# 64 training images, global batch 16 (8 per worker): 4 updates per epoch.
FIXED = {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 16,
         "patch_size": 4, "depth": 2, "num_workers": 0, "augment": "none", "topk": [1, 2],
         "data": "synthetic:classes=4,size=16,n=64,n_val=32", "epochs": 2, "batch_size": 16,
         "warmup_epochs": 0.5, "lr": 1e-3}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def _spec(**values) -> SweepSpec:
    values["fixed"] = {**FIXED, **values.get("fixed", {})}
    values.setdefault("resources", {"cpu": 1, "gpu": 0, "workers": 2})
    return SweepSpec.from_dict(values)


def _run_result(record):
    return json.loads((record.path / "run" / "result.json").read_text())


def test_two_worker_sweep_finishes_every_trial_with_world_size_2(local_ray, tmp_path):
    spec = _spec(search={"lr": {"grid": [1e-3, 2e-3]}})
    outcome = run_sweep(spec, storage=tmp_path, name="ddp")
    assert outcome.num_errors == 0, [r.error for r in outcome.report.records]
    assert len(outcome.report.records) == 2
    for record in outcome.report.records:
        assert record.status == "finished"
        assert [h["epoch"] for h in record.history] == [1, 2]
        result = _run_result(record)
        assert result["environment"]["world_size"] == 2 and result["environment"]["backend"] == "gloo"
        assert len(result["environment"]["memory_per_rank"]) == 2
        assert result["config"]["lr"] == record.config["lr"]
        assert (record.path / "run" / "weights.safetensors").is_file()
        # Ray Train kept the checkpoints rank 0 reported, under the trial's ddp/ run
        assert list((record.path / "ddp").glob("checkpoint_*/meta.json"))
    assert "| finished |" in (outcome.experiment_dir / "comparison.md").read_text()


def test_a_sigkilled_worker_restarts_the_trial_from_its_checkpoint_each_epoch_reported_once(local_ray, tmp_path):
    marker = tmp_path / "killed.marker"
    # mid-epoch 2, once Ray Train's controller has registered the epoch-1 checkpoint (its run snapshot);
    # killed earlier, within its polling interval, the epoch-1 report is lost and the restart begins
    # from scratch (each epoch still reaches Tune once)
    kill = KillOnce(marker, epoch=1, batch=1,
                    wait_for_glob=str(tmp_path / "ddpkill" / "*" / "ddp" / "checkpoint_manager_snapshot.json"))
    spec = _spec(max_failures=1)
    outcome = run_sweep(spec, storage=tmp_path, name="ddpkill",
                        trainable=tune.with_parameters(train_vit_ddp, callbacks=[kill]))
    assert marker.is_file(), "the fault never fired"
    assert "pid=" in marker.read_text()
    assert outcome.num_errors == 0, [r.error for r in outcome.report.records]
    (record,) = outcome.report.records
    assert record.status == "finished"
    # every epoch reported to Tune exactly once: the restarted workers continued from epoch 1's checkpoint
    assert [h["epoch"] for h in record.history] == [1, 2]
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in (record.path / "ddp").glob("checkpoint_*/meta.json"))
    assert epochs == [1, 2]
    assert _run_result(record)["environment"]["world_size"] == 2
