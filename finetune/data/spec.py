"""`--data SPEC` strings: parsing, and the directory layout checks that need nothing but `os`.
`finetune.data.sources.check_data_spec` combines them with the per-source checks.

Grammar (one of):

    synthetic[:key=value,...]      keys: classes, size, n, n_val, seed (integers; seed defaults to
                                   the run's seed)
    imagefolder:<dir>              <dir>/train/<class>/*.jpg and <dir>/val/<class>/*.jpg
    hf:<hub id | local dir>        a local dir must come from `DatasetDict.save_to_disk`
    imagenet100[:<dir>]            hub copy by default; a local dir is a save_to_disk copy or an
                                   ImageNet-1k style folder (train/ and val/ with wnid folders)
    cache:<dir>                    a decode-once uint8 cache written by `vitsweep data cache`
                                   (`finetune.data.cache`)

For `imagefolder`, `hf`, `imagenet100` and `cache` everything after the first ':' is the target, so
paths may contain ',' or '='.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..errors import DataError

KINDS = ("imagenet100", "hf", "imagefolder", "synthetic", "cache")
# (default, minimum, maximum) of each synthetic option; `classes` is also capped by the shapes and
# colours there are (synthetic.py). seed=None: `build_data(..., seed=)` chooses the images.
SYNTHETIC_OPTIONS: Dict[str, tuple] = {
    "classes": (10, 2, 1000),
    "size": (32, 8, 1024),
    "n": (2000, 1, 10_000_000),
    "n_val": (500, 1, 10_000_000),
    "seed": (None, 0, 2**32 - 1),
}
VAL_SPLITS = ("validation", "val", "test")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class DataSpec:
    kind: str
    target: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


def parse_data_spec(spec: str) -> DataSpec:
    """Split SPEC into kind, target and options (syntax only; paths are not touched)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec {spec!r} is empty; allowed kinds: {', '.join(KINDS)}")
    kind, sep, rest = spec.strip().partition(":")
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown data kind {kind!r} in spec {spec!r}{hint}; allowed kinds: {', '.join(KINDS)}")
    if kind == "synthetic":
        return DataSpec("synthetic", None, _parse_synthetic_options(rest, spec) if sep else _synthetic_defaults())
    if kind in ("imagefolder", "hf", "cache") and not rest:
        what = "a hub id or a local save_to_disk directory" if kind == "hf" else "a directory"
        raise DataError(f"data spec {spec!r} needs a target: '{kind}:<{what}>'")
    if kind == "imagenet100" and sep and not rest:
        raise DataError(f"data spec {spec!r} has an empty directory; use 'imagenet100' or 'imagenet100:<dir>'")
    if rest.startswith("~"):
        rest = os.path.expanduser(rest)
    return DataSpec(kind, rest or None, {})


def is_local_path(target: str) -> bool:
    """A hub id never starts with '/', '.' or '~'; anything existing on disk is local too."""
    return os.path.exists(target) or target.startswith(("/", ".", "~"))


def check_hf_target(target: str) -> None:
    """A local save_to_disk directory, or a well-formed hub id (the hub is not contacted)."""
    if is_local_path(target):
        check_saved_dataset_dir(target)
    elif not _HUB_ID.match(target):
        raise DataError(f"hf target {target!r} is neither an existing directory nor a hub id like 'user/name'")


def check_imagenet100_dir(target: str) -> None:
    """A save_to_disk copy (it has dataset_dict.json) or an ImageNet-1k style folder."""
    if not os.path.isdir(target):
        raise DataError(f"imagenet100 directory {target!r} does not exist")
    if os.path.isfile(os.path.join(target, "dataset_dict.json")):
        check_saved_dataset_dir(target)
    else:
        check_imagefolder_dir(target)


def check_imagefolder_dir(root: str) -> None:
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise DataError(
            f"image folder {root!r} has no {' or '.join(s + '/' for s in missing)} subdirectory; "
            "expected train/<class>/... and val/<class>/..."
        )


def check_saved_dataset_dir(root: str) -> None:
    """`root` must hold a DatasetDict written by save_to_disk with a train and a validation split."""
    if not os.path.isdir(root):
        raise DataError(f"dataset directory {root!r} does not exist")
    meta = os.path.join(root, "dataset_dict.json")
    if not os.path.isfile(meta):
        raise DataError(
            f"{root!r} is not a DatasetDict saved with save_to_disk (no dataset_dict.json); "
            "save one with DatasetDict.save_to_disk or use 'imagefolder:<dir>'"
        )
    try:
        with open(meta) as f:
            listed = json.load(f)
    except (OSError, ValueError) as err:  # unreadable, not JSON, not UTF-8
        raise DataError(f"{meta!r} is not a readable dataset_dict.json: {err}") from None
    splits = listed.get("splits", []) if isinstance(listed, dict) else []
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{meta!r} must list its splits as names, not {str(splits)[:80]}")
    for split in train_and_val_splits(splits, root):
        missing = [f for f in ("state.json", "dataset_info.json") if not os.path.isfile(os.path.join(root, split, f))]
        if missing:
            raise DataError(
                f"dataset {root!r} lists split {split!r} but {os.path.join(root, split)!r} lacks {', '.join(missing)}: "
                "the folder is incomplete; save it again with DatasetDict.save_to_disk"
            )


def train_and_val_splits(splits, where: str) -> tuple:
    """Names of the train split and the first of validation/val/test present."""
    splits = list(splits)
    val = next((s for s in VAL_SPLITS if s in splits), None)
    if "train" not in splits or val is None:
        raise DataError(
            f"dataset {where!r} has splits {splits}; it needs 'train' and one of {', '.join(VAL_SPLITS)}"
        )
    return "train", val


def _synthetic_defaults() -> Dict[str, int]:
    return {k: default for k, (default, _, _) in SYNTHETIC_OPTIONS.items()}


def _parse_synthetic_options(text: str, spec: str) -> Dict[str, int]:
    options = _synthetic_defaults()
    if not text:
        raise DataError(f"data spec {spec!r} has ':' but no options; e.g. 'synthetic:classes=10,size=32'")
    for item in text.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in SYNTHETIC_OPTIONS:
            close = difflib.get_close_matches(key, SYNTHETIC_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"unknown synthetic option {key!r} in {spec!r}{hint}; allowed: {', '.join(SYNTHETIC_OPTIONS)}"
            )
        if not eq or not re.fullmatch(r"\d+", value):
            raise DataError(f"synthetic option {key}={value!r} in {spec!r} must be a non-negative integer")
        _, minimum, maximum = SYNTHETIC_OPTIONS[key]
        if len(value) <= 12 and int(value) < minimum:
            raise DataError(f"synthetic option {key}={value} in {spec!r} must be >= {minimum}")
        if len(value) > 12 or int(value) > maximum:
            raise DataError(f"synthetic option {key}={value} in {spec!r} must be <= {maximum}")
        options[key] = int(value)
    return options
