"""A full or read-only disk loses nothing: on a real tmpfs mounted by the test (root only; CI runs as
root), filled to the last byte while a sweep runs or a data cache is written, then remounted read-only.

- the sweep driver ends in one line (exit 2) naming the resume command; the trial that finished before
  the disk filled keeps its run/result.json and weights intact; once space is back `report` lists it
  and `resume` finishes the sweep;
- `data cache` refuses early, with the numbers, a cache larger than the free space; a disk that fills
  while it writes ends in one line, and its temporary directory is removed (no SIGBUS: ordinary writes);
- on a read-only filesystem `report`, `resume`, `train`, `eval --out`, `fidelity --out` and `data cache`
  end in one line (exit 2), and every file hashes the same before and after.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fixtures_disk import REPO, fill, needs_root, one_line_refusal, remount, tmpfs, tree_hash, vitsweep
from orchestrator.cli import main
from orchestrator.state_keeper import LAST_GOOD
from trainables.finetune_trainable import FINAL_FILES

pytestmark = needs_root

SWEEP = """
name: fulldisk
fixed:
  model: vit_tiny_patch16_224
  pretrained: false
  pretrained_tag: null
  img_size: 32
  patch_size: 8
  depth: 1
  num_workers: 0
  augment: none
  topk: [1]
  data: "synthetic:classes=2,size=32,n=16,n_val=8"
  epochs: 1
  batch_size: 8
search:
  lr: {grid: [0.001, 0.002]}
resources: {cpu: 1, gpu: 0}
"""


def run_cli(argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    env.pop("RAY_ADDRESS", None)
    return env


def _finished(exp: Path):
    return sorted(exp.glob("*/run/result.json"))


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    """A real 2-trial sweep (one trial at a time) whose storage, a 128 MiB tmpfs, is filled to the last
    byte as soon as the first trial's run/result.json is in it."""
    root = tmp_path_factory.mktemp("fulldisk")
    config = root / "sweep.yaml"
    config.write_text(textwrap.dedent(SWEEP))
    with tmpfs(root / "mnt", "128m") as mnt:
        exp = mnt / "exp"
        log = root / "run.log"
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--config", config, "--storage", mnt,
                                   "--name", "exp", "--num-cpus", "1"], cwd=REPO, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and driver.poll() is None and not (
                    _finished(exp) and len(list(exp.glob("*/params.json"))) >= 2):
                time.sleep(0.1)  # the first trial finished and the second started
            assert _finished(exp), log.read_text()[-3000:]
            first = _finished(exp)[0].parent.parent
            first_files = {name: (first / "run" / name).read_bytes() for name in FINAL_FILES}
            filler = fill(mnt)
            rc = driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, 9)
                driver.wait()
        yield {"root": root, "mnt": mnt, "exp": exp, "rc": rc, "log": log.read_text(), "first": first,
               "first_files": first_files, "filler": filler}


def test_the_driver_that_cannot_write_says_so_in_one_line(full_sweep):
    assert full_sweep["rc"] == 2, (full_sweep["rc"], full_sweep["log"][-4000:])
    last = full_sweep["log"].strip().splitlines()[-1]
    assert last.startswith("vitsweep run: error:") and "no space left" in last, last
    assert f"vitsweep resume {full_sweep['exp']}" in last, last


def test_the_trial_finished_before_the_disk_filled_is_intact(full_sweep):
    from finetune.weights import load_weight_dict

    first = full_sweep["first"]
    for name, raw in full_sweep["first_files"].items():
        assert (first / "run" / name).read_bytes() == raw, name
    result = json.loads((first / "run" / "result.json").read_text())
    assert result["status"] == "finished"
    load_weight_dict(first / "run" / "weights.safetensors")  # its digest checks out


def test_vitsweep_never_leaves_a_zero_byte_file_under_a_final_name(full_sweep):
    """vitsweep's own final files: each trial's run/ outputs, the report, the last intact state (Tune's
    own logs, progress.csv and the trial-level result.json, are Ray's, written in place)."""
    exp = full_sweep["exp"]
    empty = [p for p in exp.glob("*/run/*") if p.name in FINAL_FILES and p.stat().st_size == 0]
    empty += [p for p in exp.glob("*") if p.name in ("comparison.md", "comparison.csv", LAST_GOOD)
              and p.stat().st_size == 0]
    assert not empty, empty
    assert (exp / LAST_GOOD).stat().st_size > 0


def test_report_and_resume_work_on_what_is_intact_once_space_is_back(full_sweep):
    """Ordered after the tests above (pytest runs a module's tests in file order)."""
    exp = full_sweep["exp"]
    full_sweep["filler"].unlink()
    code, err = run_cli(["report", exp])
    assert code == 0, err
    rows = (exp / "comparison.csv").read_text()
    assert "finished" in rows
    proc = vitsweep("resume", exp, "--num-cpus", "1", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    statuses = [json.loads(p.read_text())["status"] for p in _finished(exp)]
    assert statuses == ["finished", "finished"], statuses


def test_read_only_disk_every_command_refuses_in_one_line(full_sweep, tmp_path):
    mnt, exp = full_sweep["mnt"], full_sweep["exp"]
    run = full_sweep["first"] / "run"
    remount(mnt, "ro")
    try:
        before = tree_hash(mnt)
        cases = {
            "report": ["report", exp],
            "resume": ["resume", exp, "--num-cpus", "1"],
            "train": ["train", "--out", mnt / "new", "--no-pretrained", "--depth", "1", "--img-size", "32",
                      "--patch-size", "8", "--data", "synthetic:classes=2,n=8,n_val=4", "--epochs", "1"],
            "eval": ["eval", "--weights", run, "--data", "synthetic:classes=2,n=8,n_val=4", "--out", mnt / "new"],
            "fidelity": ["fidelity", "--from", run, "--data", "synthetic:classes=2,n=8,n_val=4", "--out", mnt / "new"],
            "data cache": ["data", "cache", "--data", "synthetic:classes=2,n=8,n_val=4", "--size", "16",
                           "--out", mnt / "new"],
        }
        for name, argv in cases.items():
            code, err = run_cli(argv)
            assert code == 2 and "Traceback" not in err, (name, err)
            assert "read-only" in err.strip().splitlines()[-1], (name, err)
            assert tree_hash(mnt) == before, name
    finally:
        remount(mnt, "rw")


# ---------------------------------------------------------------------------------------- data cache
def test_data_cache_larger_than_the_free_space_is_refused_early_with_the_numbers(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        code, err = run_cli(["data", "cache", "--data", "synthetic:classes=2,n=200,n_val=50", "--size", "64",
                             "--out", mnt / "cache"])
        line = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err, err
        assert "250 images" in line and "MiB" in line and "free" in line, line
        assert tree_hash(mnt) == {}


def test_a_disk_that_fills_while_the_cache_is_written_ends_in_one_line_and_leaves_no_temp_dir(tmp_path):
    """Before: the cache was written through a memory map, and a full tmpfs killed it with SIGBUS,
    leaving its temporary directory to fill the disk."""
    with tmpfs(tmp_path / "small", "48m") as mnt:
        env = _env()
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "data", "cache", "--data",
                                 "synthetic:classes=2,n=3400,n_val=200", "--size", "64", "--num-workers", "0",
                                 "--out", str(mnt / "cache")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            # the build's work directory; its image file is preallocated sparse: count the written blocks
            tmp = [p for p in mnt.glob(".cache.partial/train_images.npy") if p.stat().st_blocks * 512 > (1 << 20)]
            if tmp:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before the disk could be filled: " + proc.stderr.read()[-2000:]
        filler = fill(mnt)
        out, err = proc.communicate(timeout=600)
        completed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        one_line_refusal(completed, "no space left")
        # the filler and the build's empty lock file (flock's; kept, as removing it would race a waiter)
        assert sorted(p.name for p in mnt.iterdir()) == sorted([filler.name, ".cache.lock"]), list(mnt.iterdir())
        assert (mnt / ".cache.lock").stat().st_size == 0


def test_a_truncated_state_falls_back_to_the_last_intact_copy(full_sweep, tmp_path, caplog):
    """What a full disk does to Ray's own state file (written in place): report reads the driver's last
    intact copy; resume's check puts it back, keeping the corrupt file aside."""
    import shutil

    from orchestrator.preflight import check_tune_state
    from orchestrator.storage import resolve_storage

    exp = tmp_path / "exp"
    shutil.copytree(full_sweep["exp"], exp)
    state = max(exp.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:100])
    code, err = run_cli(["report", exp])
    assert code == 0 and "last intact copy" in caplog.text, err
    check_tune_state(resolve_storage(str(exp)))
    assert json.loads(state.read_text())["trial_data"]
    assert len(list(exp.glob(f"{state.name}.corrupt-*"))) == 1
