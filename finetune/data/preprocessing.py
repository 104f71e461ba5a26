"""The input pipeline as data: what timm's pretrained config says (size, interpolation, crop, mean,
std) plus our augmentation knobs, written to `preprocessing.json` so a run can be reproduced and its
inputs un-normalised for plots."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from timm.data import create_transform, resolve_data_config

from ..errors import DataError

AUGMENTS = ("timm", "none")


@dataclass
class Preprocessing:
    """Everything needed to rebuild (or undo) the transforms of one run.

    Args:
        input_size: (C, H, W) the model sees.
        interpolation: resize interpolation ('bicubic', 'bilinear', ...).
        crop_pct: eval resize is `size / crop_pct` before the centre crop.
        crop_mode: timm's eval crop mode ('center', 'squash', 'border').
        mean, std: per-channel normalisation of [0, 1] images.
        augment: 'timm' (timm's training transform) or 'none' (eval transform for training too).
        scale: RandomResizedCrop area range (augment='timm').
        hflip: horizontal flip probability (augment='timm').
        color_jitter: ColorJitter strength, None for none (augment='timm').
    """

    input_size: Tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    augment: str = "timm"
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: Optional[float] = 0.4

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise DataError(f"augment={self.augment!r} is not allowed; allowed: {', '.join(AUGMENTS)}")
        self.input_size = tuple(int(v) for v in self.input_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.scale = tuple(float(v) for v in self.scale)

    def _common(self) -> Dict[str, Any]:
        return dict(input_size=self.input_size, interpolation=self.interpolation, mean=self.mean, std=self.std)

    def eval_transform(self) -> Callable:
        """PIL image -> normalised tensor [C, H, W]: resize, centre crop, to tensor, normalise."""
        return create_transform(
            **self._common(), is_training=False, crop_pct=self.crop_pct, crop_mode=self.crop_mode
        )

    def train_transform(self) -> Callable:
        """timm's training transform (random resized crop, flip, colour jitter), or the eval one."""
        if self.augment == "none":
            return self.eval_transform()
        return create_transform(
            **self._common(),
            is_training=True,
            scale=self.scale,
            hflip=self.hflip,
            # None (or 0) leaves ColorJitter out of timm's pipeline.
            color_jitter=self.color_jitter or None,
        )

    def to_dict(self) -> Dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["train_steps"] = [str(t) for t in self.train_transform().transforms]
        d["eval_steps"] = [str(t) for t in self.eval_transform().transforms]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preprocessing":
        """Inverse of `to_dict`; the derived `*_steps` entries are ignored, unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"train_steps", "eval_steps"}
        if unknown:
            raise DataError(f"unknown preprocessing key(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Preprocessing":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def resolve_preprocessing(
    model: torch.nn.Module,
    img_size: Optional[int],
    augment: str = "timm",
    scale: Tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: Optional[float] = 0.4,
) -> Preprocessing:
    """Preprocessing from the model's pretrained config (timm.data.resolve_data_config).

    `img_size=None` takes the size the model was built for (a ViT's `patch_embed.img_size`, which
    differs from its pretrained_cfg when created with `img_size=...`), else the pretrained one.
    """
    if img_size is None:
        grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if grid is not None and grid[0] == grid[1]:
            img_size = int(grid[0])
    args = {"img_size": img_size} if img_size is not None else {}
    cfg = resolve_data_config(args=args, model=model)
    return Preprocessing(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode", "center"),
        mean=cfg["mean"],
        std=cfg["std"],
        augment=augment,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
    )


def _stats(x: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    # (3,) -> (3, 1, 1), broadcast over [..., 3, H, W]
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(-1, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 3, H, W] (or [3, H, W]) in [0, 1] -> (x - mean) / std."""
    return (images - _stats(images, mean)) / _stats(images, std)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of `normalize`: x * std + mean (no clamping)."""
    return x * _stats(x, std) + _stats(x, mean)
