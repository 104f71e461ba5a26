"""Data-parallel training without Ray (torchrun, gloo on this CPU) and the input it refuses.

- `DistributedEpochSampler`: the workers' i-th batches together are the single process's i-th batch.
- ``torchrun --standalone --nproc-per-node 2 -m vitsweep train`` equals ``python -m vitsweep train``
  (same global batch and seed) within TOLERANCE, and its result.json says world_size 2;
- a checkpoint resumes under another worker count: 2 workers continue a 1-process run exactly as 1 does;
- `vitsweep run` refuses, before Ray starts, more workers than the machine can place, gpus per trial
  above 1, and a global batch the workers cannot split.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from finetune.data.loaders import SEED_STRIDE, EpochSampler
from finetune.distributed import DistributedEpochSampler
from orchestrator.cli_sweep import main as sweep_main

# float32 sums in another order (two half-batch gradients averaged by DDP, metrics summed over shards):
# measured differences are ~1e-7; accuracies (counts over the whole validation set) must be equal.
TOLERANCE = 1e-4
ARGS = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "16", "--patch-size", "4",
        "--depth", "2", "--augment", "none", "--data", "synthetic:classes=10,size=16,n=96,n_val=40",
        "--batch-size", "16", "--device", "cpu", "--no-progress", "--json"]


def test_worker_batches_together_are_the_single_process_batch():
    n, batch, world, seed = 103, 16, 4, 7 * SEED_STRIDE
    for epoch in (0, 3):
        single = EpochSampler(n, seed)
        single.set_epoch(epoch)
        order = list(single)
        shards = []
        for rank in range(world):
            sampler = DistributedEpochSampler(n, seed, rank, world)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert {len(s) for s in shards} == {n // world}
        local = batch // world
        for i in range(n // batch):
            together = sorted(x for s in shards for x in s[i * local:(i + 1) * local])
            assert together == sorted(order[i * batch:(i + 1) * batch]), (epoch, i)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(out: Path, workers: int, *extra: str) -> dict:
    if workers == 1:
        cmd = [sys.executable, "-m", "vitsweep"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "-m", "vitsweep"]
    proc = subprocess.run([*cmd, *ARGS, "--out", str(out), *extra], env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def _assert_same(a: dict, b: dict) -> None:
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("train/loss", "val/loss"):
            assert abs(ha[key] - hb[key]) <= TOLERANCE, (key, ha[key], hb[key])
        for key in ("val/acc1", "val/acc5"):
            assert ha[key] == hb[key], (key, ha[key], hb[key])


@pytest.mark.slow
def test_torchrun_two_workers_equal_one_process_and_resume_across_worker_counts(tmp_path):
    one = _train(tmp_path / "one", 1, "--epochs", "2")
    two = _train(tmp_path / "two", 2, "--epochs", "2")
    assert one["environment"]["world_size"] == 1
    assert two["environment"]["world_size"] == 2 and two["environment"]["backend"] == "gloo"
    assert len(two["environment"]["memory_per_rank"]) == 2
    assert two["metrics"]["cost/params"] == one["metrics"]["cost/params"]
    assert two["metrics"]["cost/gflops"] == one["metrics"]["cost/gflops"]  # per model, not per worker
    _assert_same(one, two)
    # rank 0 alone wrote: one result, one set of weights, one TensorBoard run
    assert len(list((tmp_path / "two" / "tb").glob("events.out.tfevents.*"))) == 1

    # the 1-process run's checkpoint, continued for one more epoch by 1 and by 2 workers
    shutil.copytree(tmp_path / "one", tmp_path / "one_more")
    shutil.copytree(tmp_path / "one", tmp_path / "two_more")
    by_one = _train(tmp_path / "one_more", 1, "--epochs", "3", "--resume")
    by_two = _train(tmp_path / "two_more", 2, "--epochs", "3", "--resume")
    assert by_two["environment"]["world_size"] == 2 and [h["epoch"] for h in by_two["history"]] == [1, 2, 3]
    _assert_same(by_one, by_two)


def _refused(capsys, argv, *fragments):
    assert not ray.is_initialized()
    code = sweep_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not ray.is_initialized(), "Ray was started before the input was validated"


def test_more_workers_than_the_machine_can_place_are_refused_before_any_trial(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "smoke", "--workers-per-trial", "4", "--num-cpus", "2",
                      "--storage", str(tmp_path)],
             "4 workers per trial", "= 4 CPU(s)", "cluster has 2 CPU(s)")
    _refused(capsys, ["run", "--preset", "smoke", "--workers-per-trial", "2", "--gpus-per-trial", "1",
                      "--num-gpus", "1", "--num-cpus", "4", "--storage", str(tmp_path)],
             "2 workers per trial", "2 GPU(s)", "cluster has 4 CPU(s), 1 GPU(s)")


def test_gpus_per_trial_above_one_points_to_workers_per_trial(capsys, tmp_path):
    _refused(capsys, ["run", "--preset", "smoke", "--gpus-per-trial", "4", "--num-gpus", "4",
                      "--storage", str(tmp_path)],
             "gpus per trial=4", "--workers-per-trial 4 --gpus-per-trial 1")


def test_bad_worker_counts_and_an_indivisible_global_batch_are_refused(capsys, tmp_path):
    for bad in ("0", "-2", "5000"):
        _refused(capsys, ["run", "--preset", "smoke", "--workers-per-trial", bad, "--storage", str(tmp_path)],
                 f"workers per trial={int(bad)}", "1..1024")
    _refused(capsys, ["run", "--preset", "smoke", "--workers-per-trial", "2", "--set", "batch_size=15",
                      "--num-cpus", "2", "--storage", str(tmp_path)],
             "batch_size=15 is the global batch", "divisible by the 2 workers")
    _refused(capsys, ["run", "--preset", "smoke", "--workers-per-trial", "2", "--gpus-per-trial", "0.5",
                      "--num-gpus", "1", "--storage", str(tmp_path)],
             "gpus per worker=0.5", "whole GPU")
