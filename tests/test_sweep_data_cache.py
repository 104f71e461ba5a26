"""A sweep with ``data_cache`` (the imagenet100 and scaling presets) trains from a decode-once cache that
the driver builds once, before any trial, and reuses (`orchestrator.data_cache`); on a cluster the cache
must be on a path every node mounts, and trials on every node read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_SWEEP_FIXED
from finetune.errors import ConfigError
from orchestrator.data_cache import cache_dir_for, cache_directory
from search_spaces import SweepOverrides, SweepSpec, load_sweep
from search_spaces.presets import preset_values

SOURCE = "synthetic:classes=5,size=32,n=24,n_val=12"


def _sweep_yaml(tmp_path: Path, cache_dir: Path, **extra) -> Path:
    spec = {"fixed": {**TINY_SWEEP_FIXED, "data": SOURCE, "epochs": 1, "batch_size": 12, "depth": 1,
                      "warmup_epochs": 0.0},
            "search": {"lr": {"grid": [1e-3, 2e-3]}}, "max_failures": 0,
            "data_cache": {"size": 36, "dir": str(cache_dir)}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(args, env=None, timeout=600):
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"} if env is None else env
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_study_presets_train_from_a_cache():
    assert preset_values("imagenet100")["data_cache"] == {"size": 256, "dir": None}
    assert preset_values("scaling")["data_cache"]["size"] >= 448 / 0.9  # its largest eval resize fits


def test_the_driver_builds_the_cache_once_and_trials_read_it(tmp_path):
    cache = tmp_path / "cache"
    sweep = _sweep_yaml(tmp_path, cache)
    first = _run(["--config", str(sweep), "--storage", str(tmp_path / "r"), "--name", "one", "--num-cpus", "2"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert f"data cache: decoding {SOURCE} once into {cache}" in first.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    runs = sorted((tmp_path / "r" / "one").glob("*/run/result.json"))
    assert len(runs) == 2
    assert all(json.loads(p.read_text())["config"]["data"] == f"cache:{cache}" for p in runs)
    marker = json.loads((tmp_path / "r" / "one" / "vitsweep_experiment.json").read_text())
    assert marker["spec"]["fixed"]["data"] == f"cache:{cache}" and "data_cache" not in marker["spec"]

    second = _run(["--config", str(sweep), "--storage", str(tmp_path / "r"), "--name", "two", "--num-cpus", "2"])
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"data cache: reusing {cache}" in second.stderr and "decoding" not in second.stderr
    assert json.loads((cache / "manifest.json").read_text())["created"] == manifest["created"]  # not rebuilt


def test_a_different_cache_in_the_directory_is_refused_before_ray(tmp_path):
    from finetune.data import build_cache

    build_cache("synthetic:classes=2,size=16,n=4,n_val=2", tmp_path / "cache", size=16, num_workers=0)
    sweep = _sweep_yaml(tmp_path, tmp_path / "cache")
    proc = _run(["--config", str(sweep), "--storage", str(tmp_path / "r"), "--name", "x", "--num-cpus", "2"])
    assert proc.returncode == 2 and "holds a cache of 'synthetic:classes=2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_cluster_needs_a_directory_every_node_mounts(tmp_path):
    spec = SweepSpec.from_dict({"fixed": {**TINY_SWEEP_FIXED, "data": SOURCE}, "data_cache": {"size": 36}})
    with pytest.raises(ConfigError, match="every node mounts with --data-cache DIR"):
        cache_directory(spec, joining=True)
    assert cache_directory(spec, joining=False) == cache_dir_for(SOURCE, 36)
    given = load_sweep(spec.to_dict(), SweepOverrides(data_cache_dir=str(tmp_path / "shared"))).spec
    assert cache_directory(given, joining=True) == tmp_path / "shared"
    off = load_sweep(spec.to_dict(), SweepOverrides(data_cache_dir="off")).spec
    assert off.data_cache is None and cache_directory(off, joining=True) is None


@pytest.mark.parametrize("change, message", [
    ({"data_cache": {"size": 4}}, "data_cache.size=4 must be an integer in [8, 4096]"),
    ({"data_cache": {"size": 64, "where": 1}}, "where"),
    ({"data_cache": {"size": 64, "dir": ""}}, "data_cache.dir=''"),
    ({"data_cache": {}, "fixed": {**TINY_SWEEP_FIXED, "data": "cache:/x"}}, "the data is a cache already"),
    ({"data_cache": {}, "search": {"data": {"grid": [SOURCE, "synthetic"]}}}, "not per variant or searched"),
])
def test_bad_data_cache_options_name_the_value(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SweepSpec.from_dict({"fixed": {**TINY_SWEEP_FIXED, "data": SOURCE}, **change})


@pytest.mark.slow
def test_on_a_cluster_trials_on_both_nodes_read_the_shared_cache(tmp_path):
    from fixtures_ray_cluster import local_cluster

    cache = tmp_path / "shared" / "cache"  # one filesystem here: what an NFS mount is on a real cluster
    sweep = _sweep_yaml(tmp_path, cache, resources={"cpu": 1, "gpu": 0})
    (tmp_path / "cluster").mkdir()
    with local_cluster(tmp_path / "cluster") as cluster:
        proc = _run(["--config", str(sweep), "--storage", str(tmp_path / "r"), "--name", "c"], env=cluster.env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"decoding {SOURCE} once into {cache}" in proc.stderr
    results = [json.loads(p.read_text()) for p in (tmp_path / "r" / "c").glob("*/run/result.json")]
    assert len(results) == 2 and all(r["config"]["data"] == f"cache:{cache}" for r in results)
    assert {r["node"]["node_id"] for r in results} == set(cluster.node_ids.values())  # both nodes read it
