"""``vitsweep submit``: a sweep as a Ray job on a cluster, its results in shared or cloud storage.

A thin layer over `ray.job_submission.JobSubmissionClient`. Before anything is sent, the sweep is
validated here (`orchestrator.sweep.load_cluster_sweep`: everything but a data path that exists only on
the cluster's nodes), the storage is resolved (a URI is also checked writable from here, since the
report is read from here later), and the experiment name is fixed, so the results' location can be
printed. The job runs ``python -m orchestrator.cli run ... --storage STORAGE --name NAME`` on the head;
inside a job RAY_ADDRESS is set, so that `vitsweep run` joins the cluster.

Token authentication: with ``RAY_AUTH_MODE=token`` the client needs the cluster's token (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); Ray's client reads it and sends it as a header. The token is
never put into the job's runtime environment or printed: the nodes have their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
from pathlib import Path
from typing import Callable, Dict, List, Optional

from finetune.errors import ConfigError
from search_spaces import ResolvedSweep

from .monitoring import job_metadata, submission_id
from .storage import Storage, check_writable, resolve_storage
from .sweep import default_name

# Never shipped to the cluster with the working directory: results, VCS data, caches.
WORKING_DIR_EXCLUDES = [".git", "ray_results", "**/__pycache__", "*.egg-info", ".pytest_cache"]
# Secrets that must not travel in a job's runtime_env (the dashboard shows it to anyone who can list jobs).
_SECRET_ENV = ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
# `vitsweep run` options that `submit` sets itself or that belong to the cluster.
_SET_BY_SUBMIT = ("--storage", "--name", "--address", "--num-cpus", "--num-gpus", "--metrics-export-port")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="http://HEAD:8265",
                        help="the cluster's job server (the dashboard address; reach a remote one through "
                             "`ssh -L 8265:127.0.0.1:8265 head`); default RAY_API_SERVER_ADDRESS, else an "
                             "http(s):// RAY_ADDRESS")
    parser.add_argument("--storage", required=True,
                        help="where the results go: a URI (s3://bucket/prefix, gs://bucket/prefix) or an absolute "
                             "path on storage every node mounts (NFS); a relative path is refused")
    parser.add_argument("--name", help="experiment name (default <sweep name>-<timestamp>, fixed before submitting)")
    parser.add_argument("--working-dir", default=".", metavar="DIR",
                        help="the code shipped to the cluster (default: the current directory)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable); never secrets: each node has its own "
                             "credentials and token")
    parser.add_argument("--wait", action="store_true",
                        help="follow the job's logs until it ends; exit non-zero if it did not succeed")
    parser.add_argument("run", nargs=argparse.REMAINDER, metavar="-- RUN OPTIONS",
                        help="options of `vitsweep run`, e.g. -- --preset imagenet100 --gpus-per-trial 1")


def job_storage(text: str) -> Storage:
    """`--storage` for a job: a URI, or an absolute path (a shared mount). A relative path would resolve
    inside Ray's temporary copy of the working directory on the head and vanish with it."""
    storage = resolve_storage(text)
    raw = str(text)
    if storage.is_local and not raw.startswith("file:") and not os.path.isabs(raw):
        raise ConfigError(
            f"--storage {raw!r} is a relative path: in a job it would resolve inside Ray's temporary copy of the "
            "working directory on the head and vanish with it; give a URI (s3://bucket/prefix) or an absolute "
            "path on storage every node mounts")
    return storage


def check_token_env(environ: Optional[Dict[str, str]] = None) -> None:
    """With RAY_AUTH_MODE=token the client must find a token; else say what to set."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        if Path(token_path).expanduser().is_file():
            return
        raise ConfigError(f"RAY_AUTH_TOKEN_PATH={token_path!r} is not a file; point it at the cluster's token file")
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    raise ConfigError(
        "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a "
        "file that holds it, or put it in ~/.ray/auth_token (`ray get-auth-token` prints it on the head)")


def parse_env(items: List[str]) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        if key in _SECRET_ENV:
            raise ConfigError(f"--env {key}=...: secrets do not go into a job (its runtime environment is visible "
                              "to anyone who can list jobs); give every node its own credentials and token")
        env[key] = value
    return env


def _run_options(run: List[str], working_dir: Path) -> List[str]:
    """`vitsweep run` options for the entrypoint: a --config path made relative to the working directory
    (the file must be inside it, since only that directory reaches the cluster)."""
    options = list(run)
    for i, item in enumerate(options):
        flag, eq, value = item.partition("=")
        if flag in _SET_BY_SUBMIT:
            raise ConfigError(f"{flag} is set by `vitsweep submit` (or belongs to the cluster); give it before "
                              "`--`, not among the run options")
        if flag == "--config":
            at = i if eq else i + 1
            if at >= len(options):
                break  # argparse has already refused a --config without a value
            path = Path(value if eq else options[at]).expanduser().resolve()
            try:
                rel = path.relative_to(working_dir)
            except ValueError:
                raise ConfigError(f"--config {str(path)!r} is outside the working directory {str(working_dir)!r}, "
                                  "which is all that reaches the cluster; move it inside") from None
            options[at] = f"--config={rel.as_posix()}" if eq else rel.as_posix()
    return options


def entrypoint(run_options: List[str], storage: Storage, name: str) -> str:
    """The job's command: `vitsweep run` with the storage's printable URI (it carries no secret)."""
    return shlex.join(["python", "-m", "orchestrator.cli", "run", *run_options, "--storage", storage.uri,
                       "--name", name])


def source_of(run_options: List[str]) -> str:
    """``preset:NAME`` or ``config:PATH`` (relative to the working directory) of the run options."""
    for i, item in enumerate(run_options):
        flag, eq, value = item.partition("=")
        if flag in ("--preset", "--config") and (eq or i + 1 < len(run_options)):
            return f"{flag[2:]}:{value if eq else run_options[i + 1]}"
    return ""


def job_server_address(address: Optional[str]) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL."""
    for value in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value:
            if not value.startswith(("http://", "https://")):
                raise ConfigError(f"job server address {value!r}: give the dashboard's http://HOST:PORT "
                                  "(8265 by default), not the GCS address")
            return value
    raise ConfigError("no job server: give --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's client prefers these variables to the address it is given; this process only submits.
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise ConfigError(f"the job server at {address} refused the token ({err}); set the cluster's token in "
                          "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with RAY_AUTH_MODE=token") from None
    except (ConnectionError, RuntimeError) as err:
        raise ConfigError(f"cannot reach the Ray job server at {address}: {err}; check --address (the dashboard "
                          "port, 8265 by default; an SSH tunnel for a remote head)") from None


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(args: argparse.Namespace, load: Callable[[], ResolvedSweep]) -> int:
    """Validate (`load`: the sweep of the run options ``args.run``), submit, and print where the results
    will be; with --wait, follow the job to its end."""
    from ray.job_submission import JobStatus

    check_token_env()
    address = job_server_address(args.address)
    storage = job_storage(args.storage)
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {str(working_dir)!r} is not a directory")
    env = parse_env(args.env)
    options = _run_options(args.run, working_dir)
    resolved = load()
    if storage.is_local:
        print(f"storage {storage.uri}: a shared path; it must exist and be writable on every node "
              "(checked on the head when the job starts)")
    else:
        check_writable(storage)
    name = args.name or default_name(resolved.spec)
    command = entrypoint(options, storage, name)
    client = _client(address)
    runtime_env = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    experiment = storage.join(name)
    # What the Jobs page and `ray job list` show: an id that starts with the experiment, and metadata.
    metadata = job_metadata(name, experiment.uri, source_of(options))
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id(name),
                                   metadata=metadata)
    except RuntimeError as err:
        raise ConfigError(f"the job server at {address} refused the job: {err}") from None
    print(f"job:        {job_id}")
    print(f"results:    {experiment.uri}")
    print(f"entrypoint: {command}")
    print("metadata:   " + "  ".join(f"{k}={v}" for k, v in metadata.items()))
    print(f"logs:       ray job logs --address {address} --follow {job_id}")
    print(f"report:     vitsweep report '{experiment.uri}' --out DIR   (then: tensorboard --logdir DIR)")
    if not args.wait:
        return 0
    asyncio.run(_follow(client, job_id))
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0 if info.status == JobStatus.SUCCEEDED else 1
