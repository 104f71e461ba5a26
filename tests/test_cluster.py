"""vitsweep on a two-node Ray cluster with results in S3: real components, no mocks of Ray or S3.

One loopback cluster (head + worker, 1 CPU each, dashboard and job server on 127.0.0.1, Ray's token
authentication on) and one moto S3 server serve the whole module. Drivers run in their own processes
(`vitsweep run --address`, `vitsweep submit`), never in pytest's (see fixtures_ray_cluster). The
node-loss test kills the worker node, so it runs last.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import cli

from fixtures_ray_cluster import local_cluster
from fixtures_s3 import moto_server, s3_bucket_module  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["atrous_linear", "linformer", "nystrom", "performer", "softmax"]
TINY = ["--set", "epochs=2", "--set", "depth=2", "--set", "batch_size=20",
        "--set", "data=synthetic:classes=5,size=32,n=80,n_val=40"]
MISSING = "/nonexistent/vitsweep-cluster-data"
SWEEP = f"""
name: cluster
fixed: {{model: vit_tiny_patch16_224, pretrained: false, pretrained_tag: null, img_size: 32, patch_size: 4,
         depth: 2, augment: none, num_workers: 0, data: "synthetic:classes=5,size=32,n=80,n_val=40",
         epochs: 2, batch_size: 20, warmup_epochs: 0.5}}
variants:
  - softmax
  - {{variant: linformer, fixed: {{rank: 16}}}}
  - {{variant: performer, fixed: {{features: 32}}}}
  - {{variant: softmax, label: no-data, fixed: {{data: "imagefolder:{MISSING}"}}}}
reuse_actors: true
"""
# Twins (log_interval only says when the loss is read) long enough that a kill lands mid-trial.
NODE_LOSS = """
name: nodeloss
fixed: {model: vit_tiny_patch16_224, pretrained: false, pretrained_tag: null, img_size: 32, patch_size: 4,
        depth: 2, augment: none, num_workers: 0, data: "synthetic:classes=5,size=32,n=320,n_val=40",
        epochs: 5, batch_size: 16, warmup_epochs: 0.5, topk: [1, 2]}
search: {log_interval: {grid: [5, 7]}}
max_failures: 1
"""
COMPARED = ("val/acc1", "val/loss", "train/loss")


@pytest.fixture(scope="module")
def bucket(s3_bucket_module):
    return s3_bucket_module


@pytest.fixture(scope="module")
def cluster(bucket, tmp_path_factory):
    # The bucket's fake credentials are in the environment first: both nodes inherit them.
    with local_cluster(tmp_path_factory.mktemp("cluster"), dashboard=True, auth_token=secrets.token_hex(32)) as c:
        yield c


def _env(cluster, **extra):
    env = dict(cluster.env, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


def _vitsweep(args, *, env, cwd, timeout=420):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _get(bucket, key):
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


def _trial_prefixes(keys, exp):
    return sorted({k[:k.index("/run/") + 1] for k in keys if k.startswith(exp) and "/run/" in k})


def _no_folder_named_after_uri(*dirs):
    for d in dirs:
        assert not [p for p in Path(d).iterdir() if p.name.lower().startswith(("s3:", "gs:"))], d


# ------------------------------------------------------------------------------------------ bad input

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize("case", ["scheme", "bucket", "endpoint", "credentials"])
def test_bad_storage_is_refused_before_ray_starts(command, case, bucket, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = {"scheme": "s4://bucket/sweeps",
           "bucket": f"s3://no-such-{bucket.name}/x?endpoint_override={bucket.endpoint}&scheme=http",
           "endpoint": f"s3://{bucket.name}/x?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http",
           "credentials": bucket.uri("x")}[case]
    if case == "credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    head = ["submit", "--address", f"http://127.0.0.1:{_closed_port()}", "--storage", uri, "--"] if command == "submit" \
        else ["run", "--storage", uri]
    args = [*head, "--preset", "smoke", *TINY] if command == "submit" else [*head, "--preset", "smoke", *TINY]
    start = time.monotonic()
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert uri.split("?")[0] in err and "Traceback" not in err
    assert {"scheme": "not supported", "bucket": "does not exist", "endpoint": "cannot be reached",
            "credentials": "no AWS credentials"}[case] in err
    assert not ray.is_initialized()
    _no_folder_named_after_uri(tmp_path, tempfile.gettempdir())
    assert sorted(os.listdir(tmp_path)) == []
    names = [b["Name"] for b in bucket.client.list_buckets()["Buckets"]]
    assert names == [bucket.name]
    print(f"{command} {case}: refused in {time.monotonic() - start:.1f} s")


def test_submit_refuses_a_relative_storage_and_a_missing_token(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cli.main(["submit", "--address", "http://127.0.0.1:1", "--storage", "results", "--", "--preset", "smoke"]) == 2
    assert "relative path" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.main(["submit", "--address", "http://127.0.0.1:1", "--storage", "s3://b/x", "--", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "RAY_AUTH_TOKEN" in err and "RAY_AUTH_TOKEN_PATH" in err and "~/.ray/auth_token" in err
    assert os.listdir(tmp_path) == []


def test_submit_checks_its_run_options_env_and_config_location(tmp_path):
    from finetune.errors import ConfigError
    from orchestrator.submit import _run_options, entrypoint, job_storage, parse_env

    work = tmp_path / "work"
    work.mkdir()
    (work / "sweep.yaml").write_text("x")
    (tmp_path / "outside.yaml").write_text("x")
    assert _run_options(["--config", str(work / "sweep.yaml"), "--set", "epochs=1"], work) == \
        ["--config", "sweep.yaml", "--set", "epochs=1"]
    with pytest.raises(ConfigError, match="outside the working directory"):
        _run_options([f"--config={tmp_path / 'outside.yaml'}"], work)
    for flag in ("--storage", "--name", "--address"):
        with pytest.raises(ConfigError, match="set by `vitsweep submit`"):
            _run_options(["--preset", "smoke", flag, "x"], work)
    for secret in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        with pytest.raises(ConfigError, match="secrets do not go into a job"):
            parse_env([f"{secret}=abc"])
    assert parse_env(["HF_HUB_OFFLINE=1"]) == {"HF_HUB_OFFLINE": "1"}
    assert job_storage("/shared/sweeps").uri == "/shared/sweeps"
    st = job_storage("s3://AKIAX:topsecret@bucket/p?endpoint_override=127.0.0.1:9&scheme=http")
    command = entrypoint(["--preset", "smoke"], st, "exp")
    assert "topsecret" not in command and command.startswith("python -m orchestrator.cli run --preset smoke")


def test_a_cluster_sweep_leaves_missing_data_to_the_nodes_but_checks_everything_else(tmp_path, caplog):
    from finetune.errors import ConfigError
    from orchestrator.sweep import load_cluster_sweep
    from search_spaces import load_sweep

    fixed = {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
             "patch_size": 4, "depth": 2, "data": f"imagefolder:{MISSING}"}
    resolved = load_cluster_sweep({"fixed": fixed, "variants": ["softmax", {"variant": "linformer", "fixed": {"rank": 16}}]})
    assert resolved.geometry_checked and resolved.spec.fixed["data"] == f"imagefolder:{MISSING}"
    assert MISSING in caplog.text and "on its own node" in caplog.text
    with pytest.raises(ConfigError, match="rank"):  # geometry is still checked: 65 tokens
        load_cluster_sweep({"fixed": fixed, "variants": [{"variant": "linformer", "fixed": {"rank": 80}}]})
    with pytest.raises(ConfigError, match=MISSING):  # a local run checks the data here
        load_sweep({"fixed": fixed, "variants": ["softmax"]})


# --------------------------------------------------------------------------------------------- Ray

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_on_two_nodes_writes_everything_into_the_bucket(cluster, bucket, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(SWEEP))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    uri = bucket.uri("sweeps")
    proc, wall = _vitsweep(["run", "--config", str(config), "--storage", uri, "--name", "two", "--address",
                            cluster.address], env=_env(cluster), cwd=cwd)
    # One trial's data exists on no node: it errors (exit 1), the others finish.
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "does not exist on this machine; each trial checks it on its own node" in proc.stderr
    keys = bucket.keys("sweeps/two/")
    trials = _trial_prefixes(keys, "sweeps/two/")
    assert len(trials) == 3, keys
    nodes = {}
    for prefix in trials:
        for name in ("run/result.json", "run/weights.safetensors", "run/weights.json", "run/preprocessing.json",
                     "params.json", "result.json"):
            assert prefix + name in keys, (prefix, name)
        assert any(k.startswith(prefix + "run/tb/events.out.tfevents.") for k in keys), prefix
        assert any(k.startswith(prefix + "checkpoint_") and k.endswith("/nodes.json") for k in keys), prefix
        result = json.loads(_get(bucket, prefix + "run/result.json"))
        assert result["status"] == "finished" and result["nodes"] == [result["node"]]
        nodes[prefix] = result["node"]["node_id"]
    for name in ("comparison.md", "comparison.csv", "vitsweep_experiment.json", "plots/acc_vs_gmacs.png"):
        assert f"sweeps/two/{name}" in keys
    marker = json.loads(_get(bucket, "sweeps/two/vitsweep_experiment.json"))
    assert marker["storage"] == bucket.uri("sweeps/two") and bucket.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(marker)
    rows = list(csv.DictReader(io.StringIO(_get(bucket, "sweeps/two/comparison.csv").decode())))
    by_label = {r["variant"] + (r["configuration"] or ""): r["status"] for r in rows}
    assert sorted(r["status"] for r in rows).count("finished") == 3, rows
    md = _get(bucket, "sweeps/two/comparison.md").decode()
    # The missing data is named with its path and the node the trial ran on.
    error_line = next(line for line in md.splitlines() if "no-data" in line and MISSING in line)
    assert "on Ray node 127.0.0.1, node id " in error_line
    assert any(node_id[:20] in error_line for node_id in cluster.node_ids.values()), error_line
    # Trials ran on both nodes (the errored one names its node), each wrote into the bucket (reuse_actors on).
    ran_on = set(nodes.values()) | {nid for nid in cluster.node_ids.values() if nid[:20] in error_line}
    assert ran_on == set(cluster.node_ids.values()), (nodes, error_line, cluster.node_ids)
    _no_folder_named_after_uri(cwd, tempfile.gettempdir())
    assert os.listdir(cwd) == []
    # Ray's servers listen on loopback only, dashboard and job server included.
    assert cluster.listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}, cluster.listening_addresses()

    # The report, rebuilt in a fresh process from the bucket alone, with a local copy for TensorBoard.
    out = tmp_path / "report"
    rep, rep_wall = _vitsweep(["report", bucket.uri("sweeps/two"), "--out", str(out)], env=_env(cluster), cwd=cwd)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert rep.stdout.count(" finished") == 3 and "errored" in rep.stdout
    assert f"local copy: {out}" in rep.stdout
    assert not list(out.rglob("checkpoint_*")) and not list(out.rglob("*.safetensors"))
    events = sorted(out.glob("*/run/tb/events.out.tfevents.*"))
    assert len(events) == 3
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/acc1")] == [1, 2]
    print(f"two-node sweep ({len(rows)} rows, {by_label}): cluster start {cluster.start_s:.1f} s, run {wall:.1f} s, "
          f"report {rep_wall:.1f} s; trials per node: "
          f"{ {role: sum(n == nid for n in nodes.values()) for role, nid in cluster.node_ids.items()} }")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_runs_the_smoke_preset_as_a_job_with_token_auth(cluster, bucket, tmp_path):
    env = _env(cluster)  # RAY_ADDRESS (the GCS) set too: --address must win over it
    wrong, _ = _vitsweep(["submit", "--address", cluster.dashboard_url, "--storage", bucket.uri("jobs"), "--",
                          "--preset", "smoke", *TINY], env=dict(env, RAY_AUTH_TOKEN="0" * 64), cwd=tmp_path)
    assert wrong.returncode == 2 and "token" in wrong.stderr, wrong.stderr[-2000:]
    proc, wall = _vitsweep(["submit", "--address", cluster.dashboard_url, "--storage", bucket.uri("jobs"),
                            "--name", "job", "--working-dir", str(REPO), "--env", "HF_HUB_OFFLINE=1", "--wait", "--",
                            "--preset", "smoke", *TINY, "--set", "epochs=1"], env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"results:    {bucket.uri('jobs/job')}" in out and "ray job logs" in out and "vitsweep report" in out
    assert env["RAY_AUTH_TOKEN"] not in out + proc.stderr
    job_id = next(line.split()[1] for line in out.splitlines() if line.startswith("job:"))
    assert f"job {job_id}: SUCCEEDED" in out
    rows = list(csv.DictReader(io.StringIO(_get(bucket, "jobs/job/comparison.csv").decode())))
    assert sorted(r["variant"] for r in rows) == VARIANTS and all(r["status"] == "finished" for r in rows), rows
    keys = bucket.keys("jobs/job/")
    trials = _trial_prefixes(keys, "jobs/job/")
    assert len(trials) == 5
    ran_on = {json.loads(_get(bucket, p + "run/result.json"))["node"]["node_id"] for p in trials}
    assert ran_on <= set(cluster.node_ids.values())
    assert not (REPO / "ray_results" / "job").exists()
    print(f"vitsweep submit --wait (smoke, 5 trials, token auth): {wall:.1f} s; nodes used {len(ran_on)}")


# ------------------------------------------------------------------------------------------ node loss

def _checkpoint_on(bucket, exp, node_id):
    """(trial prefix, epoch) of a checkpoint in the bucket written on `node_id`, or None."""
    for key in bucket.keys(exp):
        if key.endswith("/nodes.json") and "/checkpoint_" in key:
            nodes = json.loads(_get(bucket, key))
            if nodes and nodes[-1]["node_id"] == node_id:
                meta = json.loads(_get(bucket, key.rsplit("/", 1)[0] + "/meta.json"))
                return key[:key.index("checkpoint_")], meta["epoch"]
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_lost_mid_trial_resumes_on_the_head_from_its_bucket_checkpoint(cluster, bucket, tmp_path):
    config = tmp_path / "nodeloss.yaml"
    config.write_text(textwrap.dedent(NODE_LOSS))
    log = (tmp_path / "driver.log").open("w")
    start = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config),
                               "--storage", bucket.uri("loss"), "--name", "loss", "--address", cluster.address],
                              env=_env(cluster), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        found = None
        deadline = time.monotonic() + 400
        while found is None and time.monotonic() < deadline and driver.poll() is None:
            found = _checkpoint_on(bucket, "loss/loss/", cluster.node_ids["worker"])
            time.sleep(0.5)
        assert found is not None, (tmp_path / "driver.log").read_text()[-4000:]
        victim, epoch_before = found
        os.kill(cluster.worker_raylet_pid(), signal.SIGKILL)
        killed_at = time.monotonic() - start
        driver.wait(timeout=500)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        log.close()
    wall = time.monotonic() - start
    text = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, text[-5000:]
    trials = _trial_prefixes(bucket.keys("loss/loss/"), "loss/loss/")
    assert victim in trials and len(trials) == 2
    twin = next(t for t in trials if t != victim)
    results = {t: json.loads(_get(bucket, t + "run/result.json")) for t in trials}
    head, worker = cluster.node_ids["head"], cluster.node_ids["worker"]
    assert [n["node_id"] for n in results[victim]["nodes"]] == [worker, head]
    assert [n["node_id"] for n in results[twin]["nodes"]] == [head]
    assert epoch_before < 5, "the kill landed after the trial had finished"
    # Resumed from its checkpoint: identical per-epoch metrics to its uninterrupted twin.
    for t in trials:
        assert [h["epoch"] for h in results[t]["history"]] == [1, 2, 3, 4, 5]
    for mine, theirs in zip(results[victim]["history"], results[twin]["history"]):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    # The finished twin never re-ran: one Tune result per epoch.
    twin_log = [json.loads(line) for line in _get(bucket, twin + "result.json").decode().splitlines() if line.strip()]
    assert [r["training_iteration"] for r in twin_log] == [1, 2, 3, 4, 5]
    rows = list(csv.DictReader(io.StringIO(_get(bucket, "loss/loss/comparison.csv").decode())))
    assert all(r["status"] == "finished" and r["epochs"] == "5" for r in rows), rows
    print(f"node loss: worker raylet SIGKILLed at {killed_at:.1f} s after epoch {epoch_before} of 5 was in the "
          f"bucket; victim nodes {[n['node_id'][:8] for n in results[victim]['nodes']]} (worker, head); "
          f"final val/acc1 {results[victim]['metrics']['val/acc1']} == twin {results[twin]['metrics']['val/acc1']}; "
          f"sweep {wall:.1f} s")
