"""`vitsweep bench storage`: what S3 storage costs a sweep, against local disk, in the same run.

A moto S3 server (the S3 wire protocol, on 127.0.0.1 only, started here and stopped at the end) stands
in for the object store. The smoke preset (cut down by default: 2 blocks, 2 epochs, a small synthetic
set) runs through the real `vitsweep run` path, each run in its own process on a fresh local Ray
instance, alternately with local storage and with the moto URI (interleaved, so that load on a shared
machine hits both alike). Reported: each run's wall time, the medians, and S3 / local.

What the ratio covers: Tune's state, every checkpoint, the artifact sync of each trial's run outputs,
the marker and the report going to the store instead of the disk; plus the report's download of the
small files and its upload. Not covered: a real store's network latency and bandwidth (moto answers
from memory on loopback), so the figure is the client-side overhead, a lower bound for a remote store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.output import check_bench_out, write_bench_json

REPO = Path(__file__).resolve().parents[1]
CUT = ["--set", "depth=2", "--set", "epochs=2", "--set", "data=synthetic:classes=10,size=32,n=400,n_val=100"]


def _moto():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1", host  # never on another interface
    return server, f"127.0.0.1:{port}"


def _run(storage: str, name: str, extra: List[str], env: Dict[str, str], num_cpus: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--preset", "smoke", *extra,
                           "--storage", storage, "--name", name, "--num-cpus", str(num_cpus)],
                          env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} on {storage} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitsweep bench storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per storage, interleaved (default 2)")
    parser.add_argument("--full", action="store_true", help="the smoke preset as it is (default: cut down)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of each run's local Ray instance")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.out:
        args.out = str(check_bench_out(args.out))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import boto3

    server, endpoint = _moto()
    local_root = Path(tempfile.mkdtemp(prefix="vitsweep-bench-storage-"))
    aws = {"AWS_ACCESS_KEY_ID": "AKIAVITSWEEPBENCH000", "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(aws, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    bucket = f"vitsweep-bench-{uuid.uuid4().hex[:8]}"
    extra = [] if args.full else CUT
    walls: Dict[str, List[float]] = {"local": [], "s3": []}
    try:
        boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                     aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/bench?endpoint_override={endpoint}&scheme=http"
        for i in range(args.repeats):
            for kind in (("local", "s3") if i % 2 == 0 else ("s3", "local")):
                storage = str(local_root) if kind == "local" else uri
                wall = _run(storage, f"{kind}-{i}", extra, env, args.num_cpus)
                walls[kind].append(wall)
                print(f"run {i} {kind:5s}: {wall:6.1f} s", flush=True)
    finally:
        server.stop()
    local, s3 = statistics.median(walls["local"]), statistics.median(walls["s3"])
    result = {
        "preset": "smoke" + ("" if args.full else " (" + " ".join(extra) + ")"),
        "repeats": args.repeats, "num_cpus": args.num_cpus, "wall_s": walls,
        "median_local_s": local, "median_s3_s": s3, "ratio_s3_local": s3 / local,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    print(f"median wall: local {local:.1f} s, S3 (moto on 127.0.0.1) {s3:.1f} s, S3/local {s3 / local:.2f}x "
          f"(load average {result['load_avg_1m_at_end']:.1f})")
    print(f"local runs left in {local_root}")
    if args.out:
        write_bench_json(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
