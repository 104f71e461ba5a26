"""The study reads decoded images: a sweep with ``data_cache`` (the ``imagenet100`` and ``scaling``
presets) trains every trial from a decode-once cache of its ``fixed.data`` (`finetune.data.cache`),
so no trial decodes a JPEG and img/s measures the model.

The driver prepares it once, before Ray starts and before any trial (`prepare_data_cache`, called by
`orchestrator.sweep.run_sweep`): a complete cache of the same source and size at the cache directory is
reused; otherwise it is built there (`finetune.data.build_cache`: shards, progress, resumable after an
interruption, under the build's own lock, so a second driver waits and then reuses it). The trials then
get ``data: cache:<dir>``, and the experiment marker records that spec, so `vitsweep resume` reads the
same cache.

Where: ``data_cache.dir``, else ``$VITSWEEP_DATA_CACHE/<source>-<size>-<hash>``, else
``~/.cache/vitsweep/data/<source>-<size>-<hash>``. On a cluster every trial reads the cache on its own
node, so the driver requires ``data_cache.dir`` (``--data-cache DIR``): a path every node mounts (NFS,
a shared volume). The driver builds it there once; a node that does not see it fails its trial naming
the node and the path (`trainables.finetune_trainable`). Building per node was not chosen: N nodes
decoding the same images N times is the cost the cache exists to remove, and a per-node build would
run inside a trial, in its measured time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from finetune.errors import ConfigError, DataError

DATA_CACHE_ENV = "VITSWEEP_DATA_CACHE"

_logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$VITSWEEP_DATA_CACHE``, else ``$XDG_CACHE_HOME/vitsweep/data`` or ``~/.cache/vitsweep/data``."""
    value = os.environ.get(DATA_CACHE_ENV)
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitsweep" / "data"


def cache_dir_for(source: str, size: int, root: Optional[Path] = None) -> Path:
    """``<root>/<source, as a file name>-<size>-<8 hex of the source>``: one directory per source and size."""
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", source).strip("._")[:60] or "data"
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return (root or default_cache_root()) / f"{name}-{size}-{digest}"


def cache_directory(spec, joining: bool) -> Optional[Path]:
    """Where the sweep's cache lives (None: the sweep has no ``data_cache``). On a cluster a directory
    must be given: the driver cannot know which path every node mounts."""
    options = spec.data_cache
    if options is None:
        return None
    if options.get("dir"):
        return Path(options["dir"]).expanduser().absolute()
    if joining:
        raise ConfigError(
            f"the sweep trains from a decode-once cache of {spec.fixed['data']!r} (data_cache), and its trials run on a "
            "cluster's nodes: give the cache a directory every node mounts with --data-cache DIR (or data_cache.dir), "
            "or train from the source as it is with --data-cache off"
        )
    return cache_dir_for(spec.fixed["data"], options["size"])


def _reusable(directory: Path, source: str, size: int) -> bool:
    """A complete cache of `source` at `size` is at `directory` (a different one there is an error)."""
    from finetune.data.cache import check_cache_dir

    if not (directory / "manifest.json").is_file():
        return False
    try:
        manifest = check_cache_dir(directory)
    except DataError as err:
        raise ConfigError(f"data_cache.dir {str(directory)!r} holds a damaged cache ({err}); remove it to rebuild") from err
    if manifest["source"] != source or manifest["size"] != size:
        raise ConfigError(
            f"data_cache.dir {str(directory)!r} holds a cache of {manifest['source']!r} at {manifest['size']} px, not "
            f"{source!r} at {size} px; choose another directory"
        )
    return True


def prepare_data_cache(resolved, *, joining: bool, reload: Callable[[Dict[str, Any]], Any],
                       log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
    """Build (or reuse) the sweep's cache, then the sweep reading it: `reload(spec mapping)` validates
    the rewritten spec (``fixed.data: cache:<dir>``, no ``data_cache``). A sweep without ``data_cache``
    is returned as it is."""
    from finetune.data import build_cache

    spec = resolved.spec
    directory = cache_directory(spec, joining)
    if directory is None:
        return resolved
    source, size = spec.fixed["data"], spec.data_cache["size"]
    if _reusable(directory, source, size):
        log(f"vitsweep: data cache: reusing {directory} ({source} at {size} px)")
    else:
        log(f"vitsweep: data cache: decoding {source} once into {directory} ({size} px), before any trial")
        build_cache(source, directory, size=size, progress=sys.stderr.isatty(), log=log, exist_ok=True)
        _reusable(directory, source, size)
    values = spec.to_dict()
    values["fixed"]["data"] = f"cache:{directory}"
    values.pop("data_cache", None)
    return reload(values)
