"""Where a sweep's results live: a local or NFS directory, or an object store (S3, an S3-compatible
store, GCS), behind one small `Storage` type.

Everything goes through `pyarrow.fs`, the library Ray Tune itself uses for
``tune.RunConfig(storage_path=..., storage_filesystem=...)``: the filesystem object vitsweep reads and
writes its marker and report with is the one Ray writes experiment state and checkpoints with.

Accepted forms (`resolve_storage`):
- a local or NFS path, relative or absolute, ``~`` expanded (``file:///abs/path`` too);
- ``s3://bucket/prefix``, with pyarrow's S3 URI query options for S3-compatible stores, e.g.
  ``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`` (also ``region``,
  ``allow_bucket_creation``, ``tls_ca_file_path``... whatever `pyarrow.fs.FileSystem.from_uri` takes);
- ``gs://bucket/prefix``.

A string with ``scheme:`` in front is a URI or an error, never a local folder named ``s3:``; a path
without one stays a local path. Resolving never touches the network: the first request (and, for an
AWS bucket named without ``region``, the region lookup) happens in `check_writable` under a time
bound, or at first use.

Credentials are never part of a printed form: ``.uri`` drops ``user:secret@`` (which pyarrow accepts
for S3) and shows only the query options known to carry no secret. They come from the usual AWS/GCS
chain (environment, shared config files, instance metadata) on each node.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow.fs as pafs

from finetune.errors import ConfigError

_logger = logging.getLogger(__name__)

URI_SCHEMES = ("s3", "gs", "file")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
# pyarrow's URI options that carry no secret; any other key is masked in printed forms.
_PUBLIC_QUERY_KEYS = frozenset({
    "region", "scheme", "endpoint_override", "allow_bucket_creation", "allow_bucket_deletion",
    "tls_ca_file_path", "tls_verify_certificates", "smart_defaults", "retry_limit_seconds", "project_id",
})

# Timeouts of the filesystem Ray and vitsweep use during a sweep: generous, with retries.
RUN_CONNECT_TIMEOUT_S = 5.0
RUN_REQUEST_TIMEOUT_S = 20.0  # with libcurl: abort when under 1 byte/s for this long
RUN_MAX_ATTEMPTS = 5
RUN_GCS_RETRY_S = 60.0
DEFAULT_CHECK_TIMEOUT_S = 10.0
PROBE_PREFIX = ".vitsweep-write-probe-"


def resolve_storage(text: str | os.PathLike) -> "Storage":
    """A local/NFS path or a ``s3://``/``gs://`` URI -> `Storage`; anything else is refused with
    `ConfigError` naming it and the accepted forms. Does no I/O."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"storage {text!r} is empty; give a directory or a URI ({_forms()})")
    match = _SCHEME_RE.match(text)
    if match is None:
        path = Path(text).expanduser().resolve()
        return Storage(uri=str(path), path=path.as_posix(), scheme="file", _fs=_FsHolder.local())
    return _resolve_uri(text, match.group(1))


def _forms() -> str:
    return "a local or NFS path, file:///abs/path, s3://bucket/prefix[?options], gs://bucket/prefix"


def _resolve_uri(text: str, raw_scheme: str) -> "Storage":
    scheme = raw_scheme.lower()
    shown_input = _mask(text)
    if scheme not in URI_SCHEMES:
        hint = "" if "://" in text else f" (a local directory whose name contains ':' can be written ./{text})"
        raise ConfigError(
            f"storage URI {shown_input!r}: scheme {raw_scheme!r} is not supported; use one of "
            f"{', '.join(s + '://' for s in URI_SCHEMES)} or a plain path{hint}"
        )
    if not text[len(raw_scheme) + 1:].startswith("//"):
        raise ConfigError(f"storage URI {shown_input!r} lacks '//' after '{raw_scheme}:'; write {scheme}://...")
    text = scheme + text[len(raw_scheme):]  # schemes are case-insensitive; pyarrow takes lower case
    parts = urlsplit(text)
    if parts.fragment:
        raise ConfigError(f"storage URI {shown_input!r} has a '#' fragment; remove it")
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or parts.query or not path.startswith("/"):
            raise ConfigError(f"storage URI {shown_input!r}: write a local path as file:///absolute/path, "
                              "without host or options")
        return resolve_storage(path)

    bucket = parts.netloc.rpartition("@")[2]
    if not bucket or ":" in bucket:
        raise ConfigError(f"storage URI {shown_input!r} needs a bucket name (without port): "
                          f"{scheme}://bucket/prefix; an endpoint goes in ?endpoint_override=host:port")
    query = parse_qsl(parts.query, keep_blank_values=True) if parts.query else []
    shown_query = "&".join(f"{k}={v if k in _PUBLIC_QUERY_KEYS else '***'}" for k, v in query)
    # pyarrow parses the options and any user:secret@ itself. A plain AWS URI would make it look the
    # bucket's region up over the network, so here the syntax is checked with a stand-in region, and
    # the real parse waits for check_writable or the first use.
    keys = {k for k, _ in query}
    probe = text
    if scheme == "s3" and not keys & {"region", "endpoint_override"}:
        probe += ("&" if parts.query else "?") + "region=us-east-1"
    try:
        _, fs_path = pafs.FileSystem.from_uri(probe)
    except (ValueError, TypeError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise ConfigError(f"storage URI {shown_input!r} is invalid: {_mask(str(err))}") from None
    # Checked on the raw and on the decoded path: '..' is refused however it is spelled.
    raw = parts.path[1:-1] if parts.path.endswith("/") else parts.path[1:]
    for comps in (raw.split("/") if raw else [], fs_path.rstrip("/").split("/")[1:]):
        if any(c in ("", ".", "..") for c in comps):
            raise ConfigError(f"storage URI {shown_input!r}: the prefix may not contain '..', '.' or empty "
                              f"path components; write {scheme}://{bucket}/a/b")
    fs_path = fs_path.rstrip("/")
    uri = f"{scheme}://{fs_path}" + (f"?{shown_query}" if shown_query else "")
    return Storage(uri=uri, path=fs_path, scheme=scheme, _fs=_FsHolder(scheme, text, uri),
                   has_uri_credentials=parts.username is not None or parts.password is not None)


def _mask(text: str) -> str:
    """`text` with any ``user:secret@`` replaced, for error messages about unparsed input."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", text)


class _FsHolder:
    """The lazily built filesystem of one storage root, shared by everything joined under it."""

    def __init__(self, scheme: str, pa_uri: str = "", shown: str = "") -> None:
        self.scheme = scheme
        self.pa_uri = pa_uri
        self.shown = shown
        self._lock = threading.Lock()
        self._options: Optional[Dict[str, Any]] = None
        self._fs: Optional[pafs.FileSystem] = None

    def __getstate__(self) -> Dict[str, Any]:  # a Storage may travel to Ray workers
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def local(cls) -> "_FsHolder":
        holder = cls("file")
        holder._fs = pafs.LocalFileSystem()
        return holder

    def options(self) -> Dict[str, Any]:
        """pyarrow's parse of the URI as constructor keywords (its pickle state is exactly those)."""
        with self._lock:
            if self._options is None:
                try:
                    fs, _ = pafs.FileSystem.from_uri(self.pa_uri)
                except OSError as err:
                    raise _translate(err, self.shown) from None
                self._options = dict(fs.__reduce__()[1][0])
            return dict(self._options)

    def build(self, *, connect_timeout: float, request_timeout: float, attempts: int,
              gcs_retry_s: float) -> pafs.FileSystem:
        if self.scheme == "file":
            return pafs.LocalFileSystem()
        opts = self.options()
        if self.scheme == "s3":
            opts.update(connect_timeout=connect_timeout, request_timeout=request_timeout,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
            return pafs.S3FileSystem(**opts)
        if opts.get("retry_time_limit") is None:
            opts["retry_time_limit"] = timedelta(seconds=gcs_retry_s)
        return pafs.GcsFileSystem(**opts)

    def filesystem(self) -> pafs.FileSystem:
        if self._fs is None:
            fs = self.build(connect_timeout=RUN_CONNECT_TIMEOUT_S, request_timeout=RUN_REQUEST_TIMEOUT_S,
                            attempts=RUN_MAX_ATTEMPTS, gcs_retry_s=RUN_GCS_RETRY_S)
            with self._lock:
                if self._fs is None:
                    self._fs = fs
        return self._fs


@dataclass(frozen=True)
class Storage:
    """A storage root: ``uri`` (safe to print), ``path`` inside ``filesystem``; `join` goes below it."""

    uri: str
    path: str
    scheme: str
    _fs: _FsHolder = field(repr=False, compare=False)
    has_uri_credentials: bool = False

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem (built at first use: for an AWS URI without ``region`` that looks
        the region up; `check_writable` does it under a time bound)."""
        return self._fs.filesystem()

    def join(self, *parts: str) -> "Storage":
        """The storage at ``self/part/...``; parts are relative, without '..' (a name from a config
        cannot climb out of the storage root)."""
        rel = _relpath(parts, self.uri)
        if not rel:
            return self
        if self.is_local:
            uri = str(Path(self.uri, rel))
        else:
            base, sep, query = self.uri.partition("?")
            uri = f"{base}/{rel}{sep}{query}"
        return Storage(uri=uri, path=f"{self.path}/{rel}", scheme=self.scheme, _fs=self._fs,
                       has_uri_credentials=self.has_uri_credentials)

    # What tune.RunConfig(storage_path=..., storage_filesystem=...) and Tuner.restore(path,
    # storage_filesystem=...) take. A local path goes as-is (Ray's own default handling); a URI goes as
    # our filesystem object plus bucket/prefix, so Ray's uploads get the same timeouts and retries, the
    # region is looked up once, and credentials given in the URI never appear in Ray's logs. Credentials
    # from the environment are not part of the object: each node resolves its own.
    @property
    def ray_storage_path(self) -> str:
        return self.path

    @property
    def ray_storage_filesystem(self) -> Optional[pafs.FileSystem]:
        return None if self.is_local else self.filesystem

    def _full(self, sub: str | os.PathLike = "") -> str:
        rel = _relpath((os.fspath(sub),), self.uri) if sub else ""
        return f"{self.path}/{rel}" if rel else self.path

    def exists(self, sub: str = "") -> bool:
        return self.filesystem.get_file_info(self._full(sub)).type != pafs.FileType.NotFound

    def is_dir(self, sub: str = "") -> bool:
        return self.filesystem.get_file_info(self._full(sub)).type == pafs.FileType.Directory

    def read_bytes(self, sub: str) -> bytes:
        """The content of file `sub`; FileNotFoundError if there is none."""
        with self.filesystem.open_input_stream(self._full(sub)) as stream:
            return stream.read()

    def write_bytes(self, sub: str, data: bytes) -> None:
        """Write file `sub` atomically: locally a temp file in the same directory then a rename; on an
        object store one upload, which becomes visible only when complete."""
        target = self._full(sub)
        if not self.is_local:
            with self.filesystem.open_output_stream(target) as out:
                out.write(data)
            return
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def listdir(self, sub: str = "") -> List[str]:
        """Sorted names directly under `sub`; FileNotFoundError if it does not exist."""
        base = self._full(sub)
        infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(PurePosixPath(i.path).name for i in infos)

    def upload_dir(self, local_dir: str | os.PathLike, sub: str = "") -> None:
        """Copy the tree `local_dir` to `sub` (files of the same name are replaced)."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise ConfigError(f"cannot upload {str(local_dir)!r} to {self.join(sub).uri}: not a directory")
        if self.is_local:
            from finetune.io_utils import copy_tree_atomically

            return copy_tree_atomically(local_dir, Path(self._full(sub)))
        pafs.copy_files(str(local_dir.resolve()), self._full(sub), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)

    def download_dir(self, sub: str, local_dir: str | os.PathLike,
                     include: Optional[Callable[[str], bool]] = None) -> List[str]:
        """Copy the files under `sub` for which ``include(relative_posix_path)`` is true (all when
        None) into `local_dir`, each written atomically; returns the relative paths copied.
        FileNotFoundError if `sub` does not exist; a key that would land outside `local_dir` ('..', an
        absolute name) is refused before anything is copied."""
        base = self._full(sub)
        infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
        root = Path(local_dir).resolve()
        files = []
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(base):].lstrip("/")
            if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
                raise ConfigError(f"{self.uri}: refusing to download {info.path!r}, a name that would "
                                  f"land outside {str(root)!r}")
            if include is None or include(rel):
                files.append((info, rel))
        copied = []
        for info, rel in files:
            dest = root.joinpath(*rel.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with self.filesystem.open_input_stream(info.path) as src, open(tmp, "wb") as fh:
                    while chunk := src.read(1 << 20):
                        fh.write(chunk)
                os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    tmp.unlink()
            copied.append(rel)
        return copied


def _relpath(parts, shown: str) -> str:
    pieces: List[str] = []
    for part in parts:
        text = os.fspath(part)
        if text.startswith("/"):
            raise ConfigError(f"{shown}: {text!r} must be a relative path")
        for comp in text.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                raise ConfigError(f"{shown}: {text!r} may not contain '..'")
            pieces.append(comp)
    return "/".join(pieces)


# ---------------------------------------------------------------------------------------------- checks

def check_writable(storage: Storage, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Before any trial starts: `storage` exists (a bucket is never created here), credentials are
    present and accepted, the endpoint answers, and a probe object can be written, read back and
    deleted under the prefix, all within about `timeout_s`. Each failure is a `ConfigError` that names
    the URI (without secrets) and what to fix.

    What cannot be told in advance: with no AWS credentials in the environment or the shared files and
    instance metadata allowed, the AWS SDK asks the metadata service and, finding nothing, sends
    unsigned requests. AWS S3 refuses those (reported as rejected credentials); a store that accepts
    unsigned writes (a public-write bucket, moto) passes, with a warning. With AWS_EC2_METADATA_DISABLED
    set, no credentials at all is refused before any request."""
    if storage.is_local:
        _bounded(lambda: _probe_local(storage), timeout_s, storage, "the directory did not answer")
        return
    if storage.scheme == "s3":
        sources = aws_credential_sources(storage)
        if not sources and _imds_disabled():
            raise ConfigError(
                f"storage {storage.uri}: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"a profile in {_aws_files_shown()}, web identity or container credentials), and instance "
                "metadata is disabled by AWS_EC2_METADATA_DISABLED; set credentials with write access to "
                "the prefix"
            )
    connect = max(0.5, min(3.0, timeout_s / 3))
    request = max(1.0, min(5.0, timeout_s / 2))
    try:
        _bounded(lambda: _probe_object_store(storage, connect, request, timeout_s), timeout_s, storage,
                 f"the endpoint did not answer within {timeout_s:g} s")
    except ConfigError as err:
        if storage.scheme == "s3" and not sources:
            raise ConfigError(f"{err}; note: no AWS credentials were found in the environment or in "
                              f"{_aws_files_shown()}") from None
        raise
    if storage.scheme == "s3" and not sources:
        _logger.warning("%s: writes went through without AWS credentials from the environment or config "
                        "files (instance metadata, or unsigned requests the store accepted)", storage.uri)


def _bounded(fn: Callable[[], None], timeout_s: float, storage: Storage, what: str) -> None:
    """Run `fn` in a daemon thread and give up after `timeout_s`: pyarrow's own timeouts do not cover
    every stall (a DNS lookup, a hung NFS mount), and a sweep must not wait minutes to learn that."""
    box: Dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 (handed to the calling thread below)
            box["error"] = err

    thread = threading.Thread(target=target, name="vitsweep-storage-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        hint = ("check the path and its mount" if storage.is_local else
                "check endpoint_override, scheme (http/https), the network and any proxy")
        raise ConfigError(f"storage {storage.uri}: {what}; {hint}")
    if "error" in box:
        raise box["error"]


def _probe_local(storage: Storage) -> None:
    path = Path(storage.path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"storage {storage.uri} is an existing file, not a directory; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"storage {storage.uri} is not writable ({err.strerror or err}); choose a directory "
                          "you can create and write, on storage every node mounts at the same path") from None


def _probe_object_store(storage: Storage, connect: float, request: float, timeout_s: float) -> None:
    try:
        fs = storage._fs.build(connect_timeout=connect, request_timeout=request, attempts=2,
                               gcs_retry_s=timeout_s)
        bucket = storage.path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"storage {storage.uri}: bucket {bucket!r} does not exist (or is not visible "
                              "with these credentials); create it first: vitsweep never creates buckets")
        if storage.path != bucket and fs.get_file_info(storage.path).type == pafs.FileType.File:
            raise ConfigError(f"storage {storage.uri}: the prefix is an existing object, not a folder; "
                              "choose another prefix")
        probe = f"{storage.path}/{PROBE_PREFIX}{uuid.uuid4().hex}"
        payload = b"vitsweep write probe"
        with fs.open_output_stream(probe) as out:
            out.write(payload)
        with fs.open_input_stream(probe) as inp:
            if inp.read() != payload:
                raise ConfigError(f"storage {storage.uri}: a probe object read back different bytes; "
                                  "the store does not keep what it is given")
        fs.delete_file(probe)
    except OSError as err:
        raise _translate(err, storage.uri) from None


def _translate(err: OSError, shown: str) -> ConfigError:
    """A pyarrow I/O error -> a ConfigError that says what to fix (pyarrow's text names the bucket
    and the S3 error code, never a secret)."""
    text = str(err)
    upper = text.upper()
    if any(code in upper for code in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS_KEY_ID",
                                      "INVALIDACCESSKEYID", "SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH",
                                      "HTTP STATUS 403", "HTTP STATUS 401", "UNAUTHENTICATED", "PERMISSION_DENIED",
                                      "EXPIRED_TOKEN", "EXPIREDTOKEN")):
        what = ("the credentials were rejected or lack write permission; check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (or the GCS service account) and the bucket policy")
    elif any(code in upper for code in ("NO_SUCH_BUCKET", "NOSUCHBUCKET")):
        what = "the bucket does not exist; create it first: vitsweep never creates buckets"
    elif any(code in upper for code in ("NETWORK_CONNECTION", "CURLCODE", "COULD NOT CONNECT", "TIMEOUT",
                                        "COULD NOT RESOLVE", "UNAVAILABLE")):
        what = "the endpoint cannot be reached; check endpoint_override, scheme (http/https), the network and any proxy"
    else:
        what = "the store refused the request"
    return ConfigError(f"storage {shown}: {what} ({text})")


# ----------------------------------------------------------------------------------------- credentials

def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _imds_disabled() -> bool:
    return _truthy(os.environ.get("AWS_EC2_METADATA_DISABLED"))


def _aws_files() -> tuple[Path, Path]:
    creds = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    config = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    return Path(creds).expanduser(), Path(config).expanduser()


def _aws_files_shown() -> str:
    return " or ".join(str(p) for p in _aws_files())


_PROFILE_KEYS = ("aws_access_key_id", "credential_process", "role_arn", "sso_session", "sso_start_url",
                 "web_identity_token_file", "credential_source")


def aws_credential_sources(storage: Storage) -> List[str]:
    """Where the AWS SDK inside pyarrow would find credentials, as far as can be told without a
    request: the URI, the environment, web identity, container credentials, the profile in the shared
    files. Instance metadata cannot be told apart from "none" without asking it, so it is not listed."""
    found = []
    if storage.has_uri_credentials:
        found.append("the URI")
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        found.append("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        found.append("web identity (AWS_WEB_IDENTITY_TOKEN_FILE)")
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        found.append("container credentials")
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    creds_file, config_file = _aws_files()
    for path, section in ((creds_file, profile),
                          (config_file, profile if profile == "default" else f"profile {profile}")):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except configparser.Error as err:
            _logger.warning("cannot parse %s (%s); the AWS SDK may not either", path, err)
            continue
        if parser.has_section(section) and any(parser.has_option(section, k) for k in _PROFILE_KEYS):
            found.append(f"profile {profile!r} in {path}")
    return found

