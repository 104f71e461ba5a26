"""Every bad input to `vitsweep run/resume` is refused before Ray starts, naming the value."""

from __future__ import annotations

import pytest
import ray
from conftest import write_sweep_yaml

from orchestrator.cli_sweep import main as sweep_main


def _yaml(tmp_path, body: str):
    return write_sweep_yaml(tmp_path, body, epochs=2)


def _refused(capsys, argv, *fragments):
    assert not ray.is_initialized()
    code = sweep_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, err
    assert not ray.is_initialized(), "Ray was started before the input was validated"


def test_unknown_preset(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "imagenet1000", "--storage", str(tmp_path)],
             "unknown preset 'imagenet1000'", "did you mean 'imagenet100'")


def test_unknown_config_key(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "smoke", "--set", "weight_decy=0.1", "--storage", str(tmp_path)],
             "'weight_decy'", "did you mean 'weight_decay'")
    _refused(capsys, ["run", "--config", _yaml(tmp_path, "search: {wieght_decay: {grid: [0.1]}}\n")],
             "'wieght_decay'", "did you mean 'weight_decay'")


def test_unknown_variant(capsys, tmp_path):
    _refused(capsys, ["run", "--config", _yaml(tmp_path, "variants: [softmax, nystroem]\n")],
             "'nystroem'", "did you mean 'nystrom'")


def test_reversed_range(capsys, tmp_path):
    _refused(capsys, ["run", "--config", _yaml(tmp_path, "search: {lr: {loguniform: [0.01, 0.0001]}}\n")],
             "search['lr']", "bounds are reversed", "low=0.01")


def test_variant_range_outside_the_geometry(capsys, tmp_path):
    body = "variants: [{variant: linformer, search: {rank: {randint: [16, 80]}}}]\n"
    _refused(capsys, ["run", "--config", _yaml(tmp_path, body)], "rank=80", "65 tokens")
    body = "variants: [{variant: atrous_linear, fixed: {window: 3}, search: {dilation: {grid: [[1, 2], [4, 5]]}}}]\n"
    _refused(capsys, ["run", "--config", _yaml(tmp_path, body)], "dilation=[4, 5]")


def test_run_validates_the_sweep_once_before_refusing_it(capsys, tmp_path, validation_calls):
    # the local resources are checked last: everything else was validated by then, and only once
    _refused(capsys, ["run", "--preset", "smoke", "--set", "epochs=3", "--num-samples", "2", "--gpus-per-trial", "1",
                      "--num-gpus", "0", "--storage", str(tmp_path)], "gpus per trial=1")
    assert validation_calls == {"check_options": 1, "check_config": 5}  # one geometry per smoke variant


def test_more_gpus_per_trial_than_the_cluster_has(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "smoke", "--gpus-per-trial", "1", "--num-gpus", "0", "--storage", str(tmp_path)],
             "gpus per trial=1", "cluster has 0 GPU")
    # above 1: refused whatever the cluster has, pointing to data-parallel workers (docs/distributed.md)
    _refused(capsys, ["run", "--preset", "smoke", "--gpus-per-trial", "2", "--num-gpus", "1", "--storage", str(tmp_path)],
             "gpus per trial=2", "--workers-per-trial 2 --gpus-per-trial 1")


def test_bad_sweep_options(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "smoke", "--num-samples", "0"], "num_samples=0")
    _refused(capsys, ["run", "--preset", "smoke", "--max-concurrent", "0"], "max_concurrent=0")
    _refused(capsys, ["run", "--preset", "smoke", "--set", "epochs"], "--set 'epochs'", "KEY=VALUE")
    with pytest.raises(SystemExit):
        sweep_main(["run", "--preset", "smoke", "--scheduler", "hyperband"])
    with pytest.raises(SystemExit):
        sweep_main(["run", "--preset", "smoke", "--config", "x.yaml"])


def test_resume_refuses_a_directory_that_is_not_a_vitsweep_experiment(capsys, tmp_path):
    _refused(capsys, ["resume", str(tmp_path)], "is not a vitsweep experiment", "vitsweep_experiment.json")
    _refused(capsys, ["resume", str(tmp_path / "missing")], "is not a directory")
