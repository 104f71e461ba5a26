"""Load: a sweep of 50 small trials, 2 at a time on 2 CPUs, run as a user runs it (`vitsweep run` in a
subprocess), with actor reuse as a CPU sweep of short trials would use it. Every result must be present at the end, and the driver's memory must stay bounded: its
resident set is sampled from /proc while it runs, and the peak (VmHWM) is printed and checked.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRIALS = 50
# A driver (Python, torch, timm, Ray Tune and its 50 trials' state) must stay well under this.
DRIVER_RSS_LIMIT_MB = 1500
CONFIG = """
name: load
fixed:
  model: vit_tiny_patch16_224
  pretrained: false
  pretrained_tag: null
  img_size: 32
  patch_size: 4
  depth: 1
  num_workers: 0
  augment: none
  topk: [1]
  data: "synthetic:classes=4,size=32,n=16,n_val=16"
  epochs: 1
  batch_size: 16
  max_train_batches: 1
  max_val_batches: 1
search:
  lr: {grid: [%s]}
resources: {cpu: 1, gpu: 0}   # 2 trials at a time on --num-cpus 2
num_to_keep: 1
reuse_actors: true            # trials share the two worker processes (no per-trial import of torch/timm)
"""


def _memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of `pid` in kB, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    return values


def test_fifty_trials_two_at_a_time_all_results_present_driver_memory_bounded(tmp_path):
    lrs = [round(1e-4 * (i + 1), 6) for i in range(TRIALS)]
    config = tmp_path / "load.yaml"
    config.write_text(textwrap.dedent(CONFIG) % ", ".join(str(lr) for lr in lrs))
    storage = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("w")
    start = time.monotonic()
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config), "--storage", str(storage),
         "--name", "load", "--num-cpus", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    samples = []
    peak_kb = 0
    try:
        while driver.poll() is None:
            try:
                memory = _memory_kb(driver.pid)
            except (FileNotFoundError, ProcessLookupError):
                break  # exited between poll() and the read
            if not memory:  # a zombie has no Vm* lines
                break
            samples.append(memory["VmRSS"])
            peak_kb = max(peak_kb, memory["VmHWM"])
            time.sleep(0.5)
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait(timeout=60)
        log.close()
    wall_s = time.monotonic() - start
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-4000:]

    exp = storage / "load"
    with (exp / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == TRIALS, output[-3000:]
    assert sorted(float(r["configuration"].removeprefix("lr=")) for r in rows) == lrs
    assert all(r["status"] == "finished" and r["epochs"] == "1" for r in rows), rows
    runs = sorted(exp.glob("*/run/result.json"))
    assert len(runs) == TRIALS and all(json.loads(p.read_text())["status"] == "finished" for p in runs)

    peak_mb = peak_kb / 1024
    print(f"\nload: {TRIALS} trials in {wall_s:.0f} s; driver RSS peak (VmHWM) {peak_mb:.0f} MB, "
          f"median sample {sorted(samples)[len(samples) // 2] / 1024:.0f} MB over {len(samples)} samples")
    assert samples, "the driver's memory was never sampled"
    assert peak_mb < DRIVER_RSS_LIMIT_MB, f"driver peak RSS {peak_mb:.0f} MB"
