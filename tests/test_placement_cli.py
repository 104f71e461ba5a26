"""`vitsweep run ... --num-gpus 1 --gpus-per-trial 1` on a machine without CUDA: Ray is told it has a GPU
(a logical one), every trial is assigned it, none trains on the CPU, and the output says CUDA is missing.
A real `vitsweep` process with its own local Ray instance (gone when the process ends)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import write_sweep_yaml

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_with_a_gpu_per_trial_and_no_cuda_trains_nothing_on_the_cpu(tmp_path):
    sweep = write_sweep_yaml(tmp_path, "search:\n  lr: {grid: [0.001, 0.002]}\nmax_failures: 0\n",
                             epochs=1, batch_size=20, depth=1, warmup_epochs=0.0)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", sweep, "--storage", str(tmp_path / "results"),
         "--name", "nocuda", "--num-cpus", "2", "--num-gpus", "1", "--gpus-per-trial", "1"],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # trials errored; the sweep itself ran to its report
    printed_errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert len(printed_errors) == 2 and all("CUDA is missing" in line for line in printed_errors), proc.stdout
    assert "CUDA_VISIBLE_DEVICES=" in printed_errors[0]
    exp = tmp_path / "results" / "nocuda"
    assert not list(exp.glob("*/run/result.json"))  # no trial finished, on the CPU or anywhere
    assert "CUDA is missing" in (exp / "comparison.md").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_train_on_cuda_n_makes_it_the_current_device(tmp_path, tiny_config):
    from finetune.config import TrainConfig
    from finetune.train import run_training

    index = torch.cuda.device_count() - 1
    run_training(TrainConfig.from_dict({**tiny_config, "epochs": 1, "device": f"cuda:{index}"}), progress=False)
    assert torch.cuda.current_device() == index
