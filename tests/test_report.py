"""The comparison report, rebuilt from synthetic experiment directories (no Ray, no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from orchestrator.cli_sweep import main as sweep_main
from finetune.errors import ReportError
from orchestrator.plots import pareto_front
from orchestrator.report import write_report
from orchestrator.results import collect_trials
from orchestrator.tables import build_rows
from trainables.finetune_trainable import reportable


def _epoch(epoch, acc1, acc5=None, status="running", params=5_400_000, gmacs=0.35, gflops=0.71, ips=100.0):
    return {
        "epoch": epoch, "val/acc1": acc1, "val/acc5": acc5 if acc5 is not None else min(1.0, acc1 + 0.3),
        "train/loss": 1.0, "val/loss": 1.1, "cost/params": params, "cost/gmacs": gmacs, "cost/gflops": gflops,
        "memory/peak_allocated_mb": None, "throughput/train_img_s": ips, "throughput/eval_img_s": 3 * ips,
        "time/epoch_s": 1.0, "lr": 1e-3, "status": status, "training_iteration": epoch,
    }


def make_experiment(root: Path, trials, scheduler="fifo") -> Path:
    """trials: (trial_id, config, tune_status, [epoch rows], error text or None, run status or None)."""
    exp = root / "exp"
    exp.mkdir()
    (exp / "vitsweep_experiment.json").write_text(json.dumps(
        {"format": "vitsweep-experiment", "version": "0", "spec": {"scheduler": scheduler}}))
    data = []
    for trial_id, config, status, rows, error, run_status in trials:
        tdir = exp / f"{trial_id}_dir"
        tdir.mkdir()
        (tdir / "params.json").write_text(json.dumps(config))
        (tdir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if error:
            (tdir / "error.txt").write_text(f"Failure # 1\nTraceback...\n{error}\n")
        if run_status:
            (tdir / "run").mkdir()
            (tdir / "run" / "result.json").write_text(json.dumps({"status": run_status, "history": rows}))
        data.append(_tune_trial_state(exp, trial_id, config, status, tdir.name, error))
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))
    return exp


def _tune_trial_state(exp: Path, trial_id, config, status, dir_name, error):
    """One trial of Tune's experiment state, serialised by Ray's own `Trial` (no Ray instance)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(exp.parent), experiment_dir_name=exp.name, trial_dir_name=dir_name)
    trial = Trial("train_vit", config=config, trial_id=trial_id, storage=storage, stub=True)
    trial.create_placement_group_factory()
    trial.set_status(status)
    trial.run_metadata.num_failures = 1 if error else 0
    trial.run_metadata.error_filename = "error.txt" if error else None
    return list(trial.get_json_state())


def cfg(variant, seed=0, lr=1e-3, epochs=3, **arch):
    return {"model": "vit_tiny_patch16_224", "epochs": epochs, "lr": lr, "seed": seed,
            "arch": {"variant": variant, "_label": variant, **arch}}


@pytest.fixture
def experiment(tmp_path):
    curve = lambda accs, last="finished": [_epoch(i + 1, a, status=last if i == len(accs) - 1 else "running")
                                           for i, a in enumerate(accs)]
    return make_experiment(tmp_path, [
        ("t0", cfg("softmax", seed=0), "TERMINATED", curve([0.3, 0.4, 0.5]), None, "finished"),
        ("t1", cfg("softmax", seed=1), "TERMINATED", curve([0.3, 0.5, 0.7]), None, "finished"),
        ("t2", cfg("linformer", rank=8), "TERMINATED", curve([0.2, 0.3, 0.6]), None, "finished"),
        ("t3", cfg("linformer", rank=16), "TERMINATED", curve([0.1], last="running"), None, None),
        ("t4", cfg("performer", features=16), "ERROR", curve([0.2], last="running"), "RuntimeError: boom", None),
        ("t5", cfg("nystrom", landmarks=8), "TERMINATED",
         [_epoch(1, 0.2), {**_epoch(2, 0.0, acc5=0.0, status="diverged"), "train/loss": None}], None, "diverged"),
    ], scheduler="asha")


def test_rows_group_seeds_and_say_each_status(experiment):
    rows = {(r.label, r.values["config"]): r for r in build_rows(collect_trials(experiment))}
    soft = rows[("softmax", "-")]
    assert len(soft.trials) == 2 and soft.values["seeds"] == "0,1"
    mean, std = soft.values["acc1"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert soft.cell("acc1") == "0.600 ± 0.141"
    assert soft.values["status"] == "finished" and soft.best
    assert soft.cell("peak_mem_mb") == "n/a (CPU)" and soft.cell("params_m") == "5.400"
    assert rows[("linformer", "linformer k=16")].values["status"] == "stopped early (ASHA)"
    assert rows[("linformer", "linformer k=16")].values["epochs"] == "1"
    assert rows[("linformer", "linformer k=8")].best and not rows[("linformer", "linformer k=16")].best
    assert rows[("performer", "performer m=16")].values["status"] == "errored: RuntimeError: boom"
    assert rows[("nystrom", "nystrom m=8")].values["status"] == "diverged"
    assert not rows[("nystrom", "nystrom m=8")].best  # a diverged run is never "best"


def test_write_report_files(experiment):
    report = write_report(experiment)
    md = report.markdown_path.read_text()
    assert "| **softmax** | - | 0,1 | 0.600 ± 0.141 |" in md
    assert "stopped early (ASHA)" in md and "errored: RuntimeError: boom" in md and "diverged" in md
    assert f"tensorboard --logdir {experiment.resolve()}" in md
    assert "peak GPU memory is n/a: the trials ran on CPU" in md
    with report.csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5
    soft = next(r for r in rows if r["variant"] == "softmax")
    assert soft["n_trials"] == "2" and soft["trial_ids"] == "t0 t1" and soft["best"] == "True"
    for name in ("acc_vs_gmacs.png", "acc_vs_peak_memory.png", "throughput.png", "learning_curves.png"):
        data = (experiment / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_command_and_errors(experiment, tmp_path, capsys):
    assert sweep_main(["report", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "softmax (seeds 0,1)" in out and "tensorboard --logdir" in out  # the compact console table
    assert max(len(line) for line in out.splitlines() if not line.startswith(("report:", "experiment:", "tensorboard"))) <= 100
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sweep_main(["report", str(empty)]) == 2
    assert "holds no trials" in capsys.readouterr().err
    with pytest.raises(ReportError, match="is not a directory"):
        collect_trials(tmp_path / "nope")


def test_repeated_epochs_after_a_restore_count_once(tmp_path):
    rows = [_epoch(1, 0.2), _epoch(2, 0.3), _epoch(2, 0.35), _epoch(3, 0.4, status="finished")]
    exp = make_experiment(tmp_path, [("t0", cfg("softmax"), "TERMINATED", rows, None, "finished")])
    (record,) = collect_trials(exp)
    assert [h["epoch"] for h in record.history] == [1, 2, 3]
    assert record.history[1]["val/acc1"] == 0.35 and record.status == "finished"


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.2)]
    assert pareto_front(points) == [4, 0, 1]


def test_non_finite_metrics_are_reported_as_none():
    clean = reportable({"train/loss": float("nan"), "val/loss": float("inf"), "val/acc1": 0.1, "status": "diverged"})
    assert clean["train/loss"] is None and clean["val/loss"] is None and clean["val/acc1"] == 0.1
    assert clean["nonfinite"] == "train/loss,val/loss" and clean["status"] == "diverged"
    json.dumps(clean, allow_nan=False)


def test_empty_config_trials_are_not_vitsweep_trials(tmp_path):
    """Ray's restored grid generator can add a trial with config {}: it runs nothing and is not reported."""
    from trainables.finetune_trainable import train_vit

    assert train_vit({}) is None  # returns before touching Tune's context or building anything


def test_configuration_is_the_variant_label_then_other_varying_keys(tmp_path):
    done = [_epoch(1, 0.5, status="finished")]
    exp = make_experiment(tmp_path, [
        ("t0", cfg("softmax", lr=1e-3, epochs=1), "TERMINATED", done, None, "finished"),
        ("t1", cfg("softmax", lr=2e-3, epochs=1), "TERMINATED", done, None, "finished"),
        ("t2", cfg("atrous_linear", lr=1e-3, epochs=1, dilation=[1, 2, 3], window=3, features=16), "TERMINATED",
         done, None, "finished"),
    ])
    configs = sorted(r.values["config"] for r in build_rows(collect_trials(exp)))
    assert configs == ["atrous_linear dil=1,2,3 w=3 m=16, lr=0.001", "lr=0.001", "lr=0.002"]


def test_a_retried_trial_keeps_the_epochs_tune_rewrote(tmp_path):
    """Tune's log of a retried trial restarts; the run's own result.json still has every epoch."""
    rows = [_epoch(1, 0.2), _epoch(2, 0.3), _epoch(3, 0.4, status="finished")]
    tune_log = [rows[1], {**rows[2], "train/loss": float("nan")}]  # Tune's JSON log may hold NaN
    exp = make_experiment(tmp_path, [("t0", cfg("softmax"), "TERMINATED", tune_log, "RuntimeError: once", None)])
    run = exp / "t0_dir" / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "finished", "history": rows}))
    (record,) = collect_trials(exp)
    assert [h["epoch"] for h in record.history] == [1, 2, 3]
    assert record.history[0]["val/acc1"] == 0.2 and record.history[2]["train/loss"] is None
    assert record.status == "finished" and record.num_failures == 1 and record.error is None


def test_trial_folders_without_tune_state(experiment):
    next(experiment.glob("experiment_state-*.json")).unlink()
    statuses = {r.trial_id: r.status for r in collect_trials(experiment)}
    assert statuses["t0_dir"] == "finished" and statuses["t4_dir"] == "errored: RuntimeError: boom"
    assert statuses["t3_dir"] == "stopped early (ASHA)"  # the folder name is the only trial id there
