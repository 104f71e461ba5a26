"""Checks a sweep driver makes before it takes the experiment lock or starts Ray, each refusing with a
`ConfigError` that names the value: the experiment name, the ``--address`` of a cluster (reachable
within a few seconds), an existing experiment under ``run`` (or ``--overwrite`` moving it aside), and
Tune's saved state before a resume (or a report) reads it.

Also `loopback_node`: a local Ray instance whose every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import pickletools
import socket
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from finetune.errors import ConfigError
from finetune.io_utils import move_aside
from search_spaces.spec import check_name as check_spec_name

from .lock import LOCK_NAME, describe, live_holder
from .storage import PROBE_PREFIX, Storage

_logger = logging.getLogger(__name__)

ADDRESS_TIMEOUT_S = 5.0
STATE_PATTERN = "experiment_state-*.json"
TUNER_PKL = "tuner.pkl"
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001


# ------------------------------------------------------------------------------------------- names
def check_name(name: str, what: str = "--name") -> str:
    """An experiment name is one directory level (`search_spaces.spec.check_name`)."""
    return check_spec_name(name, what)


# ----------------------------------------------------------------------------------------- address
def _host_port(address: str, default_port: int) -> Tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if rest else str(default_port))
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:  # no port, or a bare IPv6 address
        host, port = address, str(default_port)
    if not host or any(c.isspace() for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, ray://10.0.0.5:10001 "
                          "or auto)")
    return host, int(port)


def check_cluster_address(address: Optional[str], timeout_s: Optional[float] = None) -> None:
    """`check_address` of what the driver's ``ray.init`` would join: `address`, else RAY_ADDRESS;
    nothing when Ray is already initialised in this process (a notebook, a test fixture)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    check_address(address or os.environ.get("RAY_ADDRESS"), timeout_s)


def check_address(address: Optional[str], timeout_s: Optional[float] = None) -> None:
    """A cluster address (``--address`` or RAY_ADDRESS) answers a TCP connect within `timeout_s`.

    Forms: ``HOST[:PORT]`` (the GCS, default port 6379), ``ray://HOST[:PORT]`` (Ray Client, default
    10001), ``auto`` (the cluster `ray start` last started on this machine), ``local`` (a new local
    instance: nothing to check). Without this, ``ray.init`` retries an unreachable address for minutes.
    """
    if not address or address == "local":
        return
    timeout_s = ADDRESS_TIMEOUT_S if timeout_s is None else timeout_s
    shown = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except ConnectionError as err:
            raise ConfigError(f"--address auto: no running Ray cluster found on this machine ({err})") from None
        if not found:
            raise ConfigError("--address auto: no running Ray cluster found on this machine (start one with "
                              "`ray start --head`, or give HOST:PORT)")
        address = found
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme != "ray":
            raise ConfigError(f"--address {shown!r}: only ray:// URIs are accepted (or HOST:PORT, auto)")
        host, port = _host_port(rest.rstrip("/"), DEFAULT_CLIENT_PORT)
    else:
        host, port = _host_port(address, DEFAULT_GCS_PORT)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.timeout:
        raise ConfigError(f"--address {shown!r}: {host}:{port} did not answer within {timeout_s:g} s; is the "
                          "cluster up and the port reachable from here?") from None
    except OSError as err:
        raise ConfigError(f"--address {shown!r}: cannot connect to {host}:{port} ({err.strerror or err}); is "
                          "the cluster up and the port reachable from here?") from None


# --------------------------------------------------------------------------------- local loopback
@contextlib.contextmanager
def loopback_node() -> Iterator[dict]:
    """Keywords for ``ray.init`` of a local instance that listens on 127.0.0.1 only, and, while
    inside, the node IP Ray detects pinned to 127.0.0.1: given 127.0.0.1 as the node IP, Ray replaces
    it with the machine's address (so that other machines could join) and its GCS, raylet and agents
    then listen on all interfaces."""
    import ray._private.services as services

    detect = services.node_ip_address_from_perspective
    services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
    try:
        yield {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
    finally:
        services.node_ip_address_from_perspective = detect


# ------------------------------------------------------------------------------ existing experiment
def experiment_entries(exp: Storage) -> List[str]:
    """What `exp` holds (empty if it does not exist), leaving out storage probes."""
    if not exp.is_dir():
        if exp.exists():
            raise ConfigError(f"experiment {exp.uri!r} is an existing file, not a directory; choose another --name")
        return []
    return [n for n in exp.listdir() if not n.startswith(PROBE_PREFIX)]


def check_new_experiment(exp: Storage, overwrite: bool) -> Optional[str]:
    """`vitsweep run` into `exp`: refuse one that holds anything (a running driver is named), unless
    `overwrite`, which moves it to ``NAME.old-<time>`` (local storage only) and returns where."""
    entries = experiment_entries(exp)
    if not entries:
        return None
    holder = live_holder(exp) if LOCK_NAME in entries else None
    if holder is not None:
        raise ConfigError(f"experiment {exp.uri!r} is being run by another driver: {describe(holder)}; choose "
                          "another --name (with --overwrite too: a running experiment is never moved)")
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"experiment {exp.uri!r} already exists ({shown}); continue it with `vitsweep resume {exp.uri}`, "
            "pass --overwrite to move it aside to NAME.old-<time> and start afresh, or choose another --name"
        )
    if not exp.is_local:
        raise ConfigError(
            f"--overwrite: experiment {exp.uri!r} is in an object store, where moving it aside would copy every "
            "checkpoint; delete it yourself or choose another --name"
        )
    path = Path(exp.path)
    target = move_aside(path)
    _logger.warning("moved the existing experiment %s aside to %s", path, target)
    return str(target)


# ---------------------------------------------------------------------------------- Tune's state
def check_state_bytes(raw: bytes, shown: str) -> None:
    """`raw`, the content of an ``experiment_state-*.json`` named `shown`, has the shape Tune reads."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"Tune's experiment state {shown} is corrupt (truncated or not JSON: {err})") from None
    trials = data.get("trial_data") if isinstance(data, dict) else None
    if not isinstance(trials, list):
        raise ConfigError(f"Tune's experiment state {shown} is corrupt (no trial_data list)")
    for i, entry in enumerate(trials):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if ok:
            try:
                ok = isinstance(json.loads(entry[0]), dict)
            except json.JSONDecodeError:
                ok = False
        if not ok:
            raise ConfigError(f"Tune's experiment state {shown} is corrupt (trial_data[{i}] is not a trial)")


def _check_pickle(raw: bytes, shown: str) -> None:
    """A complete pickle stream (read opcode by opcode; nothing is unpickled)."""
    try:
        ops = list(pickletools.genops(raw))
    except (ValueError, EOFError) as err:
        raise ConfigError(f"Tune's {shown} is corrupt (truncated or not a pickle: {err})") from None
    if not ops or ops[-1][0].name != "STOP":
        raise ConfigError(f"Tune's {shown} is corrupt (truncated pickle)")


def check_tune_state(exp: Storage) -> None:
    """Before ``Tuner.restore``: the newest ``experiment_state-*.json`` (the one Tune restores from)
    and ``tuner.pkl`` are intact. A corrupt newest state is refused (Tune would silently start the
    experiment afresh); the message names it, and any older intact state Tune would use once the
    corrupt one is moved aside (losing the progress recorded after it)."""
    names = exp.listdir()
    states = sorted(fnmatch.filter(names, STATE_PATTERN))
    if TUNER_PKL in names:
        _check_pickle(exp.read_bytes(TUNER_PKL), f"{exp.join(TUNER_PKL).uri}")
    if not states:
        return
    newest = states[-1]
    try:
        check_state_bytes(exp.read_bytes(newest), exp.join(newest).uri)
    except ConfigError as err:
        if exp.is_local:
            from .state_keeper import LAST_GOOD, restore_last_good

            aside = restore_last_good(Path(exp.path), Path(exp.path) / newest, check_state_bytes)
            if aside is not None:
                _logger.warning("%s; resuming from the last intact copy the driver kept (%s), the corrupt file "
                                "is kept as %s", err, LAST_GOOD, aside.name)
                return
        older = []
        for name in reversed(states[:-1]):
            try:
                check_state_bytes(exp.read_bytes(name), name)
            except ConfigError:
                continue
            older.append(name)
            break
        hint = (f"; an older intact state exists ({older[0]}): move {newest} out of the experiment to resume "
                "from it, losing the progress recorded after it" if older else "; no intact older state exists")
        raise ConfigError(f"{err}; refusing to resume (Tune would restart the experiment from scratch){hint}") from None


def check_state_file(path: Path) -> None:
    """`check_state_bytes` of a local file (the report's reader)."""
    check_state_bytes(path.read_bytes(), repr(str(path)))
