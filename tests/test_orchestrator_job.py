"""`ray job submit -- vitsweep run --preset smoke` against a real local head (``ray start --head``),
with the dashboard and job server bound to 127.0.0.1. Needs ray[default] (the `dashboard` extra)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("ray.dashboard") is None,
        reason="needs ray[default] (dashboard and job server): pip install 'vitsweep[dashboard]'",
    ),
]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_job_server(port: int, head: subprocess.Popen, timeout: float = 180) -> None:
    """Until the job server answers (the client handles Ray's token authentication)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            JobSubmissionClient(f"http://127.0.0.1:{port}").list_jobs()
            return
        except (ConnectionError, RuntimeError) as err:  # not up yet
            last = err
            time.sleep(2)
    raise AssertionError(f"the job server did not come up on 127.0.0.1:{port}: {last}")


def test_job_submit_runs_the_smoke_preset_on_a_local_head(tmp_path, monkeypatch):
    gcs, dashboard, client, agent_http, agent_grpc, metrics = _free_ports(6)
    # A throwaway head reachable on 127.0.0.1 only: Ray's token authentication is switched off for it
    # (and for this client) rather than reading any token file.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    # A private temp dir (short: it holds Unix sockets) keeps this head's address file away from
    # /tmp/ray, where a later ray.init() in another test would find it.
    temp_dir = tempfile.mkdtemp(prefix="vsray", dir="/tmp")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(gcs),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics)],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_job_server(dashboard, head)
        storage = tmp_path / "results"
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}}
        job = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", "orchestrator.cli_sweep", "run", "--preset", "smoke", "--storage", str(storage),
             "--name", "job", "--set", "data=synthetic:classes=5,size=32,n=40,n_val=20", "--set", "epochs=1",
             "--set", "batch_size=20", "--set", "depth=2"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout
        exp = storage / "job"
        with (exp / "comparison.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(r["variant"] for r in rows) == ["atrous_linear", "linformer", "nystrom", "performer", "softmax"]
        assert all(r["status"] == "finished" for r in rows), rows
        assert "tensorboard --logdir" in job.stdout
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
