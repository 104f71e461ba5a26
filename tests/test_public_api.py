"""The Python API (`import vitsweep`): results as DataFrames from a directory or a storage URI, the
README's notebook example (run as written), and what the package exports."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

import vitsweep
from finetune.errors import ConfigError
from test_report import _epoch, cfg, make_experiment

README = Path(__file__).resolve().parents[1] / "README.md"


def _curve(accs, last="finished"):
    return [_epoch(i + 1, a, status=last if i == len(accs) - 1 else "running") for i, a in enumerate(accs)]


@pytest.fixture
def experiment(tmp_path):
    return make_experiment(tmp_path, [
        ("t0", cfg("softmax", seed=0), "TERMINATED", _curve([0.3, 0.4, 0.5]), None, "finished"),
        ("t1", cfg("softmax", seed=1), "TERMINATED", _curve([0.3, 0.5, 0.7]), None, "finished"),
        ("t2", cfg("linformer", rank=8), "TERMINATED", _curve([0.2, 0.3, 0.6]), None, "finished"),
        ("t3", cfg("atrous_linear", dilation=[1, 2], window=3), "ERROR", _curve([0.2], last="running"),
         "RuntimeError: boom", None),
    ])


def test_exports():
    from finetune.models import build_vit
    from finetune.weights import load_weight_dict
    from orchestrator.sweep import resume_sweep, run_sweep

    assert vitsweep.__version__ and vitsweep.run_sweep is run_sweep and vitsweep.resume_sweep is resume_sweep
    assert vitsweep.build_vit is build_vit and vitsweep.load_weight_dict is load_weight_dict


def test_one_row_per_trial_with_config_columns_and_final_metrics(experiment):
    df = vitsweep.load_results(experiment)
    assert list(df.columns[:5]) == ["trial_id", "label", "variant", "seed", "status"]
    assert sorted(df["trial_id"]) == ["t0", "t1", "t2", "t3"]
    by_id = df.set_index("trial_id")
    assert by_id.loc["t2", "label"] == "linformer k=8" and by_id.loc["t2", "rank"] == 8
    assert by_id.loc["t3", "dilation"] == (1, 2) and by_id.loc["t3", "status"] == "errored: RuntimeError: boom"
    assert by_id.loc["t1", "val/acc1"] == 0.7 and by_id.loc["t1", "seed"] == 1 and by_id.loc["t1", "epoch"] == 3
    assert by_id.loc["t1", "lr"] == 1e-3 and by_id.loc["t1", "lr_schedule"] == 1e-3
    assert math.isnan(by_id.loc["t0", "memory/peak_allocated_mb"])  # not measured on CPU: missing, not 0
    assert by_id["error"].notna().sum() == 1
    per_variant = df.groupby("variant")["val/acc1"].mean()
    assert per_variant["softmax"] == pytest.approx(0.6)


def test_history_has_one_row_per_trial_and_epoch(experiment):
    curves = vitsweep.load_results(experiment, history=True)
    assert len(curves) == 3 + 3 + 3 + 1
    softmax = curves[curves["trial_id"] == "t1"]
    assert list(softmax["epoch"]) == [1, 2, 3] and list(softmax["val/acc1"]) == [0.3, 0.5, 0.7]


def test_the_readme_example_runs_as_written(experiment, tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- results-example:start -->\n```python\n(.*?)```\n<!-- results-example:end -->", text, re.S)
    assert block, "the README's results example is missing"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"ray_results/smoke"', repr(str(experiment))), "README.md", "exec"), {})
    assert (tmp_path / "acc_vs_gflops.png").stat().st_size > 5000
    assert (tmp_path / "learning_curves.png").stat().st_size > 5000


def test_resume_from_python_refuses_what_is_not_an_experiment(tmp_path):
    with pytest.raises(ConfigError, match="not a vitsweep experiment|does not exist|not a directory"):
        vitsweep.resume_sweep(tmp_path)


from fixtures_s3 import moto_server, s3_bucket  # noqa: E402,F401  (pytest fixtures)


def test_results_from_a_storage_uri_equal_the_local_ones(experiment, s3_bucket):
    from orchestrator.storage import resolve_storage

    local = vitsweep.load_results(experiment)
    uri = s3_bucket.uri("results/exp")
    resolve_storage(uri).upload_dir(experiment, "")
    shutil.rmtree(experiment)  # only the bucket holds it now
    remote = vitsweep.load_results(uri)
    columns = [c for c in local.columns if c not in ("path", "weights")]
    pd.testing.assert_frame_equal(remote[columns], local[columns])
    assert len(vitsweep.load_results(uri, history=True)) == 10
