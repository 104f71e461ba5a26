"""The output rule (finetune/outputs.py): every command that writes refuses, in one line and before
anything is written, an output that holds other work; links are never followed out of an output; two
`vitsweep train` into one --out: one runs, the other is refused. Every earlier file hashes the same
before and after each refused case (`tree_hash`).

The cases are generated per family: each writing command x each kind of occupied target."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_disk import REPO, one_line_refusal, tree_hash
from orchestrator.cli import main

TRAIN = ["--no-pretrained", "--model", "vit_tiny_patch16_224", "--depth", "1", "--img-size", "32", "--patch-size", "8",
         "--data", "synthetic:classes=2,size=32,n=16,n_val=8", "--epochs", "1", "--batch-size", "8",
         "--num-workers", "0", "--no-progress", "--topk", "1"]
DATA = ["--data", "synthetic:classes=2,size=32,n=16,n_val=8", "--batch-size", "8"]


def run_cli(argv) -> tuple:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def refused_in_process(argv, root: Path, *fragments: str) -> str:
    before = tree_hash(root)
    code, err = run_cli(argv)
    assert code == 2 and "Traceback" not in err, (code, err)
    line = err.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert tree_hash(root) == before, f"{argv} changed files under {root}"
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Real earlier work: a finished training run, an eval output, a sweep-experiment-shaped directory
    (its marker and a Tune state), a directory of the user's own files."""
    root = tmp_path_factory.mktemp("work")
    code, err = run_cli(["train", "--out", root / "run", *TRAIN])
    assert code == 0, err
    code, err = run_cli(["eval", "--weights", root / "run", *DATA, "--topk", "1", "--out", root / "evaluated"])
    assert code == 0, err
    exp = root / "experiment"
    exp.mkdir()
    (exp / "vitsweep_experiment.json").write_text(json.dumps({"format": "vitsweep-experiment", "spec": {}}))
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (exp / "comparison.md").write_text("# the experiment's table\n")
    user = root / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes\n")
    return root


# Every command that writes, with its --out in place of OUT (data show and bench write one file in OUT).
WRITERS = {
    "train": lambda w, out: ["train", "--out", out, *TRAIN],
    "eval": lambda w, out: ["eval", "--weights", w / "run", *DATA, "--topk", "1", "--out", out],
    "fidelity": lambda w, out: ["fidelity", "--from", w / "run", *DATA, "--out", out],
    "report": lambda w, out: ["report", w / "experiment", "--out", out],
    "data cache": lambda w, out: ["data", "cache", "--data", "synthetic:classes=2,n=8,n_val=4", "--size", "16",
                                  "--out", out],
    "data show": lambda w, out: ["data", "show", "--data", "synthetic", "--out", Path(out) / "grid.png"],
    "bench": lambda w, out: ["bench", "attention", "--out", Path(out) / "bench.json"],
}
TARGETS = {
    "a finished training run": ("run", ("training run", "the output of `vitsweep train`")),
    "an eval output": ("evaluated", ("the output of `vitsweep eval`",)),
    "a sweep experiment": ("experiment", ("a sweep experiment",)),
    "the user's own files": ("mine", ("notes.txt",)),
}
CASES = [(c, t) for c in WRITERS for t in TARGETS
         if not (c == "eval" and t == "an eval output")  # eval's own output: accepted (test below)
         and not (c == "report" and t == "a sweep experiment")  # --out A for A itself: in place (test below)
         and not (c in ("data show", "bench") and t == "the user's own files")]  # a new file beside them is fine


@pytest.mark.parametrize("command,target", CASES)
def test_no_command_writes_into_other_work(work, command, target):
    name, said = TARGETS[target]
    line = refused_in_process(WRITERS[command](work, work / name), work)
    assert str(work / name) in line or repr(str(work / name)) in line, line
    assert any(s in line for s in said), line


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_dangling_symlink_out_is_refused_in_one_line(work, tmp_path, command):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    target = link if command not in ("data show", "bench") else tmp_path / "f"
    if command in ("data show", "bench"):  # the file itself is the dangling link
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / ("grid.png" if command == "data show" else "bench.json")).symlink_to(tmp_path / "nowhere")
    refused_in_process(WRITERS[command](work, target), tmp_path, "symbolic link")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["train", "eval", "fidelity", "report", "data cache"])
def test_an_out_that_links_to_an_empty_directory_is_refused(work, tmp_path, command):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    refused_in_process(WRITERS[command](work, tmp_path / "out"), tmp_path, "symbolic link")
    assert not any((tmp_path / "elsewhere").iterdir())


def test_report_into_another_experiment_is_refused_before_anything_is_written(work, tmp_path):
    other = tmp_path / "B"
    shutil.copytree(work / "experiment", other)
    line = refused_in_process(["report", work / "experiment", "--out", other], tmp_path, "a sweep experiment")
    assert str(other) in line


def test_a_second_eval_into_its_own_output_replaces_eval_json_and_says_so(work, tmp_path):
    out = tmp_path / "e"
    assert run_cli(["eval", "--weights", work / "run", *DATA, "--topk", "1", "--out", out])[0] == 0
    marker = json.loads((out / ".vitsweep-output.json").read_text())
    assert marker["kind"] == "eval" and marker["format"] == "vitsweep-output"
    code, err = run_cli(["eval", "--weights", work / "run", *DATA, "--topk", "1", "--out", out])
    assert code == 0 and "replacing the eval.json of the previous eval" in err, err
    assert json.loads((out / "eval.json").read_text())["metrics"]


def test_train_resume_refuses_a_symlinked_checkpoint_and_changes_nothing(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    victim = tmp_path / "victim"
    shutil.copytree(work / "run" / "checkpoint", victim)
    shutil.rmtree(run / "checkpoint")
    (run / "checkpoint").symlink_to(victim)
    line = refused_in_process(["train", "--out", run, "--resume", *TRAIN, "--epochs", "2"], tmp_path, "symbolic link")
    assert "checkpoint" in line


def test_no_zero_byte_file_under_a_final_name_after_a_finished_train(work):
    for p in (work / "run").rglob("*"):
        if p.is_file() and p.name in ("weights.safetensors", "result.json", "weights.json", ".vitsweep-output.json"):
            assert p.stat().st_size > 0, p
    assert not list((work / "run").rglob("*.tmp")), "a temporary file was left"


def _train_proc(out: Path, seed: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "--out", str(out), *TRAIN,
                             "--seed", str(seed), "--epochs", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


@pytest.mark.slow
def test_two_trains_into_one_out_started_together_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_train_proc(out, seed, log) for seed, log in zip((1, 2), logs)]
    codes = [p.wait(timeout=900) for p in procs]
    errs = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 2], (codes, [e[-2000:] for e in errs])
    loser = errs[codes.index(2)]
    assert "Traceback" not in loser and ("in use by another `vitsweep train`" in loser or "already holds" in loser), loser
    winner_seed = (1, 2)[codes.index(0)]
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["seed"] == winner_seed and result["status"] == "finished"
    assert not list(tmp_path.glob(".*.vitsweep-train.lock")), "the lock was left behind"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".vitsweep-output.json", "checkpoint", "preprocessing.json", "result.json", "tb", "weights.json",
         "weights.safetensors"])


def test_a_live_train_lock_refuses_a_second_train_naming_the_holder(tmp_path):
    """The lock itself, deterministically: a live holder (this test's own child process) refuses."""
    from orchestrator.train_cli import lock_out_dir

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_out_dir(tmp_path / "out")
        data = json.loads(Path(lock.path).read_text())
        lock.release()
        data.update(pid=sleeper.pid, pid_start=None)
        Path(lock.path).write_text(json.dumps(data))
        before = tree_hash(tmp_path)
        code, err = run_cli(["train", "--out", tmp_path / "out", *TRAIN])
        assert code == 2 and f"pid {sleeper.pid}" in err and "in use by another `vitsweep train`" in err, err
        assert tree_hash(tmp_path) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.1)
    code, err = run_cli(["train", "--out", tmp_path / "out", *TRAIN])  # a dead holder's lock is taken over
    assert code == 0, err
