"""Kill the sweep driver mid-sweep (SIGKILL, after a trial finished on disk), then `vitsweep resume`
finishes the sweep without re-running finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
name: resume
fixed:
  model: vit_tiny_patch16_224
  pretrained: false
  pretrained_tag: null
  img_size: 32
  patch_size: 4
  depth: 2
  num_workers: 0
  augment: none
  data: "synthetic:classes=5,size=32,n=40,n_val=20"
  epochs: 2
  batch_size: 20
  warmup_epochs: 0.5
search:
  lr: {grid: [0.001, 0.002, 0.003]}
resources: {cpu: 2, gpu: 0}   # one trial at a time on 2 CPUs; every trial is created up front
"""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


def _terminated_trials(exp: Path):
    """Trials the driver has recorded as TERMINATED in its experiment state on disk."""
    done = set()
    for state in exp.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except json.JSONDecodeError:
            continue  # being written
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["relative_logdir"])
    return done


def _snapshot(exp: Path, trial_dirs):
    snap = {}
    for name in trial_dirs:
        tdir = exp / name
        snap[name] = ((tdir / "run" / "result.json").stat().st_mtime_ns, (tdir / "result.json").read_text())
    return snap


def test_killed_driver_then_resume_finishes_without_rerunning_finished_trials(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    storage = tmp_path / "results"
    exp = storage / "resume"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli_sweep", "run", "--config", str(config), "--storage", str(storage),
         "--name", "resume", "--num-cpus", "2"],
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 400
        finished = set()
        while time.time() < deadline and driver.poll() is None:
            finished = {d for d in _terminated_trials(exp) if (exp / d / "run" / "result.json").is_file()}
            if finished:
                break
            time.sleep(0.5)
        assert finished, f"no trial finished before the deadline:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        before = _snapshot(exp, finished)
    finally:
        # the driver and the local Ray instance it started share its process group
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        log.close()
    assert driver.returncode == -signal.SIGKILL
    assert not (exp / "comparison.md").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli_sweep", "resume", str(exp), "--num-cpus", "2"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=500,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert " finished" in resumed.stdout  # the console table (orchestrator.tables.console_table)

    with (exp / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["configuration"] for r in rows) == ["lr=0.001", "lr=0.002", "lr=0.003"], (
        rows, resumed.stdout[-3000:])
    assert all(r["status"] == "finished" and r["epochs"] == "2" for r in rows), rows
    # finished trials were not run again: their run outputs and Tune logs are untouched
    assert _snapshot(exp, finished) == before
    for tdir in exp.iterdir():
        if tdir.is_dir() and (tdir / "params.json").is_file():
            epochs = [json.loads(l)["epoch"] for l in (tdir / "result.json").read_text().splitlines() if l.strip()]
            assert sorted(set(epochs)) == [1, 2], (tdir.name, epochs)
