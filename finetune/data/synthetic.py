"""A deterministic, learnable image task rendered on the fly: one coloured shape at a random position
and size on a noisy greyish background; the class is the (colour, shape) pair, e.g. "red circle".

Image `i` of a split depends only on (seed, split, i), so two constructions give identical pixels
and nothing is stored on disk. Labels are `i % classes`: classes are balanced to within one image.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import DataError

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
# Hues far apart so that timm's colour jitter (no hue shift) keeps them distinguishable.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
}
_SPLIT_CODE = {"train": 0, "val": 1}


def max_classes() -> int:
    return len(SHAPES) * len(COLOURS)


def class_combo(c: int) -> Tuple[str, str]:
    """Class c -> (colour, shape). Walks the diagonals of the 6 x 6 grid, so the first six classes
    already differ in both colour and shape; injective for c < 36 because len(SHAPES) == len(COLOURS)."""
    s = len(SHAPES)
    colour = list(COLOURS)[(c + c // s) % len(COLOURS)]
    return colour, SHAPES[c % s]


class SyntheticShapes(Dataset):
    """Args:
    n: number of images.
    classes: number of (colour, shape) classes, 2 .. max_classes().
    size: image side in pixels.
    seed: base seed; train and val draw from different streams of it.
    split: 'train' or 'val'.
    transform: applied to the PIL image (e.g. a timm transform); None returns the PIL image.
    """

    def __init__(
        self,
        n: int,
        classes: int,
        size: int,
        seed: int = 0,
        split: str = "train",
        transform: Optional[Callable] = None,
    ) -> None:
        if not 2 <= classes <= max_classes():
            raise DataError(
                f"synthetic classes={classes} is not allowed; use 2..{max_classes()} "
                f"({len(SHAPES)} shapes x {len(COLOURS)} colours)"
            )
        if split not in _SPLIT_CODE:
            raise DataError(f"synthetic split={split!r}; allowed: {', '.join(_SPLIT_CODE)}")
        if n < 1:
            raise DataError(f"synthetic n={n} gives an empty dataset; use n >= 1")
        self.n, self.classes, self.size, self.seed, self.split = n, classes, size, seed, split
        self.transform = transform
        self.class_names: List[str] = [" ".join(class_combo(c)) for c in range(classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        image, label = self.render(index)
        return (self.transform(image) if self.transform is not None else image), label

    def render(self, index: int) -> Tuple[Image.Image, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic images")
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        label = index % self.classes
        colour_name, shape = class_combo(label)
        size = self.size

        # background: grey level with a slight tint, plus pixel noise; (H, W, 3) uint8
        base = rng.uniform(60, 190) + rng.uniform(-15, 15, size=3)
        pixels = base + rng.normal(0, 18, size=(size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

        # shape: radius 18-32% of the side, kept clear of the border (eval centre-crops ~10%)
        r = rng.uniform(0.18, 0.32) * size
        margin = 0.06 * size
        cx, cy = rng.uniform(r + margin, size - r - margin, size=2)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour_name]) + rng.uniform(-25, 25, 3), 0, 255))
        _draw(ImageDraw.Draw(image), shape, cx, cy, r, fill)
        return image, label


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill=fill)
    elif shape == "cross":
        t = max(1.0, 0.3 * r)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.35 * r)))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
