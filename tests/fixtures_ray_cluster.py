"""A two-node Ray cluster on this machine: a head and one worker, each its own ``ray start --block``
process tree (GCS, raylet, agents), listening on 127.0.0.1 only, 1 CPU and 100 MiB of object store
each, every port picked free (two clusters on this shared machine do not collide).

Import into a test module (``from fixtures_ray_cluster import ray_cluster``), or start one cluster for a
whole module with ``local_cluster(directory, dashboard=True, auth_token=...)`` (a context manager) in a
module-scoped fixture. Custom resources
``head_node`` and ``worker_node`` (1 each) let a test place a task or trial on either node.
``node_ids`` maps "head"/"worker" to Ray node ids; ``worker_raylet_pid()`` is the worker raylet's PID,
for a node-loss test to kill; ``run_driver(script)`` runs a driver (a Tune run, ``vitsweep run``...)
in its own process, with RAY_ADDRESS set.

Drivers run in their own processes, not in pytest's: with Ray 2.60, a process that already ran a Ray
session with an actor (any earlier Ray test in the same pytest run) and then connects to an existing
cluster sees its first actors destroyed at once ("all references to the actor were removed").

Options of `local_cluster`: ``dashboard=True`` starts the dashboard and job server on the head, on
127.0.0.1 and a free port (``LocalCluster.dashboard_url``); ``auth_token`` turns on Ray's token
authentication (``RAY_AUTH_MODE=token``, the token in ``RAY_AUTH_TOKEN``) for both nodes and for drivers
started through ``LocalCluster.env``. The nodes declare a node dead after about 5 s of failed health
checks (Ray's default is about 30 s), so a node-loss test does not wait long.

The nodes inherit the environment at fixture set-up; a test that uses ``s3_bucket`` gets that fixture
set up first, so every node sees the same fake credentials (as real nodes get theirs from their own
environment). A private --temp-dir keeps the cluster's address file out of /tmp/ray, where a plain
``ray.init()`` elsewhere on this shared machine would find it. Teardown stops the two ``ray start``
processes this fixture started, then any process still running from its temp dir, by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

OBJECT_STORE_BYTES = 100 * 1024**2
START_TIMEOUT_S = 120


def _processes() -> Dict[int, tuple]:
    """pid -> (ppid, name, cmdline) from /proc (Linux), for the processes readable now."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or not ours to read
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        table[int(entry)] = (ppid, name, cmdline)
    return table


def _descendants(pid: int) -> List[int]:
    table = _processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (ppid, _, _) in table.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _decode_ip(hex_ip: str, width: int) -> str:
    """/proc/net/tcp{,6} address (host byte order, 32-bit words) -> text."""
    raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
    return socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, raw)


def free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    address: str
    temp_dir: str
    head: subprocess.Popen
    worker: subprocess.Popen
    logs: Path
    env: Dict[str, str] = field(default_factory=dict, repr=False)  # for drivers: RAY_ADDRESS included
    node_ids: Dict[str, str] = field(default_factory=dict)  # "head" / "worker" -> Ray node id
    start_s: float = 0.0  # wall time from the first `ray start` to both nodes alive and connected
    dashboard_url: Optional[str] = None  # the job server, when started with dashboard=True

    def _raylet_pid(self, proc: subprocess.Popen) -> int:
        table = _processes()
        for pid in _descendants(proc.pid):
            if pid in table and table[pid][1] == "raylet":
                return pid
        raise AssertionError(f"no raylet under process {proc.pid}; see {self.logs}")

    def run_driver(self, script: Path, *args: str, timeout: float = 300) -> str:
        """Run `script` as ``__main__`` in a new Python process connected to this cluster (its
        ``ray.init()`` finds RAY_ADDRESS); returns stdout, raises with the output if it fails. Functions
        it defines reach Ray's workers by value."""
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(script), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"driver {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-5000:]}")
        return proc.stdout

    def listening_addresses(self) -> set:
        """The local IPs of every TCP socket in LISTEN state held by this cluster's processes."""
        inodes = set()
        for pid in [self.head.pid, self.worker.pid, *_descendants(self.head.pid), *_descendants(self.worker.pid)]:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited meanwhile
        found = set()
        for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.add(_decode_ip(cols[1].split(":")[0], width))
        return found

    def head_raylet_pid(self) -> int:
        return self._raylet_pid(self.head)

    def worker_raylet_pid(self) -> int:
        return self._raylet_pid(self.worker)


# `ray start`, except that the node IP it detects is 127.0.0.1. Ray replaces a loopback --node-ip-address
# with the address it sees from outside (so that other machines could join), and its servers then
# listen on that interface or on all of them; with loopback as the node IP they listen on 127.0.0.1 only.
_LOOPBACK = ("import sys, ray._private.services as s; "
             "s.node_ip_address_from_perspective = lambda address=None: '127.0.0.1'; ")
_RAY_START_ON_LOOPBACK = _LOOPBACK + "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
# A driver sees the nodes' address as they do.
_DRIVER = _LOOPBACK + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _start(args: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", "--block", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _node_args(resources: Dict[str, float], ports: List[int]) -> List[str]:
    agent, agent_grpc, metrics, runtime_env = ports
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
            "--resources", json.dumps(resources), "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
            "--disable-usage-stats"]


def _stop(procs: List[subprocess.Popen], temp_dirs: tuple) -> None:
    # SIGTERM to `ray start --block` alone: it stops its node's processes in order. Signalling the whole
    # group kills the GCS first, and the raylet then waits half a minute to drain through it.
    for proc in reversed(procs):  # worker first
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Ray daemons may leave the process group; anything still running from this cluster's temp dirs
    # was started by this fixture.
    deadline = time.monotonic() + 10
    while True:
        left = [pid for pid, (_, _, cmdline) in _processes().items() if any(d in cmdline for d in temp_dirs)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray head exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the ray head did not listen on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}")


# Waits for both nodes, then prints {"head": node id, "worker": node id}.
_PROBE = """
import json, time, ray
ray.init(log_to_driver=False)
deadline = time.monotonic() + %d
ids = {}
while len(ids) < 2 and time.monotonic() < deadline:
    for node in ray.nodes():
        for role in ("head", "worker"):
            if node["Alive"] and f"{role}_node" in node["Resources"]:
                ids[role] = node["NodeID"]
    time.sleep(0.5)
print(json.dumps(ids))
""" % START_TIMEOUT_S


def _wait_for_job_server(url: str, env: Dict[str, str], proc: subprocess.Popen, log: Path) -> None:
    """Until the job server answers a client in its own process (with the cluster's auth settings)."""
    probe = ("import sys; from ray.job_submission import JobSubmissionClient; "
             "JobSubmissionClient(sys.argv[1]).list_jobs()")
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray head exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        done = subprocess.run([sys.executable, "-c", probe, url], env=env, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return
        last = done.stderr[-1500:]
        time.sleep(1)
    raise AssertionError(f"the job server did not answer at {url}: {last}\n{log.read_text()[-3000:]}")


@contextmanager
def local_cluster(directory: Path, *, dashboard: bool = False, auth_token: Optional[str] = None) -> Iterator[LocalCluster]:
    """A head and a worker on 127.0.0.1 (see the module docstring); logs in `directory`. Stopped, every
    process it started included, when the block ends, also on failure."""
    directory = Path(directory)
    gcs, client, dashboard_port, dash_metrics, autoscaler_metrics, *ports = free_ports(13)
    # The metrics ports default to fixed numbers (44227, 44217) that another Ray on this machine may hold.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", DASHBOARD_METRIC_PORT=str(dash_metrics),
               AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5")
    if auth_token is None:
        # Token authentication off for this throwaway loopback cluster and its drivers.
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN", None)
    else:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    # Drivers that are not started through run_driver (`vitsweep run --address`, a job's entrypoint, which
    # inherits the head's environment) would otherwise rewrite the loopback address they are given to the
    # machine's outside IP, where nothing listens. Ray's switch for single-machine clusters keeps it; a
    # worker node refuses to start with it, so the worker does not get it.
    loopback_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    temp_dir = tempfile.mkdtemp(prefix="vsrc", dir="/tmp")  # short: it holds Unix sockets
    # The worker's own: each node's runtime-env agent deletes a job's working_dir copy under its temp dir
    # when its own workers are done with it; with one shared dir the worker node would delete the copy
    # that the job's driver on the head is running in.
    worker_temp_dir = tempfile.mkdtemp(prefix="vsrw", dir="/tmp")
    procs: List[subprocess.Popen] = []
    started = time.monotonic()
    dash_args = (["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"] if dashboard
                 else ["--include-dashboard", "false"])
    try:
        head = _start(["--head", "--port", str(gcs), "--temp-dir", temp_dir, *dash_args,
                       "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client),
                       *_node_args({"head_node": 1}, ports[:4])], loopback_env, directory / "head.log")
        procs.append(head)
        _wait_for_port(gcs, head, directory / "head.log")
        address = f"127.0.0.1:{gcs}"
        worker = _start(["--address", address, "--temp-dir", worker_temp_dir, *_node_args({"worker_node": 1}, ports[4:8])],
                        env, directory / "worker.log")
        procs.append(worker)
        cluster = LocalCluster(address=address, temp_dir=temp_dir, head=head, worker=worker, logs=directory,
                               env=dict(loopback_env, RAY_ADDRESS=address))
        probe = directory / "probe_nodes.py"
        probe.write_text(_PROBE)
        cluster.node_ids = json.loads(cluster.run_driver(probe, timeout=START_TIMEOUT_S + 60).strip().splitlines()[-1])
        if len(cluster.node_ids) != 2:
            raise AssertionError(f"the worker node did not join within {START_TIMEOUT_S} s: {cluster.node_ids}; "
                                 f"logs in {directory}")
        if dashboard:
            cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
            # Without RAY_ADDRESS: Ray's job client prefers it to the address it is given.
            client_env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
            _wait_for_job_server(cluster.dashboard_url, client_env, head, directory / "head.log")
        cluster.start_s = time.monotonic() - started
        yield cluster
    finally:
        _stop(procs, (temp_dir, worker_temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(worker_temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(request, tmp_path):
    if "s3_bucket" in request.fixturenames:
        request.getfixturevalue("s3_bucket")  # its environment first: the nodes inherit it
    with local_cluster(tmp_path) as cluster:
        yield cluster
