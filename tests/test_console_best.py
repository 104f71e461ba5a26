"""The console's best is a trial that ended, as comparison.md ranks it, and a double Ctrl-C still
prints the resume command.

- `SweepReporter` (the status block while a sweep runs) names as best only a TERMINATED trial that
  did not diverge: a running trial's metric is one epoch's, not its result.
- `console_table` (the table printed at the end of `run`/`resume`) marks ``*`` and ``P`` only on
  configurations whose trials all ended, as `_mark_best` does for comparison.md.
- A real sweep in a subprocess, two SIGINTs to its process group (a impatient Ctrl-C Ctrl-C): exit 130
  with ``vitsweep resume <experiment>`` on stderr, and that command completes the sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.console import SweepReporter
from orchestrator.results import collect_trials
from orchestrator.tables import build_rows, console_table
from test_report import _epoch, cfg, make_experiment

REPO = Path(__file__).resolve().parents[1]


def _trial(trial_id, status, acc, run_status="running", label="softmax"):
    config = {"seed": 0, "arch": {"variant": label, "_label": label}}
    return SimpleNamespace(config=config, status=status, trial_id=trial_id, evaluated_params={},
                           last_result={"epoch": 1, "val/acc1": acc, "status": run_status})


def test_the_status_block_names_only_an_ended_trial_best():
    reporter = SweepReporter("val/acc1", "max")
    running = _trial("t_running", "RUNNING", 0.9)
    paused = _trial("t_paused", "PAUSED", 0.95)
    diverged = _trial("t_diverged", "TERMINATED", 0.99, run_status="diverged")
    errored = _trial("t_errored", "ERROR", 0.97)
    assert reporter.best([running, paused, diverged, errored]) is None
    assert "best:" not in reporter.render([running, paused, diverged, errored])
    finished = _trial("t_finished", "TERMINATED", 0.5, run_status="finished")
    stopped_early = _trial("t_asha", "TERMINATED", 0.6, run_status="running")  # stopped by the scheduler
    assert reporter.best([running, paused, finished]) is finished
    assert reporter.best([running, finished, stopped_early]) is stopped_early
    assert reporter.render([running, finished]).splitlines()[-1].endswith("trial t_finished)")


def test_the_final_table_never_marks_an_unfinished_trial_best_or_pareto(tmp_path):
    curve = [_epoch(1, 0.3), _epoch(2, 0.4), _epoch(3, 0.5, status="finished")]
    exp = make_experiment(tmp_path, [
        ("f", cfg("softmax"), "TERMINATED", curve, None, "finished"),
        ("u", cfg("linformer", rank=8), "RUNNING", [_epoch(1, 0.9, gflops=0.1)], None, None),
    ])
    table = console_table(build_rows(collect_trials(exp)))
    lines = {line.split()[1]: line for line in table.splitlines()[1:-1]}
    assert lines["softmax"].rstrip().endswith("*P"), table
    assert not lines["linformer"].rstrip().endswith(("*", "P", "*P")), table


CONFIG = """
name: doublectrlc
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
  data: "synthetic:classes=3,size=32,n=24,n_val=12"
  epochs: 2
  batch_size: 12
  warmup_epochs: 0.5
search:
  lr: {grid: [0.001, 0.002, 0.003]}
resources: {cpu: 2, gpu: 0}
reuse_actors: false
"""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_double_ctrl_c_still_prints_the_resume_command_that_completes_the_sweep(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    exp = tmp_path / "results" / "exp"
    log = tmp_path / "run.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", config, "--storage", tmp_path / "results",
         "--name", "exp", "--num-cpus", "2"],
        cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not list(exp.glob("*/run/result.json")):
            time.sleep(0.3)
        assert driver.poll() is None and list(exp.glob("*/run/result.json")), log.read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C ...
        time.sleep(0.2)
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGINT)  # ... and Ctrl-C again, at once
        rc = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert f"vitsweep resume {exp}" in text, text[-3000:]
    final = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", exp, "--num-cpus", "2"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    assert len(list(exp.glob("*/run/result.json"))) == 3
