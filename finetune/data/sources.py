"""Data sources behind `--data SPEC`: each yields (normalised image tensor [3, H, W], int label).

- synthetic:    `SyntheticShapes`, rendered on the fly.
- imagefolder:  torchvision-style `train/` and `val/` class folders (`FolderDataset`).
- hf:           a Hugging Face `datasets` DatasetDict, from `save_to_disk` or the hub (`HFImageDataset`).
- imagenet100:  the 100 CMC classes, from the hub copy, a save_to_disk copy, or an ImageNet-1k folder.
- cache:        a decode-once uint8 cache (`finetune.data.cache`); its datasets yield uint8 [3, S, S]
                and the bundle's batch transforms do the rest on the device.

`check_data_spec` validates a spec without loading data; `build_data` turns one into a `DataBundle`.
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError
from ..safe_files import not_regular_message
from .cache import check_cache_dir, open_cache
from .gpu_transforms import BatchEvalTransform, BatchTrainTransform
from .images import decode, is_decodable, load_rgb, to_rgb
from .preprocessing import Preprocessing
from .spec import (
    DataSpec,
    check_hf_target,
    check_imagefolder_dir,
    check_imagenet100_dir,
    check_saved_dataset_dir,
    is_local_path,
    parse_data_spec,
    train_and_val_splits,
)
from .synthetic import SyntheticShapes, max_classes

IMAGENET100_HUB_ID = "clane9/imagenet-100"
MIN_CLASSES = 2  # a classifier needs at least two classes to learn anything


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    class_names: List[str]
    num_classes: int
    spec: str
    preprocessing: Preprocessing
    skipped_images: int = 0
    # Batch transforms run by the loop on the device after the copy (decode-once cache path):
    # uint8 [B, 3, H, W] -> normalised float [B, 3, h, w]. None: datasets already yield model inputs.
    train_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    eval_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def check_data_spec(spec: str) -> DataSpec:
    """Parse SPEC and check what can be checked without loading data: local paths exist and have the
    expected layout, hub ids are well formed. Hub datasets are not contacted."""
    ds = parse_data_spec(spec)
    if ds.kind == "synthetic" and ds.options["classes"] > max_classes():
        raise DataError(
            f"synthetic classes={ds.options['classes']} is too many; at most {max_classes()} "
            "(one per shape/colour combination)"
        )
    if ds.kind == "imagefolder":
        check_imagefolder_dir(ds.target)
    elif ds.kind == "hf":
        check_hf_target(ds.target)
    elif ds.kind == "cache":
        check_cache_dir(ds.target)
    elif ds.kind == "imagenet100" and ds.target is not None:
        check_imagenet100_dir(ds.target)
    return ds


def build_data(spec: str, preprocessing: Preprocessing, *, skip_bad_images: bool = False, seed: int = 0) -> DataBundle:
    """Datasets for SPEC with `preprocessing`'s train/eval transforms applied.

    Args:
        spec: a `--data` string (see `finetune.data.spec`).
        preprocessing: transforms and normalisation.
        skip_bad_images: image folders only: scan files up front (PIL verify) and drop unreadable ones,
            counted in `DataBundle.skipped_images`; otherwise an unreadable file fails when loaded.
        seed: the synthetic source's seed when the spec does not set `seed=`; other sources are fixed
            by their files and ignore it.

    A `cache:` spec ignores `skip_bad_images` and `seed` (both were applied when the cache was built);
    its datasets yield uint8 [3, S, S] and the bundle's batch transforms produce the model inputs.
    """
    ds = check_data_spec(spec)
    if ds.kind == "cache":
        return _cache_bundle(ds.target, spec, preprocessing)
    train, val, names, skipped = build_sources(
        spec, preprocessing.train_transform(), preprocessing.eval_transform(), skip_bad_images=skip_bad_images, seed=seed
    )
    return DataBundle(train, val, list(names), len(names), spec, preprocessing, skipped)


def build_sources(spec: str, train_tf: Optional[Callable], eval_tf: Optional[Callable], *, skip_bad_images: bool = False, seed: int = 0):
    """(train, val, class_names, skipped) of an image source (not `cache:`) with per-image transforms
    `train_tf` / `eval_tf` applied to PIL images (None: yield the PIL images). `build_data` uses it with
    timm's transforms, `finetune.data.cache_build.build_cache` with a plain resize."""
    ds = check_data_spec(spec)
    if ds.kind == "cache":
        raise DataError(f"data spec {spec!r} is already a decoded cache; give the source it was built from")
    train, val, names, skipped = _sources(ds, train_tf, eval_tf, skip_bad_images, seed)
    check_class_count(names, spec)
    return train, val, names, skipped


def check_class_count(names: Sequence[str], spec: str) -> None:
    if len(names) < MIN_CLASSES:
        raise DataError(
            f"data {spec!r} has {len(names)} class(es) {list(names)[:3]}; training needs at least {MIN_CLASSES}"
        )


def _sources(ds: DataSpec, train_tf, eval_tf, skip_bad_images: bool, seed: int):
    skipped = 0
    if ds.kind == "synthetic":
        o = ds.options
        s = o["seed"] if o["seed"] is not None else seed
        train = SyntheticShapes(o["n"], o["classes"], o["size"], s, "train", train_tf)
        val = SyntheticShapes(o["n_val"], o["classes"], o["size"], s, "val", eval_tf)
        names = train.class_names
    elif ds.kind == "imagefolder":
        train, val, names, skipped = _folder_pair(ds.target, None, skip_bad_images, train_tf, eval_tf)
    elif ds.kind == "hf":
        train, val, names = _hf_pair(ds.target, train_tf, eval_tf)
    else:
        train, val, names, skipped = _imagenet100(ds.target, skip_bad_images, train_tf, eval_tf)
    return train, val, list(names), skipped


def _cache_bundle(root: str, spec: str, preprocessing: Preprocessing, verify: Optional[bool] = None) -> DataBundle:
    """The bundle of cache `root`: uint8 datasets plus the batch transforms that crop, flip and
    normalise on the device. With augment='none' training uses the eval transform. `verify`: checksum
    every file (None: only when the cache is small)."""
    train, val, manifest = open_cache(root, verify)
    names = list(manifest["class_names"])
    check_class_count(names, spec)
    for split, dataset in zip(("train", "val"), (train, val)):
        check_classes_with_images(dataset.labels, names, f"{root}/{split}")
    eval_tf = BatchEvalTransform(preprocessing)
    train_tf = eval_tf if preprocessing.augment == "none" else BatchTrainTransform(preprocessing)
    return DataBundle(
        train, val, names, len(names), spec, preprocessing, int(manifest.get("skipped_images", 0)),
        train_batch_transform=train_tf, eval_batch_transform=eval_tf,
    )


# ---------------------------------------------------------------------------------------- folders
def is_readable_image(path: str) -> bool:
    """Whether the whole file decodes (`finetune.data.images.is_decodable`)."""
    return is_decodable(path)


def find_classes(directory: str) -> List[str]:
    """The sorted class folders of a split (symlinked folders count, as in torchvision)."""
    try:
        entries = list(os.scandir(directory))
    except OSError as e:
        raise DataError(f"cannot list {directory!r}: {e.strerror or e}") from e
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise DataError(f"{directory!r} has no class folders; expected <split>/<class>/<image>")
    return classes


def _image_files(class_dir: str) -> List[str]:
    """Image files under `class_dir`, following symbolic links, in torchvision's order (directories
    sorted by path, files by name). A link that loops (to itself or to a folder that contains it) is a
    DataError naming the link."""
    found: Dict[str, List[str]] = {}
    stack = [(class_dir, frozenset({os.path.realpath(os.path.dirname(class_dir)), os.path.realpath(class_dir)}))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {directory!r}: {e.strerror or e}") from e
        files = found.setdefault(directory, [])
        for entry in entries:
            if entry.is_symlink():
                try:
                    os.stat(entry.path)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise DataError(f"{entry.path!r} is a symbolic link loop") from e
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    raise DataError(f"{entry.path!r} is a symbolic link loop: it leads back to {real!r}, which contains it")
                stack.append((entry.path, ancestors | {real}))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                _check_not_special(entry)
                files.append(entry.path)
    return [path for directory in sorted(found) for path in found[directory]]


def check_classes_with_images(labels: Sequence[int], classes: Sequence[str], where: str) -> None:
    """A split must hold images of at least MIN_CLASSES classes: two class folders of which one is
    empty train a one-class model whose validation accuracy is trivially 100%."""
    present = set(int(label) for label in labels)
    if len(present) < MIN_CLASSES:
        empty = [c for i, c in enumerate(classes) if i not in present]
        raise DataError(
            f"{where!r} has images of {len(present)} class(es) only; training needs at least {MIN_CLASSES} "
            f"classes with images (without images: {_short([str(c) for c in empty])})"
        )


def _check_not_special(entry: os.DirEntry) -> None:
    """A FIFO, socket or device named like an image is refused before anything opens it (a FIFO
    blocks ``open()`` forever); a dangling link is left to fail, naming itself, when it is read."""
    try:
        mode = entry.stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise DataError(not_regular_message(entry.path, "image", mode) + "; remove it from the image folder")


def _scan(directory: str, class_to_idx: Dict[str, int]) -> List[Tuple[str, int]]:
    samples = []
    for name in sorted(class_to_idx):
        samples.extend((path, class_to_idx[name]) for path in _image_files(os.path.join(directory, name)))
    return samples


def _decodable(samples: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """The samples whose file decodes completely (checked in threads: PIL decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(is_decodable, [path for path, _ in samples]))
    return [s for s, good in zip(samples, ok) if good]


class FolderDataset(Dataset):
    """(path, label) samples loaded with `load_rgb` and passed through `transform`."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable] = None) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform is not None else image), label


def _folder_pair(root, classes, skip_bad, train_tf, eval_tf):
    """train/ and val/ of `root`. `classes` (in label order) restricts and orders the classes;
    None takes every class folder, sorted (torchvision's convention)."""
    check_imagefolder_dir(root)
    splits = {}
    for split in ("train", "val"):
        d = os.path.join(root, split)
        splits[split] = (d, find_classes(d))
    if classes is None:
        tr, va = set(splits["train"][1]), set(splits["val"][1])
        if tr != va:
            raise DataError(
                f"image folder {root!r}: train/ and val/ must have the same class folders; "
                f"only in train: {sorted(tr - va)}, only in val: {sorted(va - tr)}"
            )
        classes = splits["train"][1]
        check_class_count(classes, f"imagefolder:{root}")
    else:
        for split, (d, found) in splits.items():
            present = set(found)
            missing = [c for c in classes if c not in present]
            if missing:
                hint = " (ImageNet's val/ must be sorted into wnid folders first)" if len(missing) == len(classes) else ""
                raise DataError(
                    f"{d!r} lacks {len(missing)} of the {len(classes)} required class folders: "
                    f"{_short(missing)}{hint}"
                )
    class_to_idx = {c: i for i, c in enumerate(classes)}
    skipped, datasets_ = 0, []
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        d = splits[split][0]
        samples = _scan(d, class_to_idx)
        if skip_bad:
            good = _decodable(samples)
            skipped += len(samples) - len(good)
            samples = good
        if not samples:
            raise DataError(
                f"{d!r} has no {'readable ' if skip_bad else ''}images in its class folders "
                f"(extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        check_classes_with_images([label for _, label in samples], classes, d)
        datasets_.append(FolderDataset(samples, tf))
    return datasets_[0], datasets_[1], list(classes), skipped


# --------------------------------------------------------------------------------- hugging face
class HFImageDataset(Dataset):
    """One split of a `datasets.Dataset` with an Image column and a ClassLabel column."""

    def __init__(self, split, image_column: str, label_column: str, transform: Optional[Callable], where: str):
        self.split = split.select_columns([image_column, label_column])
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.where = transform, where

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = decode(f"{index} of {self.where}", lambda: self.split[int(index)])  # decodes the image
        image = decode(f"{index} of {self.where}", lambda: to_rgb(row[self.image_column]))
        label = int(row[self.label_column])
        return (self.transform(image) if self.transform is not None else image), label


def load_dataset_dict(target: str):
    """`load_from_disk` for a local directory, else `load_dataset` from the hub (network)."""
    import datasets  # imported here: heavy (pyarrow, pandas) and only the hf/imagenet100 sources need it

    if is_local_path(target):
        check_saved_dataset_dir(target)
        try:
            return datasets.load_from_disk(target)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a folder damaged in ways the check cannot see
            raise DataError(f"cannot load the saved dataset {target!r}: {type(e).__name__}: {e}") from e
    try:
        return datasets.load_dataset(target)
    except OSError as e:  # DatasetNotFoundError, ConnectionError and offline mode are all OSErrors
        raise DataError(
            f"cannot load hub dataset {target!r}: {e}. Check the id, the network (HF_HUB_OFFLINE), "
            "or pass a local directory saved with save_to_disk"
        ) from e


def _pick_column(features, kind, preferred: Tuple[str, ...], where: str) -> str:
    import datasets  # heavy; see load_dataset_dict

    cls = datasets.Image if kind == "image" else datasets.ClassLabel
    found = [k for k, f in features.items() if isinstance(f, cls)]
    if len(found) == 1:
        return found[0]
    named = [k for k in preferred if k in found]
    if named:
        return named[0]
    described = ", ".join(f"{k}: {type(f).__name__}" for k, f in features.items())
    what = "datasets.Image" if kind == "image" else "datasets.ClassLabel"
    problem = "no" if not found else f"several ({', '.join(found)}), none named {'/'.join(preferred)}, so no"
    raise DataError(f"{where} has {problem} unambiguous {what} column; its columns are {{{described}}}")


def check_labels(split, label_column: str, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(split.select_columns([label_column]).with_format("numpy")[label_column])
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[i])} at row {i} (and {bad.size - 1} more) is outside "
            f"0..{num_classes - 1} ({num_classes} classes in column {label_column!r})"
        )
    return labels


def _hf_pair(target: str, train_tf, eval_tf, display: Optional[str] = None):
    dd = load_dataset_dict(target)
    display = display or target
    train_name, val_name = train_and_val_splits(dd.keys(), display)
    features = dd[train_name].features
    image_col = _pick_column(features, "image", ("image", "img"), f"{display}[{train_name}]")
    label_col = _pick_column(features, "label", ("label", "labels"), f"{display}[{train_name}]")
    names = list(features[label_col].names)
    val_features = dd[val_name].features
    if label_col not in val_features or list(getattr(val_features[label_col], "names", [])) != names:
        raise DataError(
            f"{display}: split {val_name!r} must have the same ClassLabel column {label_col!r} "
            f"and class names as {train_name!r}"
        )
    out = []
    for name, tf in ((train_name, train_tf), (val_name, eval_tf)):
        where = f"{display}[{name}]"
        if len(dd[name]) == 0:
            raise DataError(f"{where} is empty")
        labels = check_labels(dd[name], label_col, len(names), where)
        check_classes_with_images(labels, names, where)
        out.append(HFImageDataset(dd[name], image_col, label_col, tf, where))
    return out[0], out[1], names


# --------------------------------------------------------------------------------- imagenet-100
def imagenet100_wnids() -> List[str]:
    """The 100 WordNet ids of ImageNet-100 (CMC, Tian et al. 2019), in label order."""
    text = resources.files("finetune.data").joinpath("imagenet100_cmc_wnids.txt").read_text()
    return text.split()


def wnid_descriptions(wnids: Sequence[str]) -> List[str]:
    info = ImageNetInfo()
    return [info.label_name_to_description(w) for w in wnids]


def imagenet100_class_names(names: Sequence[str], where: str) -> List[str]:
    """Check a dataset's ClassLabel names are the ImageNet-100 classes (as wnids or as timm's
    descriptions, any order) and return human-readable names in the dataset's label order."""
    wnids = imagenet100_wnids()
    descriptions = wnid_descriptions(wnids)
    as_wnids = all(n.startswith("n") and n[1:].isdigit() for n in names)
    expected = wnids if as_wnids else descriptions
    missing = [e for e in expected if e not in set(names)]
    extra = [n for n in names if n not in set(expected)]
    if missing or extra or len(names) != len(expected):
        raise DataError(
            f"{where} is not ImageNet-100 (CMC list): {len(names)} classes; "
            f"missing {_short(missing)}, unexpected {_short(extra)}"
        )
    return wnid_descriptions(names) if as_wnids else list(names)


def _imagenet100(target: Optional[str], skip_bad, train_tf, eval_tf):
    if target is None or os.path.isfile(os.path.join(target, "dataset_dict.json")):
        source = target or IMAGENET100_HUB_ID
        train, val, names = _hf_pair(source, train_tf, eval_tf, display=f"imagenet100 ({source})")
        return train, val, imagenet100_class_names(names, f"imagenet100 ({source})"), 0
    wnids = imagenet100_wnids()
    train, val, _, skipped = _folder_pair(target, wnids, skip_bad, train_tf, eval_tf)
    return train, val, wnid_descriptions(wnids), skipped


def _short(items: Sequence[str], limit: int = 10) -> str:
    items = list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more
