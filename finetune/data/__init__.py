"""Data for fine-tuning: `--data SPEC` sources, timm preprocessing (logged to preprocessing.json),
loaders with reproducible order, image grids for sanity checks, and the decode-once cache (uint8
images on disk, crop/flip/normalise in batches on the device).

Layers, each importing only those above it: `spec` (parsing, layout checks) -> `synthetic`,
`preprocessing`, `images` (decoding to RGB) -> `gpu_transforms` -> `cache` (reading) -> `sources` (spec -> DataBundle) ->
`cache_build` -> `loaders`, `plots`.
"""

from ..errors import DataError
from .cache import CacheDataset, check_cache_dir, verify_cache
from .cache_build import build_cache
from .gpu_transforms import BatchEvalTransform, BatchTrainTransform
from .loaders import EpochSampler, build_loaders, seed_worker
from .plots import plot_grid, show_data
from .preprocessing import Preprocessing, denormalize, normalize, resolve_preprocessing
from .sources import (
    IMAGENET100_HUB_ID,
    DataBundle,
    FolderDataset,
    HFImageDataset,
    build_data,
    check_data_spec,
    imagenet100_wnids,
)
from .spec import DataSpec, parse_data_spec
from .synthetic import SyntheticShapes

__all__ = [
    "BatchEvalTransform",
    "BatchTrainTransform",
    "CacheDataset",
    "IMAGENET100_HUB_ID",
    "DataBundle",
    "DataError",
    "DataSpec",
    "EpochSampler",
    "FolderDataset",
    "HFImageDataset",
    "Preprocessing",
    "SyntheticShapes",
    "build_cache",
    "build_data",
    "build_loaders",
    "check_cache_dir",
    "check_data_spec",
    "denormalize",
    "imagenet100_wnids",
    "normalize",
    "parse_data_spec",
    "plot_grid",
    "resolve_preprocessing",
    "seed_worker",
    "show_data",
    "verify_cache",
]
