"""The sweep as the Ray dashboard shows it (docs/dashboard.md).

- A real local sweep started with ``vitsweep run --metrics-export-port PORT``: while it trains, its node's
  Prometheus endpoint http://127.0.0.1:PORT/metrics holds ``ray_vitsweep_*`` gauges tagged with each
  trial; that port, like every socket of the sweep's Ray, listens on loopback only; the trials' log lines
  on the console carry their labels.
- ``vitsweep submit`` to a real local head: the job's submission id starts with the experiment name, and
  its metadata comes back through Ray's `JobSubmissionClient`, ``ray job list`` and the dashboard's REST
  endpoint ``/api/jobs/``.
- Bad ports are refused with exit 2 and one line, before Ray starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from fixtures_ray_cluster import _decode_ip, free_ports
from orchestrator.cli import main
from orchestrator.monitoring import check_metrics_port, job_metadata, submission_id
from orchestrator.submit import source_of

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
needs_dashboard = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("ray.dashboard") is None,
    reason="needs ray[default] (metrics agent, job server): pip install 'vitsweep[dashboard]'",
)
CONFIG = """
name: live
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
  data: "synthetic:classes=5,size=32,n=100,n_val=20"
  epochs: 3
  batch_size: 10
  log_interval: 2
  warmup_epochs: 0.5
search:
  lr: {grid: [0.001, 0.002]}
resources: {cpu: 1, gpu: 0}   # both trials at once on 2 CPUs
"""
_LINE = re.compile(r"^(ray_vitsweep_\w+)\{(.*)\} (\S+)$")
_TAG = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _in_process(argv) -> tuple:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue(), out.getvalue()


def scrape(port: int) -> list:
    """(metric, tags, value) of every ``ray_vitsweep_*`` sample on the endpoint ([] if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return []
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            samples.append((match.group(1), dict(_TAG.findall(match.group(2))), float(match.group(3))))
    return samples


def session_listeners(sid: int) -> set:
    """(IP, port) of every TCP socket in LISTEN state held by a process of session `sid`."""
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
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                hex_ip, hex_port = cols[1].split(":")
                found.add((_decode_ip(hex_ip, width), int(hex_port, 16)))
    return found


# ------------------------------------------------------------------------------------ bad input, fast
@pytest.mark.parametrize("value, message", [
    ("abc", "is not a port number"), ("8080.5", "is not a port number"), ("-1", "is not a port number"),
    ("80", "out of range"), ("65536", "out of range"), ("99999999999999999999", "out of range"),
])
def test_a_bad_metrics_port_is_refused_in_one_line(value, message):
    import ray

    code, err, _ = _in_process(["run", "--preset", "smoke", "--metrics-export-port", value])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not ray.is_initialized()


def test_a_metrics_port_in_use_or_on_a_cluster_is_refused():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        code, err, _ = _in_process(["run", "--preset", "smoke", "--metrics-export-port", port])
        assert code == 2 and f"--metrics-export-port {port} is in use on 127.0.0.1" in err, err
    free = free_ports(1)[0]
    assert check_metrics_port(str(free)) == free and check_metrics_port(None) is None
    code, err, _ = _in_process(["run", "--preset", "smoke", "--address", "127.0.0.1:9", "--metrics-export-port", free])
    assert code == 2 and "applies to a local Ray instance only" in err and "ray start --metrics-export-port" in err, err
    code, err, _ = _in_process(["submit", "--address", "http://127.0.0.1:9", "--storage", "/tmp/x", "--",
                                "--preset", "smoke", "--metrics-export-port", free])
    assert code == 2 and "--metrics-export-port is set by `vitsweep submit` (or belongs to the cluster)" in err, err


def test_submission_ids_and_metadata():
    sid = submission_id("smoke-20261207-231500")
    assert re.fullmatch(r"smoke-20261207-231500-[0-9a-f]{8}", sid)
    assert submission_id("x") != submission_id("x")  # a second submission of the same name does not clash
    assert re.fullmatch(r"a_b_c-[0-9a-f]{8}", submission_id("a b/../c"))  # only [A-Za-z0-9_-]
    assert len(submission_id("n" * 300)) <= 48 + 9
    meta = job_metadata("exp", "s3://bucket/prefix/exp", "preset:smoke")
    assert meta["vitsweep_experiment"] == "exp" and meta["vitsweep_storage"] == "s3://bucket/prefix/exp"
    assert meta["vitsweep_source"] == "preset:smoke" and meta["vitsweep_version"]
    assert all(isinstance(v, str) for v in meta.values())
    assert source_of(["--set", "epochs=1", "--preset", "smoke"]) == "preset:smoke"
    assert source_of(["--config=sweeps/a.yaml"]) == "config:sweeps/a.yaml"


def test_outside_a_trial_nothing_is_published():
    """`vitsweep train` and unit tests run the report callback's hooks without a Tune trial: no-ops."""
    from trainables import ray_metrics

    assert ray_metrics.publish_epoch("softmax", None, {"epoch": 1, "val/acc1": 0.5}) == 0
    assert ray_metrics.publish_step("softmax", None) is False
    assert ray_metrics.announce_trial("softmax", None) is None
    assert ray_metrics.gauge_name("val/acc1") == "vitsweep_val_acc1"
    assert ray_metrics.gauge_name("time/data_wait_frac") == "vitsweep_data_wait_frac"
    assert ray_metrics.run_label_of("/r/e/linformer_k=64_seed1_ab12c_00003", "ab12c_00003", "linformer") == \
        "linformer_k=64_seed1"
    assert ray_metrics.run_label_of("/r/e/train_vit_ab12c_00003_0_lr=0.1", "ab12c_00003", "x") == "x"


def test_the_grafana_dashboard_has_a_panel_per_gauge():
    from trainables.ray_metrics import EPOCH_GAUGES, STEP_GAUGES, gauge_name

    board = json.loads((REPO / "docs" / "grafana-vitsweep.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for key in [*EPOCH_GAUGES, *STEP_GAUGES]:
        name = "ray_" + gauge_name(key)
        assert sum(re.search(rf"\b{name}\{{", e) is not None for e in exprs) == 1, name
    assert all("by (trial_id, label)" in e for e in exprs)  # one line per trial


# ------------------------------------------------------------------------------ a live sweep, scraped
@pytest.mark.slow
@needs_dashboard
def test_a_running_sweep_exports_its_trials_on_loopback(tmp_path):
    port = free_ports(1)[0]
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    # Ray's report interval (10 s by default) lowered so the test sees the values soon.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), RAY_metrics_report_interval_ms="1000",
               # A loaded shared machine starts the node's agent slowly; the raylet waits for the metrics
               # agent's port file this long before it gives up (and `ray.init` fails "timed out during startup").
               RAY_agent_register_timeout_ms="300000", RAY_raylet_start_wait_time_s="300")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", config, "--storage", tmp_path / "results",
         "--name", "live", "--num-cpus", "2", "--metrics-export-port", str(port)],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict = {}
    listeners: set = set()
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            samples = scrape(port)
            for metric, tags, value in samples:
                seen.setdefault(metric, {})[tags.get("trial_id")] = (tags, value)
            if len(seen.get("ray_vitsweep_epoch", {})) == 2 and len(seen.get("ray_vitsweep_train_loss", {})) == 2:
                listeners = session_listeners(driver.pid)  # while it runs
                running = driver.poll() is None
                break
            time.sleep(1)
        else:
            running = False
        assert running, f"no two trials' gauges while the sweep ran; seen {sorted(seen)}\n{log.read_text()[-3000:]}"
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = log.read_text()
    epochs = seen["ray_vitsweep_epoch"]
    assert all(value >= 1 for _, value in epochs.values())
    labels = {tags["label"] for tags, _ in epochs.values()}
    assert labels == {"softmax_lr=0.001_seed0", "softmax_lr=0.002_seed0"}, labels
    for tags, _ in epochs.values():
        assert tags["experiment"] == "live" and tags["variant"] == "softmax"
    for metric in ("ray_vitsweep_val_acc1", "ray_vitsweep_train_img_s", "ray_vitsweep_step"):
        assert set(seen.get(metric, {})) == set(epochs), (metric, seen.get(metric))
    assert all(0.0 <= v <= 1.0 for _, v in seen["ray_vitsweep_val_acc1"].values())
    # The port, and every other socket of the sweep's Ray, listens on loopback only.
    assert {ip for ip, p in listeners if p == port} == {"127.0.0.1"}, listeners
    assert {ip for ip, _ in listeners} <= LOOPBACK, listeners
    assert f"metrics:    http://127.0.0.1:{port}/metrics" in text
    # The trials' log lines on the console carry their labels (Ray's actor-name log prefix).
    for trial_id, (tags, _) in epochs.items():
        assert re.search(rf"\({re.escape(tags['label'])} {trial_id} pid=\d+\)", text), (trial_id, text[-3000:])


# ------------------------------------------------------------------------- a submitted job's metadata
@pytest.mark.slow
@needs_dashboard
def test_submit_names_the_job_after_the_experiment(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from test_orchestrator_job import RAY, _wait_for_job_server

    gcs, dashboard, client_port, agent_http, agent_grpc, metrics, dash_metrics = free_ports(7)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway head on loopback, no token
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", DASHBOARD_METRIC_PORT=str(dash_metrics))
    temp_dir = tempfile.mkdtemp(prefix="vsdash", dir="/tmp")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "1", "--num-gpus", "0",
         "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_port),
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics)],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(dashboard, head)
        storage = tmp_path / "results"
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "submit", "--address", url, "--storage", str(storage),
             "--name", "dash-job", "--working-dir", str(REPO), "--env", "HF_HUB_OFFLINE=1",
             "--env", "RAY_AUTH_MODE=disabled", "--", "--preset", "smoke", "--set", "epochs=1",
             "--set", "data=synthetic:classes=5,size=32,n=20,n_val=10", "--set", "batch_size=10", "--set", "depth=1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        job_id = re.search(r"^job:\s+(\S+)$", done.stdout, re.M).group(1)
        assert re.fullmatch(r"dash-job-[0-9a-f]{8}", job_id), job_id
        expected = {"vitsweep_experiment": "dash-job", "vitsweep_storage": str(storage / "dash-job"),
                    "vitsweep_source": "preset:smoke"}
        info = JobSubmissionClient(url).get_job_info(job_id)
        assert info.submission_id == job_id
        assert {k: info.metadata.get(k) for k in expected} == expected, info.metadata
        from finetune import __version__
        assert info.metadata["vitsweep_version"] == __version__
        # The dashboard's REST endpoint (what its Jobs page reads) and `ray job list`.
        with urllib.request.urlopen(f"{url}/api/jobs/", timeout=30) as resp:
            rest = {j.get("submission_id"): j for j in json.loads(resp.read())}
        assert {k: rest[job_id]["metadata"].get(k) for k in expected} == expected, rest.get(job_id)
        listed = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True,
                                timeout=120)
        assert job_id in listed.stdout and "vitsweep_storage" in listed.stdout, listed.stdout[-2000:]
        client = JobSubmissionClient(url)
        client.stop_job(job_id)  # its sweep is not what this test is about
        deadline = time.time() + 120
        while client.get_job_status(job_id) not in {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}:
            assert time.time() < deadline, "the job did not stop"
            time.sleep(1)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_console_and_the_report_name_each_trials_worker(tmp_path):
    """The console's ``pid`` column and the report's "Trials in the Ray dashboard" table: label, trial id,
    PID and node, from Tune's results."""
    from types import SimpleNamespace

    from orchestrator.console import SweepReporter
    from orchestrator.report import dashboard_lines
    from orchestrator.results import TrialRecord

    config = {"arch": {"variant": "softmax", "_label": "softmax"}, "seed": 0}
    trial = SimpleNamespace(config=config, status="RUNNING", trial_id="a1b2c_00000", evaluated_params={},
                            last_result={"epoch": 1, "val/acc1": 0.5, "pid": 4242, "node_ip": "127.0.0.1"})
    text = SweepReporter().render([trial])
    header, row = text.splitlines()[1], text.splitlines()[2]
    assert header.split()[-1] == "pid" and row.split()[-1] == "4242", text
    record = TrialRecord(trial_id="a1b2c_00000", path=tmp_path / "softmax_seed0_a1b2c_00000", label="softmax",
                         config=config, status="TERMINATED", history=[{"pid": 4242, "node_ip": "127.0.0.1"}])
    lines = dashboard_lines([record])
    assert lines[0] == "## Trials in the Ray dashboard" and "| softmax_seed0 | `a1b2c_00000` | 4242 | 127.0.0.1 |" in lines
    assert dashboard_lines([TrialRecord("x", tmp_path, "softmax", {}, "ERROR")]) == []  # no result: no section
