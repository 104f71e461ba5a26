"""Data for fine-tuning: `--data SPEC` sources, timm preprocessing (logged to preprocessing.json),
loaders with reproducible order, and image grids for sanity checks."""

from .loaders import EpochGenerator, ReseedableSampler, build_loaders, seed_worker
from .plots import plot_grid, show_data
from .preprocessing import Preprocessing, denormalize, normalize, resolve_preprocessing
from .sources import (
    IMAGENET100_HUB_ID,
    DataBundle,
    FolderDataset,
    HFImageDataset,
    build_data,
    imagenet100_wnids,
)
from .spec import DataError, DataSpec, check_data_spec, parse_data_spec
from .synthetic import SyntheticShapes

__all__ = [
    "IMAGENET100_HUB_ID",
    "DataBundle",
    "DataError",
    "DataSpec",
    "EpochGenerator",
    "FolderDataset",
    "HFImageDataset",
    "Preprocessing",
    "ReseedableSampler",
    "SyntheticShapes",
    "build_data",
    "build_loaders",
    "check_data_spec",
    "denormalize",
    "imagenet100_wnids",
    "normalize",
    "parse_data_spec",
    "plot_grid",
    "resolve_preprocessing",
    "seed_worker",
    "show_data",
]
