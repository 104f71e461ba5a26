"""Hostile input to the sweep driver (`vitsweep run | resume | report`), generated per class
(hypothesis), through the real command line in-process. No test here starts Ray.

Every refused case must: exit 2, print no traceback, end stderr with one error line that names the
offending key or value, create or change no file (the whole temporary directory, any earlier
experiment included, is hashed before and after), and leave Ray uninitialised with no Ray process
started by this process. Classes: experiment names and variant labels (path separators, '..'), metric
names no trial reports, mode, non-finite and out-of-range numbers on the command line and in
resources, wrong YAML types in the sweep's own keys, hostile ``--set`` values (alias bombs, nesting),
unreachable or malformed ``--address``, a ``--storage`` that is a file, an existing experiment under
``run`` (and one held by a live driver under ``run --overwrite`` and ``resume``), and a stale lock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.lock import LOCK_NAME, ExperimentLock
from orchestrator.preflight import check_new_experiment
from orchestrator.storage import resolve_storage
from test_hostile_input import FEW, NON_FINITE, SETTINGS, SWEEP_FIXED, _alias_bomb, file_trees, refused, scratch
from test_hostile_input import snapshot

REPO = Path(__file__).resolve().parents[1]
FIXED = {**SWEEP_FIXED, "topk": [1, 2], "num_workers": 0, "augment": "none", "batch_size": 4}
SAFE = st.characters(codec="ascii", categories=["Ll", "Lu", "Nd"])


def _ray_children() -> list:
    """Ray server processes whose parent is this process (a local instance started here)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            if int(stat[stat.rindex(")") + 2:].split()[1]) == os.getpid() and name in ("raylet", "gcs_server"):
                found.append(name)
    return found


def sweep_refused(capsys, argv, *fragments, root: Path) -> str:
    last = refused(capsys, argv, *fragments, root=root)
    assert not _ray_children(), "a Ray instance was started"
    return last


def _yaml(root: Path, mapping) -> Path:
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def run_argv(root: Path, config: Path, *extra):
    return ["run", "--config", config, "--storage", root / "storage", "--num-cpus", "1", *extra]


# ----------------------------------------------------------------------------- names and labels
@st.composite
def bad_names(draw):
    """Names that would leave one directory level: separators, '..', '.', leading '.', blanks."""
    head = draw(st.text(SAFE, max_size=5))
    tail = draw(st.text(SAFE, max_size=5))
    kind = draw(st.sampled_from(["sep", "dotdot", "dot", "blank", "control"]))
    if kind == "sep":
        return head + draw(st.sampled_from(["/", "\\", "/../", "//"])) + tail
    if kind == "dotdot":
        return draw(st.sampled_from(["..", "../" + tail, head + "/..", "../../" + tail]))
    if kind == "dot":
        return "." + tail
    if kind == "blank":
        return draw(st.text(" \t", min_size=1, max_size=3)) + head
    return head + draw(st.sampled_from(["\n", "\x00", "\x7f", "\t"])) + tail


@SETTINGS
@given(name=bad_names(), where=st.sampled_from(["flag", "yaml"]))
def test_experiment_names_that_leave_the_storage(capsys, name, where):
    with scratch() as root:
        if where == "flag":
            config = _yaml(root, {"fixed": FIXED})
            sweep_refused(capsys, run_argv(root, config, f"--name={name}"), f"--name={name!r}", root=root)
        else:
            config = _yaml(root, {"name": name, "fixed": FIXED})
            sweep_refused(capsys, run_argv(root, config), f"name={name!r}", root=root)


@st.composite
def bad_labels(draw):
    """Labels with a path separator or a control character, '.', '..', blank, or not text."""
    kind = draw(st.sampled_from(["sep", "dots", "control", "blank", "type"]))
    head, tail = draw(st.text(SAFE, max_size=5)), draw(st.text(SAFE, max_size=5))
    if kind == "sep":
        return head + draw(st.sampled_from(["/", "\\", "/../", "../"])) + tail
    if kind == "dots":
        return draw(st.sampled_from([".", "..", " .. "]))
    if kind == "control":
        return head + draw(st.sampled_from(["\n", "\x00", "\x7f", "\t", "\r"])) + tail
    if kind == "blank":
        return draw(st.text(" ", min_size=1, max_size=3))
    return draw(st.integers() | st.lists(st.integers(), min_size=1, max_size=2) | st.booleans().filter(bool))


@SETTINGS
@given(label=bad_labels())
def test_variant_labels_with_path_separators(capsys, label):
    with scratch() as root:
        config = _yaml(root, {"fixed": FIXED, "variants": [{"variant": "softmax", "label": label}]})
        sweep_refused(capsys, run_argv(root, config), f"variants[0].label={label!r}", root=root)


# ------------------------------------------------------------------------------- metric and mode
@st.composite
def unreported_metric(draw):
    kind = draw(st.sampled_from(["acc", "swap", "text", "near"]))
    if kind == "acc":  # a top-k the trials do not compute (topk: [1, 2])
        return f"val/acc{draw(st.integers(3, 10**6))}"
    if kind == "swap":  # without eval_at_start there is no swap/ metric
        return f"swap/acc{draw(st.integers(1, 2))}"
    if kind == "near":
        return draw(st.sampled_from(["val/acc", "acc1", "val/accuracy", "train/acc1", "val/loss ", "VAL/ACC1",
                                     "memory/peak_allocated_mb", "throughput/mfu"]))  # memory, mfu: CUDA only
    return draw(st.text(min_size=1, max_size=12).filter(lambda t: t.strip() and "/" not in t))


@FEW
@given(metric=unreported_metric(), mode=st.sampled_from(["max", "min"]))
def test_a_metric_no_trial_reports(capsys, metric, mode):
    with scratch() as root:
        config = _yaml(root, {"fixed": {**FIXED, "device": "cpu"}, "metric": metric, "mode": mode})
        last = sweep_refused(capsys, run_argv(root, config), f"metric={metric!r}", root=root)
        assert "val/acc2" in last  # the message lists what is reported


@SETTINGS
@given(mode=st.text(max_size=6).filter(lambda m: m not in ("max", "min")) | st.integers() | st.booleans()
       | st.sampled_from(["MAX", "Min", "maximum", "max "]))
def test_a_mode_other_than_max_or_min(capsys, mode):
    with scratch() as root:
        config = _yaml(root, {"fixed": FIXED, "mode": mode})
        sweep_refused(capsys, run_argv(root, config), f"mode={mode!r}", root=root)


# ------------------------------------------------------------------- numbers on the command line
RESOURCE_FLAGS = ["--cpus-per-trial", "--gpus-per-trial", "--num-cpus", "--num-gpus"]


@SETTINGS
@given(flag=st.sampled_from(RESOURCE_FLAGS),
       value=NON_FINITE | st.floats(-1e9, 0, exclude_max=True).map(repr) | st.integers(-10**9, -1).map(str))
def test_non_finite_or_negative_resource_flags(capsys, flag, value):
    with scratch() as root:
        argv = run_argv(root, _yaml(root, {"fixed": FIXED}))
        argv = [a for a in argv if a not in ("--num-cpus", "1")] + [f"{flag}={value}"]
        sweep_refused(capsys, argv, flag, root=root)


COUNT_FLAGS = {"--max-concurrent": ("max_concurrent", st.integers(-10**9, 0)),
               "--num-samples": ("num_samples", st.integers(-10**9, 0) | st.integers(100_001, 10**12)),
               "--max-failures": ("max_failures", st.integers(-10**9, -2))}


@FEW
@given(data=st.data(), flag=st.sampled_from(sorted(COUNT_FLAGS)))
def test_out_of_range_counts_on_the_command_line(capsys, data, flag):
    key, values = COUNT_FLAGS[flag]
    value = data.draw(values)
    with scratch() as root:
        sweep_refused(capsys, run_argv(root, _yaml(root, {"fixed": FIXED}), f"{flag}={value}"), f"{key}={value}",
                      root=root)


@FEW
@given(key=st.sampled_from(["cpu", "gpu"]), value=st.sampled_from([".nan", ".inf", "-.inf", ".NaN", "1e999", "-1"]))
def test_non_finite_resources_in_the_sweep_file(capsys, key, value):
    with scratch() as root:
        path = root / "sweep.yaml"
        path.write_text(yaml.safe_dump({"fixed": FIXED}) + f"resources:\n  {key}: {value}\n")
        sweep_refused(capsys, run_argv(root, path), f"{key}s per trial=", root=root)


# --------------------------------------------------------------------- wrong types, sweep keys
TEXT = st.text(max_size=6)
LISTS = st.lists(st.integers(0, 5), min_size=1, max_size=3)
MAPS = st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=1, max_size=2)
STRING_BOOLS = st.sampled_from(["true", "false", "yes", "no", "on", "1", "0"])
INT_WRONG = TEXT | STRING_BOOLS | st.booleans() | LISTS | MAPS | st.floats(allow_nan=False).filter(lambda f: f != int(f) if f == f and abs(f) < 1e300 else True)
# key path -> (wrong values, what the message names)
SWEEP_TYPES = {
    ("seeds",): (TEXT | STRING_BOOLS | MAPS | st.lists(TEXT | st.booleans() | st.floats(0.5, 9.5), min_size=1, max_size=2)
                 | st.integers(-10**9, -1) | st.just([]) | st.just([2**32]), "seeds="),
    ("num_samples",): (INT_WRONG, "num_samples="),
    ("max_failures",): (INT_WRONG, "max_failures="),
    ("max_concurrent",): (INT_WRONG, "max_concurrent="),
    ("num_to_keep",): (INT_WRONG, "num_to_keep="),
    ("reuse_actors",): (STRING_BOOLS | st.integers() | LISTS | MAPS, "reuse_actors="),
    ("asha", "grace_period"): (INT_WRONG, "asha.grace_period="),
    ("asha", "reduction_factor"): (INT_WRONG, "asha.reduction_factor="),
    ("asha", "max_t"): (INT_WRONG, "asha.max_t="),
    ("asha",): (TEXT.filter(bool) | LISTS | st.integers(), "asha must be a mapping"),
    ("resources",): (TEXT.filter(bool) | LISTS | st.integers(), "resources must be a mapping"),
    ("resources", "cpu"): (TEXT | STRING_BOOLS | st.booleans() | LISTS | MAPS, "cpus per trial="),
    ("resources", "gpu"): (TEXT | STRING_BOOLS | st.booleans() | LISTS | MAPS, "gpus per trial="),
    ("metric",): (st.integers() | st.booleans() | LISTS | MAPS, "metric="),
    ("searcher",): (st.integers() | st.booleans() | LISTS | TEXT.filter(lambda t: t not in ("grid", "random", "optuna")),
                    "searcher="),
    ("scheduler",): (st.integers() | st.booleans() | LISTS | TEXT.filter(lambda t: t not in ("fifo", "asha")),
                     "scheduler="),
    ("name",): (st.integers(min_value=1) | st.booleans().filter(bool) | LISTS | MAPS, "name="),
    ("variants",): (TEXT.filter(bool) | st.integers() | MAPS | st.just([]), "variants"),
}


@SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(SWEEP_TYPES)))
def test_wrong_types_in_the_sweeps_own_keys(capsys, data, key):
    values, fragment = SWEEP_TYPES[key]
    value = data.draw(values)
    doc = {"fixed": FIXED, "scheduler": "asha"} if key[0] == "asha" else {"fixed": FIXED}
    if len(key) == 1:
        doc[key[0]] = value
    else:
        doc[key[0]] = {key[1]: value}
    with scratch() as root:
        sweep_refused(capsys, run_argv(root, _yaml(root, doc)), fragment, root=root)


# ----------------------------------------------------------------------------------------- --set
@SETTINGS
@given(kind=st.sampled_from(["alias", "deep"]), levels=st.integers(2, 9), fanout=st.integers(2, 9),
       depth=st.integers(33, 2000))
def test_hostile_set_values(capsys, kind, levels, fanout, depth):
    if kind == "alias":
        value, fragment = "{" + _alias_bomb(levels, fanout).replace("\n", ", ").rstrip(", ") + "}", "aliases"
    else:
        value, fragment = "[" * depth + "1" + "]" * depth, "nesting deeper"
    with scratch() as root:
        sweep_refused(capsys, run_argv(root, _yaml(root, {"fixed": FIXED}), "--set", f"epochs={value}"),
                      "--set epochs", fragment, root=root)


# ------------------------------------------------------------------------------------- --address
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@st.composite
def bad_address(draw):
    kind = draw(st.sampled_from(["closed", "closed-client", "malformed", "scheme"]))
    if kind == "closed":
        return f"127.0.0.1:{_closed_port()}", "cannot connect"
    if kind == "closed-client":
        return f"ray://127.0.0.1:{_closed_port()}", "cannot connect"
    if kind == "scheme":
        return f"{draw(st.sampled_from(['http', 'grpc', 'tcp']))}://127.0.0.1:{_closed_port()}", "ray://"
    port = draw(st.sampled_from(["", "abc", "0", "65536", "-1", "1.5"]))
    return f"{draw(st.sampled_from(['127.0.0.1', 'localhost', 'h']))}:{port}", "HOST:PORT"


@FEW
@given(case=bad_address())
def test_an_unreachable_or_malformed_address_fails_fast(capsys, case, monkeypatch):
    address, fragment = case
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with scratch() as root:
        start = time.monotonic()
        sweep_refused(capsys, run_argv(root, _yaml(root, {"fixed": FIXED}), "--address", address),
                      f"--address {address!r}", fragment, root=root)
        assert time.monotonic() - start < 30


def test_an_address_that_does_not_answer_is_given_up_within_the_bound(capsys, monkeypatch):
    """A TCP connect that hangs (here: a listening socket that never accepts, its backlog full)."""
    import orchestrator.preflight as preflight

    monkeypatch.setattr(preflight, "ADDRESS_TIMEOUT_S", 1.0)
    monkeypatch.setattr(preflight.socket, "create_connection",
                        lambda *a, timeout=None, **k: (time.sleep(timeout), (_ for _ in ()).throw(socket.timeout()))[1])
    with scratch() as root:
        start = time.monotonic()
        sweep_refused(capsys, run_argv(root, _yaml(root, {"fixed": FIXED}), "--address", "10.255.255.1:6379"),
                      "did not answer within", root=root)
        assert time.monotonic() - start < 20


# ------------------------------------------------------------------------------------- --storage
@FEW
@given(content=st.binary(max_size=64), under=st.booleans())
def test_a_storage_that_is_a_file(capsys, content, under):
    with scratch() as root:
        config = _yaml(root, {"fixed": FIXED})
        (root / "storage").write_bytes(content)
        argv = run_argv(root, config)
        if under:
            argv[argv.index("--storage") + 1] = root / "storage" / "sub"
        sweep_refused(capsys, argv, "storage", root=root)


# ------------------------------------------------------------------------- an existing experiment
@FEW
@given(tree=file_trees, hidden=st.booleans())
def test_run_into_an_existing_experiment_is_refused_byte_identical(capsys, tree, hidden):
    with scratch() as root:
        exp = root / "storage" / "exp"
        exp.mkdir(parents=True)
        for name, content in tree.items():
            (exp / (("." if hidden else "") + name)).write_bytes(content)
        last = sweep_refused(capsys, run_argv(root, _yaml(root, {"fixed": FIXED}), "--name", "exp"),
                             "already exists", "vitsweep resume", "--overwrite", root=root)
        assert str(exp) in last


def test_overwrite_moves_an_experiment_aside_and_never_a_running_one(tmp_path):
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    (exp_dir / "comparison.md").write_text("the first sweep")
    exp = resolve_storage(exp_dir)
    moved = check_new_experiment(exp, overwrite=True)
    assert moved and Path(moved).name.startswith("exp.old-") and (Path(moved) / "comparison.md").read_text() == "the first sweep"
    assert not exp_dir.exists()
    exp_dir.mkdir()
    (exp_dir / "x").write_text("running")
    with ExperimentLock(exp, "run"):
        with pytest.raises(Exception, match=r"being run by another driver: host .*pid " + str(os.getpid())):
            check_new_experiment(exp, overwrite=True)
    assert (exp_dir / "x").read_text() == "running"


# -------------------------------------------------------------------------------------- the lock
_HOLDER = """
import sys, time
from orchestrator.lock import ExperimentLock
from orchestrator.storage import resolve_storage
lock = ExperimentLock(resolve_storage(sys.argv[1]), "run").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _fake_experiment(exp: Path) -> None:
    """A directory that passes `read_marker` (its spec is the tiny sweep's)."""
    from search_spaces import load_sweep

    spec = load_sweep({"fixed": FIXED}).spec
    exp.mkdir(parents=True)
    (exp / "vitsweep_experiment.json").write_text(json.dumps(
        {"format": "vitsweep-experiment", "spec": spec.to_dict(), "validated": True,
         "trainable": "trainables.finetune_trainable:train_vit"}))
    (exp / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (exp / "experiment_state-2000-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))


def test_a_second_driver_is_refused_while_another_process_holds_the_lock(capsys, tmp_path):
    exp = tmp_path / "storage" / "exp"
    _fake_experiment(exp)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(exp)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        config = _yaml(tmp_path, {"fixed": FIXED})
        sweep_refused(capsys, ["resume", exp, "--num-cpus", "1"], "in use by another driver",
                      f"pid {holder.pid}", socket.gethostname(), "since", root=tmp_path)
        sweep_refused(capsys, ["run", "--config", config, "--storage", tmp_path / "storage", "--name", "exp",
                               "--num-cpus", "1", "--overwrite"], "being run by another driver", f"pid {holder.pid}",
                      root=tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    exp = resolve_storage(tmp_path / "exp")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "pid_start": 1, "since": "2000-01-01T00:00:00+00:00",
         "heartbeat": 0, "command": "run", "token": "old"}))
    with ExperimentLock(exp, "resume") as lock:
        held = json.loads((tmp_path / "exp" / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.token
    assert f"pid {dead.pid}" in caplog.text and "stale" in caplog.text
    assert not (tmp_path / "exp" / LOCK_NAME).exists()


def test_a_reused_pid_and_another_hosts_old_heartbeat_are_stale(tmp_path):
    exp = resolve_storage(tmp_path)
    lock = ExperimentLock(exp, "run", stale_after_s=60)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "heartbeat": time.time()}
    assert lock.holder_alive({**me, "pid_start": None})
    assert not lock.holder_alive({**me, "pid_start": -5})  # same pid, another start time: reused
    other = {"host": "elsewhere", "pid": 1, "token": "t"}
    assert lock.holder_alive({**other, "heartbeat": time.time() - 10})
    assert not lock.holder_alive({**other, "heartbeat": time.time() - 61, "_mtime": time.time() - 61})
