"""Image grids for sanity checks (`vitsweep data show`, TensorBoard). Uses matplotlib's object API
(Figure + Agg canvas): no pyplot, no display, no global backend switch."""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import timm
import torch
from matplotlib.figure import Figure

from ..errors import DataError
from .preprocessing import denormalize, resolve_preprocessing
from .sources import build_data


def plot_grid(
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: Optional[str],
    mean: Sequence[float],
    std: Sequence[float],
    ncols: int = 8,
) -> Figure:
    """Show normalised images [B, 3, H, W] un-normalised, titled with their class names; save as PNG
    when `path` is given."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got {list(images.shape)}")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{len(labels)} labels for {images.shape[0]} images")
    pixels = denormalize(images.detach().float().cpu(), mean, std).clamp(0, 1)  # [B, 3, H, W] in [0, 1]
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    n = pixels.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(1.6 * ncols, 1.8 * nrows), dpi=100)
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            name = class_names[int(labels[i])]
            ax.set_title(name if len(name) <= 22 else name[:21] + "…", fontsize=7)
    fig.tight_layout()
    if path is not None:
        from ..io_utils import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    return fig


def show_data(
    spec: str,
    out: str,
    n: int = 16,
    model_name: str = "vit_tiny_patch16_224",
    img_size: Optional[int] = None,
    split: str = "train",
    seed: int = 0,
    augment: str = "timm",
) -> str:
    """`vitsweep data show`: n images of SPEC's `split` as the model `model_name` would see them
    (its pretrained preprocessing; training augmentation for split='train'), plotted to `out`."""
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}; allowed: train, val")
    kwargs = {"img_size": img_size} if img_size is not None else {}
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    prep = resolve_preprocessing(model, img_size, augment=augment)
    bundle = build_data(spec, prep, seed=seed)
    dataset = bundle.train if split == "train" else bundle.val
    n = min(n, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    # timm/torchvision augmentations draw from torch's and Python's global RNGs; seed them locally.
    py_state = random.getstate()
    random.seed(seed)
    batch_transform = bundle.train_batch_transform if split == "train" else bundle.eval_batch_transform
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [dataset[i] for i in order]
        images = torch.stack([x for x, _ in items])  # [n, 3, H, W]
        if batch_transform is not None:  # cache: uint8 items, crop/flip/normalise in batches
            images = batch_transform(images)
    random.setstate(py_state)
    plot_grid(images, [y for _, y in items], bundle.class_names, out, prep.mean, prep.std)
    return out
