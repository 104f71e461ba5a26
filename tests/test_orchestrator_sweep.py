"""End to end on a local Ray instance (2 CPUs): the smoke sweep with the real trainable through
`vitsweep run` (validated once), ASHA stopping weak trials, Optuna's conditional space through the
Tuner, and the report written at the end."""

from __future__ import annotations

import csv
import json

import pytest
import ray

from orchestrator import cli_sweep
from orchestrator.sweep import run_sweep
from search_spaces import SweepSpec, load_sweep

pytestmark = pytest.mark.slow

# The smoke preset, shrunk: 2 transformer blocks, 32 training / 16 validation images, 2 epochs.
TINY = {"data": "synthetic:classes=5,size=32,n=40,n_val=20", "epochs": 2, "batch_size": 20, "depth": 2,
        "warmup_epochs": 0.5}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def fake_trainable_factory():
    """A trainable with the real metric names whose accuracy rises with lr (deterministic ranking)."""

    def fake(config):
        from ray import tune

        from trainables.layout import flatten_trial_config

        flat = flatten_trial_config(config)
        for epoch in range(1, flat["epochs"] + 1):
            acc = min(1.0, flat["lr"] * 100 * epoch)
            tune.report({
                "epoch": epoch, "val/acc1": acc, "val/acc5": acc, "cost/params": 1e6, "cost/gmacs": 0.1,
                "cost/gflops": 0.2, "memory/peak_allocated_mb": None, "throughput/train_img_s": 10.0,
                "status": "finished" if epoch == flat["epochs"] else "running", "variant_label": "softmax",
            })

    return fake


def test_smoke_sweep_trains_every_variant_and_writes_report_and_tensorboard(
    local_ray, tmp_path, monkeypatch, validation_calls
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    outcomes = []

    def keep_outcome(*args, **kwargs):  # a spy: the real run_sweep, its outcome kept for the checks below
        outcomes.append(run_sweep(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(cli_sweep, "run_sweep", keep_outcome)
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    code = cli_sweep.main(["run", "--preset", "smoke", *sets, "--storage", str(tmp_path), "--name", "smoke"])
    # parsed and validated once in the driver (the trials' own checks run in Ray's workers)
    assert validation_calls == {"check_options": 1, "check_config": 5}
    outcome, = outcomes
    assert code == 0
    exp = outcome.experiment_dir
    assert exp == (tmp_path / "smoke").resolve()
    assert outcome.num_errors == 0, [r.error for r in outcome.report.records]

    records = outcome.report.records
    assert sorted(r.config["variant"] for r in records) == ["atrous_linear", "linformer", "nystrom", "performer", "softmax"]
    for record in records:
        assert record.status == "finished"
        assert [h["epoch"] for h in record.history] == [1, 2]
        assert all(h["memory/peak_allocated_mb"] is None for h in record.history)  # CPU
        assert record.final["cost/gmacs"] > 0 and record.final["throughput/train_img_s"] > 0
        run = json.loads((record.path / "run" / "result.json").read_text())
        assert run["status"] == "finished" and run["environment"]["device"] == "cpu"
        assert len(list(record.path.glob("checkpoint_*"))) == 2  # one per epoch, num_to_keep=2
        events = list((record.path / "run" / "tb").glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events in {record.path}"
        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert "val/acc1" in acc.Tags()["scalars"]
        assert [e.step for e in acc.Scalars("val/acc1")] == [1, 2]

    md = (exp / "comparison.md").read_text()
    for variant in ("softmax", "linformer", "performer", "nystrom", "atrous_linear"):
        assert f"| **{variant}** |" in md  # one configuration each, so each is its variant's best
    assert f"tensorboard --logdir {exp}" in md and "n/a (CPU)" in md
    with (exp / "comparison.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 5
    for name in ("acc_vs_gmacs.png", "acc_vs_peak_memory.png", "throughput.png", "learning_curves.png"):
        assert (exp / "plots" / name).stat().st_size > 5000
    marker = json.loads((exp / "vitsweep_experiment.json").read_text())
    assert marker["source"] == "preset:smoke" and marker["spec"]["fixed"]["depth"] == 2 and marker["validated"]


def test_asha_stops_weak_trials_and_the_table_says_so(local_ray, tmp_path):
    resolved = load_sweep({
        "fixed": {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
                  "patch_size": 4, "data": "synthetic:classes=5,size=32,n=40,n_val=20", "epochs": 4},
        "search": {"lr": {"grid": [3e-3, 1e-3, 3e-4, 1e-4]}},  # the best first: later ones fall below the rung cutoff
        "scheduler": "asha", "asha": {"grace_period": 1, "reduction_factor": 2}, "max_concurrent": 1,
    })
    assert resolved.max_epochs == 4 and resolved.make_scheduler()._max_t == 4
    outcome = run_sweep(resolved, storage=tmp_path, name="asha", trainable=fake_trainable_factory())
    by_lr = {r.config["lr"]: r for r in outcome.report.records}
    assert by_lr[3e-3].status == "finished" and by_lr[3e-3].epochs_run == 4
    stopped = [lr for lr, r in by_lr.items() if r.status == "stopped early (ASHA)"]
    assert stopped and all(by_lr[lr].epochs_run < 4 for lr in stopped)
    assert 1e-4 in stopped
    md = (outcome.experiment_dir / "comparison.md").read_text()
    assert "stopped early (ASHA)" in md and "| finished |" in md


def test_optuna_searcher_runs_conditional_trials_through_the_tuner(local_ray, tmp_path):
    spec = SweepSpec.from_dict({  # a SweepSpec (the Python API before load_sweep) is resolved by run_sweep
        "fixed": {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
                  "patch_size": 4, "data": "synthetic:classes=5,size=32,n=40,n_val=20", "epochs": 2},
        "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
        "variants": ["softmax", {"variant": "linformer", "search": {"rank": {"choice": [8, 16]}}}],
        "searcher": "optuna", "num_samples": 6, "max_concurrent": 2,
    })
    outcome = run_sweep(spec, storage=tmp_path, name="optuna", trainable=fake_trainable_factory())
    records = outcome.report.records
    assert len(records) == 6 and all(r.status == "finished" for r in records)
    for r in records:
        assert 1e-4 <= r.config["lr"] <= 1e-2
        assert ("rank" in r.config) == (r.config["variant"] == "linformer")
    # the searcher (with its define-by-run space) was pickled with the experiment, for `vitsweep resume`
    assert list(outcome.experiment_dir.glob("searcher-state-*.pkl"))
