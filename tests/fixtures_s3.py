"""A real S3 endpoint for tests: moto's server on 127.0.0.1 (the S3 wire protocol, no mocks in-process).

Import the fixtures into a test module (``from fixtures_s3 import moto_server, s3_bucket``):
- ``moto_server`` (session): the server's ``host:port``, stopped at the end of the session;
- ``s3_bucket`` (function): a fresh bucket, fake credentials in the environment (scoped with
  monkeypatch, the developer's ~/.aws never read, instance metadata off), moto's state reset after;
- ``s3_bucket_module`` (module): the same for every test of a module (e.g. one bucket for a module's
  Ray cluster, whose nodes inherit the credentials); its bucket is deleted at the end, not moto's state.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

REGION = "us-east-1"
FAKE_KEY_ID = "AKIAVITSWEEPTEST0000"
FAKE_SECRET = "vitsweep-test-secret-not-real"


@dataclass
class S3Bucket:
    endpoint: str  # host:port, for pyarrow's endpoint_override
    name: str
    env: Dict[str, str] = field(default_factory=dict)  # the AWS variables the fixture set
    client: Any = field(default=None, repr=False)  # a boto3 S3 client on the endpoint

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def uri(self, prefix: str = "", **options: str) -> str:
        """``s3://bucket/prefix?endpoint_override=...&scheme=http`` (plus `options`)."""
        query = {"endpoint_override": self.endpoint, "scheme": "http", **options}
        path = f"{self.name}/{prefix}" if prefix else self.name
        return f"s3://{path}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def keys(self, prefix: str = "") -> list:
        """Every key under `prefix`, read with boto3 (independent of the code under test)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def moto_api(endpoint: str, action: str, body: bytes = b"") -> dict:
    """POST to moto's control API (``reset``, ``reset-auth``) on the server."""
    # Not form-encoded: moto reads the raw body (the new auth count).
    request = urllib.request.Request(f"http://{endpoint}/moto-api/{action}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {}


def clean_aws_env(monkeypatch, tmp_path) -> None:
    """No AWS variable from the outside, empty shared files, no instance metadata (nothing may leave
    127.0.0.1), and no proxy for loopback."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1", host
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@contextmanager
def _bucket(moto_server: str, monkeypatch, directory: Path) -> Iterator[S3Bucket]:
    import boto3

    clean_aws_env(monkeypatch, directory)
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": REGION}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=f"http://{moto_server}", region_name=REGION)
    name = f"vitsweep-test-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    yield S3Bucket(endpoint=moto_server, name=name, env=env, client=client)


@pytest.fixture
def s3_bucket(moto_server, monkeypatch, tmp_path):
    try:
        with _bucket(moto_server, monkeypatch, tmp_path) as bucket:
            yield bucket
    finally:
        moto_api(moto_server, "reset")


@pytest.fixture(scope="module")
def s3_bucket_module(moto_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        with _bucket(moto_server, monkeypatch, tmp_path_factory.mktemp("aws")) as bucket:
            try:
                yield bucket
            finally:
                for key in bucket.keys():
                    bucket.client.delete_object(Bucket=bucket.name, Key=key)
                bucket.client.delete_bucket(Bucket=bucket.name)
