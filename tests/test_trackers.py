"""`vitsweep run --log mlflow --log wandb`: Ray's own MLflow and W&B callbacks, logging the same
hyperparameters as the trial's TensorBoard session and the same metric names as its scalars. Offline:
MLflow into a local file store under tmp_path (read back with `mlflow.search_runs`), W&B in
``WANDB_MODE=offline`` (read back from its offline run files). No network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_SWEEP_FIXED, write_sweep_yaml
from finetune.errors import ConfigError
from orchestrator.trackers import MLflowCallback, check_loggers, tracked_metrics, trial_hparams

CONFIG = {**TINY_SWEEP_FIXED, "depth": 2, "epochs": 2, "seed": 0,
          "arch": {"variant": "linformer", "_label": "linformer", "rank": 8}}
RESULT = {"epoch": 2, "training_iteration": 2, "val/acc1": 0.5, "val/loss": 1.1, "train/loss": float("nan"),
          "lr": 1e-4, "cost/gflops": 0.7, "memory/peak_allocated_mb": None, "status": "finished", "pid": 123,
          "time_this_iter_s": 1.5, "config": {"lr": 1e-3}, "variant_label": "linformer"}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
    return tmp_path / "mlruns"


def _trial(tmp_path: Path, config, trial_id="t0001"):
    """A Tune `Trial` as the driver holds it (no Ray instance)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name=trial_id)
    return Trial("train_vit", config=config, trial_id=trial_id, storage=storage, stub=True)


def wandb_offline_run(path: Path):
    """(run name, history rows, config) of a W&B offline run's ``run-*.wandb`` record log: a 7-byte
    header (``:W&B``, magic, version), then LevelDB-log records in 32 KiB blocks (crc32, length, type;
    FULL=1, FIRST=2, MIDDLE=3, LAST=4), each record a ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts, name, history, config = 7, b"", None, [], {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(parts)
        parts = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            name = record.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif which == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif which == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return name, history, config


def test_tracked_metrics_are_tensorboards_scalars():
    assert tracked_metrics(RESULT) == {"val/acc1": 0.5, "val/loss": 1.1, "lr": 1e-4, "cost/gflops": 0.7}


def test_mlflow_gets_the_tensorboard_hyperparameters_and_metric_names(tmp_path, mlflow_store):
    import mlflow

    from finetune.config import TrainConfig
    from finetune.train import _flat_hparams
    from trainables.layout import flatten_trial_config

    callback = MLflowCallback(experiment_name="exp")
    callback.setup()
    trial = _trial(tmp_path, CONFIG)
    callback.log_trial_start(trial)
    callback.log_trial_result(2, trial, RESULT)
    callback.log_trial_end(trial)

    (run,) = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    session = _flat_hparams(TrainConfig.from_dict(flatten_trial_config(CONFIG)).to_dict())  # TensorBoard's set
    assert run.data.params == {k: str(v) for k, v in session.items()}
    assert run.data.params["rank"] == "8" and run.data.params["label"] == "linformer k=8"
    assert set(run.data.metrics) == set(tracked_metrics(RESULT))
    assert run.info.run_name == "linformer k=8 seed0" and run.info.status == "FINISHED"
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [2]  # step = epoch
    assert trial_hparams(CONFIG) == session


def test_bad_loggers_are_refused_before_anything_starts(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="--log 'tensorbord': allowed: tensorboard, mlflow, wandb"):
        check_loggers(["tensorbord"])
    assert check_loggers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="WANDB_MODE=offline"):
        check_loggers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check_loggers(["wandb"]) == ["wandb"]


def test_mlflow_store_that_cannot_be_used_is_named(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="--log mlflow: the tracking store 'file:"):
        check_loggers(["mlflow"])


@pytest.mark.slow
def test_sweep_logs_to_tensorboard_mlflow_and_wandb_alike(tmp_path, monkeypatch, capfd, mlflow_store):
    """One tiny sweep (two variants, one epoch): the console, TensorBoard (through its plugin), MLflow
    and W&B all name the same trials, hyperparameters and metrics; the sweep resumes from Python."""
    import mlflow
    import ray

    pytest.importorskip("wandb")
    from test_tensorboard_hparams import read_hparams

    import vitsweep
    from orchestrator.cli_sweep import main as sweep_main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    sweep = write_sweep_yaml(tmp_path, """
        variants: [softmax, {variant: linformer, search: {rank: {grid: [8]}}}]
        """, depth=2, epochs=1, batch_size=10, augment="none", num_workers=0, topk=[1, 2])
    try:
        code = sweep_main(["run", "--config", sweep, "--storage", str(tmp_path / "results"), "--name", "exp",
                           "--num-cpus", "2", "--log", "mlflow,wandb"])
    finally:
        ray.shutdown()
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    exp = tmp_path / "results" / "exp"

    # console: the compact status and table, vitsweep's TensorBoard hint only, no dependency warnings
    assert "softmax seed0" in out and "linformer k=8 seed0" in out and "best: " in out
    assert "Current best trial" not in out and "driver_artifacts" not in out + err
    assert f"tensorboard --logdir {exp}" in out
    table = out[out.index(" # configuration"):out.index("experiment:")]
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "FutureWarning" not in err and "torch.jit.script" not in err

    # TensorBoard: one run per trial, named by label; the HParams rows hold every column and metric
    experiment, groups, scalars = read_hparams(exp)
    runs = sorted(r for r in scalars if r != ".")
    assert len(runs) == 2 and runs[0].startswith("linformer_k=8_seed0_") and runs[1].startswith("softmax_seed0_")
    assert not [t for tags in scalars.values() for t in tags if t.startswith(("ray/", "hparam/"))]
    columns = {h.name for h in experiment.hparam_infos}
    assert {"label", "variant", "seed", "rank", "share_kv"} <= columns
    assert len(groups) == 2 and all(len(g.metric_values) >= 10 for g in groups)
    tb_metrics = set(scalars[runs[0]]) - {"samples/val"}

    # MLflow: the same runs, hyperparameters and metric names
    runs_ml = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert sorted(r.info.run_name for r in runs_ml) == ["linformer k=8 seed0", "softmax seed0"]
    lin = next(r for r in runs_ml if r.info.run_name.startswith("linformer"))
    assert set(lin.data.metrics) == tb_metrics
    lin_group = next(g for g in groups if g.hparams["variant"].string_value == "linformer")
    assert set(lin.data.params) == set(lin_group.hparams)

    # W&B offline runs (wandb >= 0.2x writes offline runs as a record log, files/ come at `wandb sync`):
    # the same run names, metric names and hyperparameters
    offline = {name: (history, config) for name, history, config in
               map(wandb_offline_run, sorted((tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")))}
    assert sorted(offline) == ["linformer k=8 seed0", "softmax seed0"]
    history, config = offline["linformer k=8 seed0"]
    assert {k for k in history[-1] if not k.startswith("_")} == tb_metrics
    assert set(lin.data.params) <= set(config) and config["rank"] == 8

    # the documented way to resume, from Python: a finished sweep runs nothing again
    df_before = vitsweep.load_results(exp)
    try:
        outcome = vitsweep.resume_sweep(exp, num_cpus=2)
    finally:
        ray.shutdown()
    after = vitsweep.load_results(exp)
    assert outcome.num_errors == 0 and list(after["val/acc1"]) == list(df_before["val/acc1"])
