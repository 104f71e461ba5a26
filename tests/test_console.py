"""What a researcher sees on the console: short trial labels, a compact status block and final table
within 100 columns, per-epoch lines from `vitsweep train`, strict JSON only on request, no warnings
from dependencies, `--version`, `bench --help`, and Tune configured to write one TensorBoard run per
trial (its own TBX logger off, so neither a second run nor its `tensorboard --logdir` hint)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import TINY_MODEL
from orchestrator.cli import main
from orchestrator.console import SweepReporter
from orchestrator.labels import run_label, safe_name, searched_keys, trial_run_label

ATROUS = {"lr": 5e-4, "seed": 0,
          "arch": {"variant": "atrous_linear", "_label": "atrous_linear", "dilation": [1, 2, 3], "window": 3,
                   "features": 64}}


def _trial(config, status="RUNNING", result=None, trial_id="a1b2c_00000", evaluated=None):
    return SimpleNamespace(config=config, status=status, last_result=result or {}, trial_id=trial_id,
                           evaluated_params=evaluated or {})


def test_labels_name_the_variant_its_hyperparameters_the_searched_keys_and_the_seed():
    assert run_label(ATROUS) == "atrous_linear dil=1,2,3 w=3 m=64 seed0"
    assert run_label({"seed": 1, "arch": {"variant": "softmax", "_label": "softmax"}}) == "softmax seed1"
    trial = _trial(ATROUS, evaluated={"arch": ATROUS["arch"], "lr": 5e-4, "seed": 0, "arch/dilation": [1, 2, 3]})
    assert trial_run_label(trial) == "atrous_linear dil=1,2,3 w=3 m=64 lr=0.0005 seed0"
    assert searched_keys({"_search/arch": "x", "_search/lr": 1e-3, "_search/linformer.rank": 8}) == ["lr"]
    assert safe_name("MyAttention r=4 seed0") == "MyAttention_r=4_seed0"
    assert safe_name("pkg.mod:Cls / x") == "pkg.mod_Cls_x"


def test_trial_directories_are_named_by_label_with_the_trial_id():
    from orchestrator.sweep import trial_dirname

    assert trial_dirname(_trial(ATROUS)) == "atrous_linear_dil=1,2,3_w=3_m=64_seed0_a1b2c_00000"


def test_status_block_is_compact_and_names_the_best_trial():
    reporter = SweepReporter("val/acc1", "max")
    reporter.setup(total_samples=3)
    trials = [
        _trial(ATROUS, "RUNNING", {"epoch": 1, "val/acc1": 0.25, "train/loss": 1.5, "throughput/train_img_s": 80.0}),
        _trial({"seed": 0, "arch": {"variant": "linformer", "_label": "linformer", "rank": 16}}, "TERMINATED",
               {"epoch": 2, "val/acc1": 0.5, "train/loss": 1.2, "throughput/train_img_s": 90.0}, "a1b2c_00001"),
        _trial({"seed": 0, "arch": {"variant": "softmax", "_label": "softmax"}}, "PENDING", trial_id="a1b2c_00002"),
    ]
    text = reporter.render(trials, sys_info=["Logical resource usage: 2.0/2 CPUs, 0/0 GPUs", "Using FIFO"])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "3 trials (1 pending, 1 running, 1 terminated)" in lines[0]
    assert lines[1].startswith("Logical resource usage") and "Using FIFO" not in text
    assert any(line.startswith("linformer k=16 seed0") and "0.5000" in line for line in lines)
    assert lines[-1] == "best: linformer k=16 seed0  val/acc1=0.5000 (epoch 2, trial a1b2c_00001)"
    assert "{" not in text  # no config dict anywhere
    assert reporter.should_report(trials, done=True)


def test_tune_is_configured_for_one_tensorboard_run_per_trial_and_vitsweeps_reporter(monkeypatch):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from orchestrator.sweep import quiet_tune_output
    from orchestrator.trackers import HParamsConfigCallback, tune_callbacks
    from search_spaces import load_sweep

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    quiet_tune_output()
    import os

    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1" and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    callbacks = tune_callbacks(load_sweep("smoke", check_geometry=False), (), "smoke")
    kinds = [type(c) for c in callbacks]
    assert JsonLoggerCallback in kinds and CSVLoggerCallback in kinds and HParamsConfigCallback in kinds
    assert not any(isinstance(c, TBXLoggerCallback) for c in callbacks)


def test_version_and_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("vitsweep 0.")
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("attention", "train", "data", "sweep", "gpu"):
        assert f"  {name} " in out
    assert main(["bench"]) == 2


TRAIN = ["train", "--model", TINY_MODEL["model"], "--no-pretrained", "--img-size", "32", "--patch-size", "4",
         "--depth", "2", "--data", "synthetic:classes=4,size=32,n=32,n_val=16", "--epochs", "2", "--batch-size", "16",
         "--warmup-epochs", "0.5", "--no-progress", "--num-workers", "0", "--topk", "1", "2"]


def test_train_prints_one_line_per_epoch_and_json_only_when_asked(tmp_path, capsys):
    assert main([*TRAIN, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    epochs = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[1].startswith("epoch 2/2  train loss ")
    assert "val acc@1 " in epochs[1] and "img/s" in epochs[1] and " lr " in epochs[1]
    assert "{" not in captured.out and captured.out.startswith("finished: epoch 2  acc@1 ")
    assert main([*TRAIN, "--out", str(tmp_path / "b"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert printed["status"] == "finished" and printed["memory/peak_allocated_mb"] is None


def test_no_dependency_warnings_reach_the_user():
    """fvcore scripts a function with the deprecated torch.jit.script when imported: filtered where
    vitsweep imports it (so also in every Ray worker), by category and module only."""
    code = ("import timm; from finetune.metrics import count_macs_fvcore;"
            "m = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=1, num_classes=2);"
            "print(count_macs_fvcore(m, (32, 32)) > 0)")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_status_is_printed_when_something_changed_not_on_every_tick():
    reporter = SweepReporter(interval_s=0.0)
    trials = [_trial(ATROUS, "RUNNING", {"epoch": 1, "val/acc1": 0.25})]
    assert reporter.should_report(trials)
    reporter.file = open("/dev/null", "w")
    reporter.report(trials, False)
    assert not reporter.should_report(trials)  # nothing changed
    trials[0].last_result = {"epoch": 2, "val/acc1": 0.3}
    assert reporter.should_report(trials)
