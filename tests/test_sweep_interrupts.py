"""A real tiny sweep, interrupted: Ctrl-C (SIGINT to the driver's process group) during `run`, SIGTERM
(to the driver alone, as schedulers and ``ray job stop`` send it) during `resume`, then a `resume`
that completes it. While the first driver runs: a second driver is refused by the experiment lock,
and every listening socket of its local Ray instance is on loopback. Afterwards: a corrupt Tune state
is refused by `resume` (naming the file, nothing changed), and `report` names corrupt files or skips
the one bad trial, without a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.lock import LOCK_NAME
from test_hostile_input import FEW, snapshot

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
name: interrupts
fixed:
  model: vit_tiny_patch16_224
  pretrained: false
  pretrained_tag: null
  img_size: 32
  patch_size: 4
  depth: 2
  num_workers: 0
  augment: none
  topk: [1]
  data: "synthetic:classes=5,size=32,n=40,n_val=20"
  epochs: 2
  batch_size: 20
  warmup_epochs: 0.5
search:
  lr: {grid: [0.001, 0.002, 0.003, 0.004]}
resources: {cpu: 2, gpu: 0}   # one trial at a time on 2 CPUs
# A fresh process per trial, as a GPU sweep has: with a reused actor (the CPU default) the trial
# running at Ctrl-C can finish during the driver's shutdown, upload its run/ and so count as finished
# here, though Tune holds it unfinished and the resume trains its last epoch again.
reuse_actors: false
"""
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


def _finished(exp: Path) -> int:
    return len(list(exp.glob("*/run/result.json")))


def _session_listeners(sid: int) -> set:
    """LISTEN addresses of every TCP socket held by a process of session `sid` (the driver's Ray)."""
    inodes = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                hex_ip = cols[1].split(":")[0]
                raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
                found.add(socket.inet_ntop(family, raw))
    return found


def _in_process(argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _until(driver: subprocess.Popen, exp: Path, trials: int, log: Path) -> None:
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None and _finished(exp) < trials:
        time.sleep(0.3)
    assert driver.poll() is None and _finished(exp) >= trials, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    config = root / "sweep.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    exp = root / "results" / "exp"
    out = {"root": root, "exp": exp, "config": config}
    run_log = root / "run.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", config, "--storage", root / "results",
         "--name", "exp", "--num-cpus", "2"],
        cwd=REPO, env=_env(), stdout=run_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _until(driver, exp, 1, run_log)
        out["listeners"] = _session_listeners(driver.pid)
        out["holder_pid"] = driver.pid
        out["second_resume"] = _in_process(["resume", exp, "--num-cpus", "1"])
        out["second_run"] = _in_process(["run", "--config", config, "--storage", root / "results", "--name", "exp",
                                          "--num-cpus", "2", "--overwrite"])
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group
        out["run_rc"] = driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out["run_log"] = run_log.read_text()
    out["after_sigint_csv"] = list(csv.DictReader((exp / "comparison.csv").open()))
    out["after_sigint_lock"] = (exp / LOCK_NAME).exists()

    resume_log = root / "resume.log"
    resumed = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "resume", exp, "--num-cpus", "2"],
                               cwd=REPO, env=_env(), stdout=resume_log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        _until(resumed, exp, 2, resume_log)
        resumed.send_signal(signal.SIGTERM)  # the driver alone
        out["resume_rc"] = resumed.wait(timeout=180)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
            resumed.wait()
    out["resume_log"] = resume_log.read_text()
    final = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", exp, "--num-cpus", "2"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    out["final_rc"], out["final_log"] = final.returncode, final.stdout + final.stderr
    return out


def test_sigint_and_sigterm_exit_130_and_143_with_the_resume_command_and_resume_completes(interrupted):
    exp = interrupted["exp"]
    hint = f"vitsweep resume {exp}"
    assert interrupted["run_rc"] == 130, interrupted["run_log"][-3000:]
    assert "stopped by SIGINT" in interrupted["run_log"] and hint in interrupted["run_log"]
    assert interrupted["resume_rc"] == 143, interrupted["resume_log"][-3000:]
    assert "stopped by SIGTERM" in interrupted["resume_log"] and hint in interrupted["resume_log"]
    for log in (interrupted["run_log"], interrupted["resume_log"]):
        # The driver never dumps a stack. Lines from Ray's workers ("(train_vit pid=N)") are left out:
        # a worker stopped by Ray's own SIGTERM can print a teardown traceback (Ray's sigterm_handler).
        driver_lines = "\n".join(line for line in log.splitlines() if " pid=" not in line)
        assert "Traceback" not in driver_lines and "core dumped" not in log.lower()
    assert not interrupted["after_sigint_lock"]
    # the report after Ctrl-C lists the unfinished trials and never marks one best
    rows = interrupted["after_sigint_csv"]
    assert any(r["status"] != "finished" for r in rows), rows
    assert all(r["best"] != "True" for r in rows if r["status"] != "finished"), rows
    assert interrupted["final_rc"] == 0, interrupted["final_log"][-3000:]
    final = list(csv.DictReader((exp / "comparison.csv").open()))
    assert len(final) == 4 and all(r["status"] == "finished" and r["epochs"] == "2" for r in final), final
    assert not (exp / LOCK_NAME).exists()


def test_a_second_driver_is_refused_while_the_sweep_runs(interrupted):
    pid = interrupted["holder_pid"]
    code, err = interrupted["second_resume"]
    assert code == 2 and "in use by another driver" in err and f"pid {pid}" in err and socket.gethostname() in err, err
    code, err = interrupted["second_run"]
    assert code == 2 and "being run by another driver" in err and f"pid {pid}" in err, err
    assert "Traceback" not in err


def test_a_local_sweeps_ray_listens_on_loopback_only(interrupted):
    listeners = interrupted["listeners"]
    assert listeners, "no listening sockets found for the driver's Ray processes"
    assert listeners <= LOOPBACK, listeners


def _copy(interrupted, tmp: Path) -> Path:
    exp = tmp / "exp"
    shutil.copytree(interrupted["exp"], exp)
    return exp


@FEW
@given(fraction=st.floats(0.0, 0.99))
def test_resume_refuses_a_truncated_state_naming_it_and_changes_nothing(interrupted, tmp_path_factory, fraction):
    exp = _copy(interrupted, tmp_path_factory.mktemp("corrupt"))
    (exp / ".vitsweep-last-good-experiment_state.json").unlink(missing_ok=True)  # no intact copy to fall back to
    state = max(exp.glob("experiment_state-*.json"))
    raw = state.read_bytes()
    state.write_bytes(raw[:int(len(raw) * fraction)])
    before = snapshot(exp)
    code, err = _in_process(["resume", exp, "--num-cpus", "1"])
    assert code == 2 and state.name in err and "corrupt" in err and "Traceback" not in err, err
    assert snapshot(exp) == before
    code, err = _in_process(["report", exp])
    assert code == 2 and state.name in err and "Traceback" not in err, err
    assert snapshot(exp) == before


def test_report_names_a_corrupt_marker_and_skips_a_corrupt_run_result(interrupted, tmp_path, caplog):
    exp = _copy(interrupted, tmp_path)
    marker = exp / "vitsweep_experiment.json"
    good = marker.read_bytes()
    marker.write_bytes(good[: len(good) // 2])
    code, err = _in_process(["report", exp])
    assert code == 2 and str(marker) in err and "Traceback" not in err, err
    marker.write_bytes(good)
    bad = next(exp.glob("*/run/result.json"))
    bad.write_bytes(b'{"history": [')
    code, err = _in_process(["report", exp])
    assert code == 0 and "Traceback" not in err, err
    assert f"skipping {bad}: not valid JSON" in caplog.text


def test_a_poorer_report_is_written_beside_the_kept_one(interrupted, tmp_path):
    from orchestrator.report import write_report

    exp = _copy(interrupted, tmp_path)
    kept = (exp / "comparison.md").read_bytes()
    victim = next(p for p in exp.iterdir() if (p / "params.json").is_file())
    shutil.rmtree(victim)  # a trial lost: the new report would hold fewer finished trials
    report = write_report(exp)
    assert report.partial and report.markdown_path.name == "comparison.partial.md"
    assert (exp / "comparison.md").read_bytes() == kept and (exp / "comparison.partial.csv").is_file()
    assert json.loads((exp / "vitsweep_experiment.json").read_text())["format"] == "vitsweep-experiment"
