"""GPU scheduling without GPUs: a local instance with 2 logical GPUs shows that ``--gpus-per-trial 1``
runs two trials at once on distinct CUDA_VISIBLE_DEVICES and ``0.5`` runs four; the real trainable,
given a (logical) GPU on a machine without CUDA, fails (unless its config says ``device: cpu``)."""

from __future__ import annotations

import json
import re

import pytest
import ray
import torch

from orchestrator.sweep import run_sweep
from search_spaces import SweepSpec

pytestmark = pytest.mark.slow

FIXED = {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32, "patch_size": 4,
         "data": "synthetic:classes=5,size=32,n=40,n_val=20", "epochs": 1, "batch_size": 20, "depth": 2,
         "warmup_epochs": 0.0}


@pytest.fixture(scope="module")
def ray_two_gpus():
    ray.init(address="local", num_cpus=4, num_gpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def recording_trainable(barrier_dir: str, expected: int):
    """Records its GPU ids, CUDA_VISIBLE_DEVICES and start/end times; waits (up to 120 s) until
    `expected` trials have started, so concurrency is observed, not assumed from sleeps."""

    def trainable(config):
        import os
        import time
        from pathlib import Path

        from ray import tune

        start = time.time()
        me = Path(barrier_dir) / f"{os.getpid()}-{start}"
        me.write_text("started")
        deadline = start + 120
        while len(list(Path(barrier_dir).iterdir())) < expected and time.time() < deadline:
            time.sleep(0.2)
        all_started = len(list(Path(barrier_dir).iterdir())) >= expected
        time.sleep(0.5)
        tune.report({
            "epoch": 1, "val/acc1": 0.5, "status": "finished", "start": start, "end": time.time(),
            "all_started": all_started, "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        })

    return trainable


def _max_overlap(records):
    events = sorted([(r.final["start"], 1) for r in records] + [(r.final["end"], -1) for r in records])
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def _spec(gpu: float, workers: int = 1) -> SweepSpec:
    return SweepSpec.from_dict({"fixed": FIXED, "search": {"lr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}},
                                "resources": {"cpu": 1, "gpu": gpu, "workers": workers}})


def test_one_gpu_per_trial_runs_two_trials_at_once_on_distinct_devices(ray_two_gpus, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    outcome = run_sweep(_spec(1), storage=tmp_path, name="gpu1", trainable=recording_trainable(str(barrier), 2))
    records = outcome.report.records
    assert len(records) == 4 and all(r.status == "finished" for r in records)
    assert _max_overlap(records) == 2
    first_two = sorted(records, key=lambda r: r.final["start"])[:2]
    assert all(r.final["all_started"] for r in first_two)
    devices = [r.final["cuda_visible_devices"] for r in first_two]
    assert sorted(devices) == ["0", "1"], devices
    assert all(json.loads(r.final["gpu_ids"]) == [r.final["cuda_visible_devices"]] for r in records)


def test_half_a_gpu_per_trial_runs_four_trials_at_once(ray_two_gpus, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    outcome = run_sweep(_spec(0.5), storage=tmp_path, name="gpu05", trainable=recording_trainable(str(barrier), 4))
    records = outcome.report.records
    assert len(records) == 4 and all(r.status == "finished" for r in records)
    assert all(r.final["all_started"] for r in records), "four trials did not run at the same time"
    assert _max_overlap(records) == 4
    devices = sorted(r.final["cuda_visible_devices"] for r in records)
    assert devices == ["0", "0", "1", "1"], devices


def test_gpus_per_trial_beyond_the_joined_cluster_is_refused_before_any_trial(ray_two_gpus, tmp_path):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match=r"gpus per trial=3: a trial process drives one device.*--workers-per-trial 3"):
        _spec(3)  # several GPUs for one process would sit idle: refused when the sweep is parsed
    with pytest.raises(ConfigError, match=r"4 workers per trial x \(cpu 1, gpu 1\) per worker = .*4 GPU\(s\), "
                                          r"but the cluster has .*2 GPU"):
        run_sweep(_spec(1, workers=4), storage=tmp_path, name="too_many")
    assert not (tmp_path / "too_many").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (a logical GPU CUDA cannot see)")
def test_a_logical_gpu_without_cuda_fails_the_trial_unless_it_asks_for_the_cpu(ray_two_gpus, tmp_path):
    """Ray assigns the trial a GPU this machine's torch cannot see: ``device: auto`` fails naming the node
    and CUDA_VISIBLE_DEVICES (no silent CPU run whose img/s would fill the GPU column); an explicit
    ``device: cpu`` trains on the CPU; the sweep goes on past the failure."""
    spec = SweepSpec.from_dict({"fixed": FIXED, "search": {"device": {"grid": ["auto", "cpu"]}},
                                "resources": {"cpu": 1, "gpu": 1}, "max_failures": 0})
    outcome = run_sweep(spec, storage=tmp_path, name="placement")
    by_device = {r.config["device"]: r for r in outcome.report.records}
    auto, cpu = by_device["auto"], by_device["cpu"]
    assert auto.status.startswith("errored") and "CUDA is missing" in auto.error, auto.error
    assert "CUDA_VISIBLE_DEVICES=" in auto.error and re.search(r"on node [0-9.]+ \(CUDA_VISIBLE_DEVICES='0', node id [0-9a-f]+", auto.error)
    assert not (auto.path / "run" / "result.json").exists()  # it trained nothing
    assert cpu.status == "finished", cpu.error
    run = json.loads((cpu.path / "run" / "result.json").read_text())
    assert run["environment"]["device"] == "cpu" and run["config"]["device"] == "cpu"
    assert "CUDA is missing" in outcome.report.markdown_path.read_text()  # the report's Errors section
