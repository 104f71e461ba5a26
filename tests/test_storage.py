"""orchestrator.storage against real components: local directories, moto's S3 server on 127.0.0.1
(the S3 wire protocol through pyarrow), Ray Tune writing into the bucket through `Storage`, and a
two-node Ray cluster on this machine (slow)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from finetune.errors import ConfigError
from orchestrator.storage import PROBE_PREFIX, check_writable, resolve_storage

from fixtures_ray_cluster import ray_cluster  # noqa: F401
from fixtures_s3 import moto_api, moto_server, s3_bucket  # noqa: F401


# ----------------------------------------------------------------------------------------- resolving

def test_local_paths_stay_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rel = resolve_storage("results/sweeps")
    assert rel.is_local and rel.uri == str(tmp_path / "results" / "sweeps")
    assert rel.ray_storage_path == rel.path and rel.ray_storage_filesystem is None
    assert resolve_storage("~/runs").path == str(tmp_path / "home" / "runs")
    assert resolve_storage(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    assert resolve_storage(tmp_path / "y").path == str(tmp_path / "y")
    assert rel.join("exp", "trial_1").path == str(tmp_path / "results" / "sweeps" / "exp" / "trial_1")


def test_uris_resolve_without_network():
    # A plain AWS URI needs a region lookup, which must wait for check_writable (there is no network
    # here: a lookup would fail this test).
    plain = resolve_storage("s3://my-bucket/sweeps/")
    assert (plain.uri, plain.path, plain.is_local) == ("s3://my-bucket/sweeps", "my-bucket/sweeps", False)
    assert plain.ray_storage_path == "my-bucket/sweeps"
    custom = resolve_storage("S3://bucket/a/b?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1")
    assert custom.uri == "s3://bucket/a/b?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"
    fs = custom.ray_storage_filesystem
    assert fs.type_name == "s3" and custom.ray_storage_path == "bucket/a/b"
    assert custom.join("exp").uri == "s3://bucket/a/b/exp?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"
    gcs = resolve_storage("gs://bucket/prefix")
    assert (gcs.uri, gcs.path) == ("gs://bucket/prefix", "bucket/prefix")
    assert resolve_storage("s3://bucket").path == "bucket"


def test_storage_pickles_with_its_filesystem(tmp_path):
    import pickle

    for st in (resolve_storage(tmp_path), resolve_storage("s3://bucket/p?endpoint_override=127.0.0.1:9&scheme=http")):
        assert st.filesystem is not None  # built before pickling
        back = pickle.loads(pickle.dumps(st.join("exp")))
        assert back.uri == st.join("exp").uri and back.filesystem.type_name == st.filesystem.type_name


def test_credentials_in_a_uri_are_never_printed():
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"
    st = resolve_storage(f"s3://AKIAEXAMPLE:{secret}@bucket/p?endpoint_override=127.0.0.1:9&scheme=http")
    assert st.has_uri_credentials
    for text in (st.uri, str(st), repr(st), st.join("x").uri):
        assert secret not in text and "AKIAEXAMPLE" not in text
    with pytest.raises(ConfigError) as err:
        resolve_storage(f"s3://AKIAEXAMPLE:{secret}@bucket/p?nonsense=1")
    assert secret not in str(err.value) and "nonsense" in str(err.value)


@pytest.mark.parametrize("text, named", [
    ("s4://bucket/x", "'s4'"), ("http://host/x", "'http'"), ("hdfs://nn/x", "'hdfs'"), ("ftp://h/x", "'ftp'"),
    ("file:relative/dir", "file:"), ("s3:/bucket/x", "s3:"), ("runs:2024", "'runs'"),
    ("file://host/x", "file:///absolute/path"), ("s3://bucket:9000/x", "bucket name"), ("s3:///x", "bucket name"),
    ("s3://bucket/x?no_such_option=1", "no_such_option"), ("s3://bucket/x#frag", "fragment"), ("", "empty"),
])
def test_unknown_or_malformed_uris_are_refused_naming_them(text, named):
    with pytest.raises(ConfigError) as err:
        resolve_storage(text)
    message = str(err.value)
    assert named in message
    if text:
        assert text.split("?")[0] in message


def test_unsupported_scheme_message_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"s3://, gs://, file://"):
        resolve_storage("s4://bucket/x")


@pytest.mark.parametrize("text", ["s3://b/a/../c", "s3://b/..", "gs://b/a/./c", "s3://b//x", "s3://b/a%2F..%2Fc",
                                  "s3://b/%2E%2E/x"])
def test_dot_dot_in_a_uri_prefix_is_refused(text):
    with pytest.raises(ConfigError, match=r"may not contain '\.\.'"):
        resolve_storage(text)


def test_join_refuses_climbing_out():
    st = resolve_storage("s3://bucket/prefix")
    for bad in ("..", "a/../../b", "/abs"):
        with pytest.raises(ConfigError):
            st.join(bad)


# ------------------------------------------------------------------------------------ local checks

def test_check_writable_local(tmp_path):
    target = resolve_storage(tmp_path / "new" / "deeper")
    check_writable(target)
    assert (tmp_path / "new" / "deeper").is_dir() and os.listdir(tmp_path / "new" / "deeper") == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_writable(resolve_storage(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="not writable"):
        check_writable(resolve_storage(tmp_path / "afile" / "below"))


# --------------------------------------------------------------------------------------- S3 checks

def test_check_writable_s3_passes_and_leaves_no_probe(s3_bucket):
    st = resolve_storage(s3_bucket.uri("sweeps"))
    check_writable(st)
    # The probe is gone; pyarrow leaves an empty "sweeps/" marker when it deletes the last key below.
    assert [k for k in s3_bucket.keys() if PROBE_PREFIX in k] == []
    assert set(s3_bucket.keys()) <= {"sweeps/"}


def test_missing_bucket_is_refused_not_created(s3_bucket):
    st = resolve_storage(f"s3://no-such-bucket-{s3_bucket.name}/x?endpoint_override={s3_bucket.endpoint}&scheme=http")
    with pytest.raises(ConfigError, match="does not exist") as err:
        check_writable(st)
    assert st.uri in str(err.value)
    names = [b["Name"] for b in s3_bucket.client.list_buckets()["Buckets"]]
    assert names == [s3_bucket.name]


def test_prefix_that_is_an_object_is_refused(s3_bucket):
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="taken", Body=b"x")
    with pytest.raises(ConfigError, match="existing object"):
        check_writable(resolve_storage(s3_bucket.uri("taken")))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_unreachable_endpoint_is_refused_in_bounded_time(s3_bucket):
    # Nothing listens: connection refused, pyarrow's retries end it.
    refused = resolve_storage(f"s3://{s3_bucket.name}/x?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http")
    with pytest.raises(ConfigError, match="cannot be reached") as err:
        check_writable(refused, timeout_s=10)
    assert "127.0.0.1" in str(err.value)

    # A listener that accepts TCP but never answers: only the time bound ends the check.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        port = hole.getsockname()[1]
        silent = resolve_storage(f"s3://{s3_bucket.name}/x?endpoint_override=127.0.0.1:{port}&scheme=http")
        start = time.monotonic()
        with pytest.raises(ConfigError, match="did not answer|cannot be reached") as err:
            check_writable(silent, timeout_s=3)
        print(f"silent endpoint refused after {time.monotonic() - start:.1f} s")
        assert silent.uri in str(err.value)


def test_missing_credentials_are_refused_before_any_request(s3_bucket, monkeypatch):
    # The fixture's files are empty and instance metadata is off: with the two variables gone, the
    # AWS SDK in pyarrow has nothing, and would send unsigned requests (which moto, unlike AWS,
    # accepts), so the check must refuse from what it can see.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    st = resolve_storage(s3_bucket.uri("sweeps"))
    with pytest.raises(ConfigError, match="no AWS credentials found") as err:
        check_writable(st)
    assert st.uri in str(err.value) and "AWS_EC2_METADATA_DISABLED" in str(err.value)


def test_credentials_from_a_profile_file_count(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[sweeps]\naws_access_key_id = AKIAFROMFILE\naws_secret_access_key = fromfile\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "sweeps")
    check_writable(resolve_storage(s3_bucket.uri("sweeps")))


def test_rejected_credentials_are_refused(s3_bucket):
    # moto's IAM check switched on over its control API: the fixture's key id is unknown to it, so it
    # answers like AWS does for a bad key (403 on HEAD, InvalidAccessKeyId on PUT).
    st = resolve_storage(s3_bucket.uri("sweeps"))
    previous = moto_api(s3_bucket.endpoint, "reset-auth", b"0")["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        with pytest.raises(ConfigError, match="credentials were rejected") as err:
            check_writable(st)
    finally:
        moto_api(s3_bucket.endpoint, "reset-auth", previous.encode())
    assert st.uri in str(err.value)
    assert s3_bucket.env["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


# ---------------------------------------------------------------------------------------- round trips

@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path):
    if request.param == "local":
        return resolve_storage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return resolve_storage(bucket.uri("sweeps"))


def test_round_trips(any_storage, tmp_path):
    st = any_storage
    check_writable(st)
    exp = st.join("exp1")
    assert not exp.exists("marker.json")
    exp.write_bytes("marker.json", b'{"format": "x"}')
    exp.write_bytes("marker.json", b'{"format": "y"}')  # replaced whole
    assert exp.read_bytes("marker.json") == b'{"format": "y"}'
    assert exp.exists() and exp.exists("marker.json") and exp.is_dir()
    with pytest.raises(FileNotFoundError):
        exp.read_bytes("absent.json")
    with pytest.raises(FileNotFoundError):
        exp.listdir("absent")

    local = tmp_path / "upload"
    (local / "trial_a" / "tb").mkdir(parents=True)
    (local / "trial_a" / "result.json").write_text('{"acc": 1}\n')
    (local / "trial_a" / "tb" / "events.out.tfevents.1").write_bytes(b"\x00events")
    (local / "trial_a" / "checkpoint_000000").mkdir()
    (local / "trial_a" / "checkpoint_000000" / "weights.safetensors").write_bytes(os.urandom(2048))
    (local / "comparison.md").write_text("| variant |\n")
    exp.upload_dir(local)
    assert exp.listdir() == ["comparison.md", "marker.json", "trial_a"]
    assert exp.listdir("trial_a") == ["checkpoint_000000", "result.json", "tb"]

    out = tmp_path / "report"
    copied = exp.download_dir("", out, include=lambda rel: "checkpoint_" not in rel)
    assert copied == ["comparison.md", "marker.json", "trial_a/result.json", "trial_a/tb/events.out.tfevents.1"]
    assert (out / "trial_a" / "result.json").read_text() == '{"acc": 1}\n'
    assert (out / "trial_a" / "tb" / "events.out.tfevents.1").read_bytes() == b"\x00events"
    assert not (out / "trial_a" / "checkpoint_000000").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert exp.download_dir("trial_a/tb", tmp_path / "tb") == ["events.out.tfevents.1"]
    with pytest.raises(ConfigError):
        exp.upload_dir(tmp_path / "not-there")


def test_local_write_leaves_no_temp_file(tmp_path):
    st = resolve_storage(tmp_path)
    st.write_bytes("a/b/c.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["c.json"]


def test_download_refuses_keys_that_climb_out(s3_bucket, tmp_path):
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="sweeps/exp/../../evil", Body=b"x")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="sweeps/exp/ok.json", Body=b"{}")
    st = resolve_storage(s3_bucket.uri("sweeps")).join("exp")
    with pytest.raises(ConfigError, match="outside"):
        st.download_dir("", tmp_path / "out")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))  # nothing copied


# --------------------------------------------------------------------------------------------- Ray

def trivial_trainable_factory():
    """Two reports, each with a small checkpoint, and the node it ran on. Made in a function so that
    Ray ships it by value (the test module is not importable on Ray's workers)."""

    def trivial(config):
        import json
        import tempfile
        from pathlib import Path

        import ray
        from ray import tune

        node_id = ray.get_runtime_context().get_node_id()
        for step in range(2):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "state.json").write_text(json.dumps({"step": step, "node_id": node_id}))
                tune.report({"step": step, "node_id": node_id, "score": config["x"] * (step + 1)},
                            checkpoint=tune.Checkpoint.from_directory(tmp))

    return trivial


def _checkpoint_dirs(keys, exp_prefix):
    return sorted({k.rsplit("/", 1)[0] for k in keys if "/checkpoint_" in k and k.endswith("state.json")
                   and k.startswith(exp_prefix)})


@pytest.fixture
def local_ray(s3_bucket):
    import ray

    # Started after s3_bucket: Ray's workers inherit the fake credentials from this environment.
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024**2,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_tune_writes_state_and_checkpoints_into_the_bucket(s3_bucket, local_ray):
    from ray import tune

    st = resolve_storage(s3_bucket.uri("sweeps"))
    check_writable(st)
    tuner = tune.Tuner(
        trivial_trainable_factory(),
        param_space={"x": 3},
        run_config=tune.RunConfig(name="exp", storage_path=st.ray_storage_path,
                                  storage_filesystem=st.ray_storage_filesystem, verbose=0),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    best = results.get_best_result(metric="score", mode="max")
    assert best.metrics["score"] == 6
    assert best.checkpoint.path.startswith(f"{s3_bucket.name}/sweeps/exp/")

    keys = s3_bucket.keys("sweeps/exp/")
    assert any(k.startswith("sweeps/exp/experiment_state-") for k in keys), keys
    assert "sweeps/exp/tuner.pkl" in keys
    assert len(_checkpoint_dirs(keys, "sweeps/exp/")) == 2, keys
    # What resume needs: Tune finds the experiment through the same Storage.
    exp = st.join("exp")
    assert tune.Tuner.can_restore(exp.ray_storage_path, storage_filesystem=exp.ray_storage_filesystem)
    with best.checkpoint.as_directory() as ckpt:
        assert json.loads(Path(ckpt, "state.json").read_text())["step"] == 1


# The two-node run's driver, in its own process (see fixtures_ray_cluster): argv = storage URI.
TWO_NODE_DRIVER = """
import json, sys, tempfile
from pathlib import Path

import ray
from ray import tune
from ray.tune import PlacementGroupFactory

from orchestrator.storage import check_writable, resolve_storage


def trivial(config):
    node_id = ray.get_runtime_context().get_node_id()
    for step in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "state.json").write_text(json.dumps({"step": step, "node_id": node_id}))
            tune.report({"step": step, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(tmp))


st = resolve_storage(sys.argv[1])
check_writable(st)
ray.init(log_to_driver=False)
# One trial per node: each asks for a sliver of its node's custom resource.
trainable = tune.with_resources(trivial, lambda config: PlacementGroupFactory([{"CPU": 1, config["node"]: 0.01}]))
results = tune.Tuner(
    trainable,
    param_space={"node": tune.grid_search(["head_node", "worker_node"])},
    run_config=tune.RunConfig(name="exp", storage_path=st.ray_storage_path,
                              storage_filesystem=st.ray_storage_filesystem, verbose=0),
).fit()
print(json.dumps({"errors": [str(r.error) for r in results if r.error],
                  "trials": [{"node": r.config["node"], "node_id": r.metrics.get("node_id"), "path": r.path}
                             for r in results]}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_trials_on_both_nodes_checkpoint_into_the_bucket(s3_bucket, ray_cluster, tmp_path):
    start = time.monotonic()
    driver = tmp_path / "two_node_driver.py"
    driver.write_text(TWO_NODE_DRIVER)
    out = json.loads(ray_cluster.run_driver(driver, s3_bucket.uri("cluster")).strip().splitlines()[-1])
    run_s = time.monotonic() - start
    assert out["errors"] == []
    ran_on = {t["node"]: t["node_id"] for t in out["trials"]}
    assert ran_on == {"head_node": ray_cluster.node_ids["head"], "worker_node": ray_cluster.node_ids["worker"]}

    keys = s3_bucket.keys("cluster/exp/")
    assert any(k.startswith("cluster/exp/experiment_state-") for k in keys), keys
    ckpts = _checkpoint_dirs(keys, "cluster/exp/")
    assert len(ckpts) == 4, keys  # 2 trials x 2 reports
    for trial in out["trials"]:
        assert trial["path"].startswith(f"{s3_bucket.name}/cluster/exp/")
        trial_prefix = trial["path"].split("/", 1)[1] + "/"  # bucket/cluster/exp/<trial> -> key prefix
        assert len([c for c in ckpts if c.startswith(trial_prefix)]) == 2, (trial_prefix, ckpts)
        for c in ckpts:
            if c.startswith(trial_prefix):
                state = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"{c}/state.json")["Body"].read())
                assert state["node_id"] == trial["node_id"]
    assert ray_cluster.worker_raylet_pid() != ray_cluster.head_raylet_pid()
    assert ray_cluster.listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}, ray_cluster.listening_addresses()
    print(f"two-node cluster started in {ray_cluster.start_s:.1f} s; Tune driver run (2 trials, one per node, "
          f"checkpoints on the moto bucket) {run_s:.1f} s wall")
