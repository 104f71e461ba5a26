"""What the Ray dashboard shows of a sweep: where its live metrics are scraped, and how a submitted job
names itself.

- ``vitsweep run --metrics-export-port PORT``: the local Ray instance's node exports its metrics (Ray's
  own and the trials' ``ray_vitsweep_*`` gauges, `trainables.ray_metrics`) in Prometheus format on
  ``http://127.0.0.1:PORT/metrics``. Ray's metrics agent binds the node's IP when that is loopback
  (``ray/dashboard/modules/reporter/reporter_agent.py``: ``address=get_localhost_ip() if
  is_localhost(ip) else ""``, the empty address being every interface); vitsweep's local instance runs
  with node IP 127.0.0.1 (`orchestrator.preflight.loopback_node`), so the port listens on loopback only.
  A cluster exports on each node's ``ray start --metrics-export-port``, bound as that node's IP says.
- ``vitsweep submit``: the job's submission id starts with the experiment name, and its metadata names
  the experiment, its storage URI, its preset or config file and the vitsweep version (``ray job list``,
  the dashboard's Jobs page, ``JobSubmissionClient.get_job_info``).
"""

from __future__ import annotations

import errno
import re
import secrets
import socket
from typing import Dict, Optional

from finetune.errors import ConfigError

MIN_PORT, MAX_PORT = 1024, 65535
# Ray checks a submission id against nothing but uniqueness; this keeps it to what a shell, a URL and a
# file name accept unquoted (Ray names the job's log file after it). Ray's own ids: ``raysubmit_<16 chars>``.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
ID_PREFIX_MAX = 48


def check_metrics_port(value: object) -> Optional[int]:
    """``--metrics-export-port``: an integer in [1024, 65535] that nothing on 127.0.0.1 holds; None stays
    None (no export port: Ray picks a random one, which vitsweep does not print)."""
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", text):
        raise ConfigError(f"--metrics-export-port {value!r} is not a port number; allowed: an integer "
                          f"{MIN_PORT}-{MAX_PORT}")
    port = int(text)
    if not MIN_PORT <= port <= MAX_PORT:
        raise ConfigError(f"--metrics-export-port {port} is out of range; allowed: {MIN_PORT}-{MAX_PORT} "
                          "(below 1024 needs root)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            why = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise ConfigError(f"--metrics-export-port {port} {why} on 127.0.0.1; choose a free port") from None
    return port


def metrics_port_for(port: Optional[int], joins: bool) -> Optional[int]:
    """The port for a local instance; refused when the sweep joins a running Ray, whose nodes already
    export on the port their ``ray start`` was given."""
    if port is not None and joins:
        raise ConfigError(f"--metrics-export-port {port} applies to a local Ray instance only; a cluster exports "
                          "on each node's `ray start --metrics-export-port PORT`")
    return port


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def submission_id(experiment: str, suffix: Optional[str] = None) -> str:
    """``<experiment>-<8 hex>``: the experiment first (what the Jobs page sorts and searches by), a random
    suffix so that submitting the same name twice (a retry) does not clash with Ray's unique ids."""
    prefix = _ID_UNSAFE.sub("_", experiment).strip("_-")[:ID_PREFIX_MAX] or "vitsweep"
    return f"{prefix}-{suffix or secrets.token_hex(4)}"


def job_metadata(experiment: str, storage_uri: str, source: str) -> Dict[str, str]:
    """The job's metadata (string values, as Ray requires): never a secret (the storage's printable URI)."""
    from finetune import __version__

    return {"vitsweep_experiment": experiment, "vitsweep_storage": storage_uri, "vitsweep_source": source,
            "vitsweep_version": __version__}
