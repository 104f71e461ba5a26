"""`TrainConfig`: every knob of one fine-tuning run, shared by `vitsweep train`, sweep configs and the
Ray trainable. Values are validated here, before any model, dataset or Ray worker exists, and every
error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple
from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTS = ("timm", "none")
VARIANTS = ("softmax", "linformer", "performer", "nystrom", "atrous_linear")
DEFAULT_MODEL = "vit_small_patch16_224"
# In21k-only weights: the ImageNet-1k fine-tuned tags have already seen ImageNet-100's images.
DEFAULT_PRETRAINED_TAG = "augreg_in21k"



@dataclass
class TrainConfig:
    """One fine-tuning run. Attention hyperparameters left at None take the variant's defaults."""

    # model
    model: str = DEFAULT_MODEL
    pretrained: bool = True
    pretrained_tag: Optional[str] = DEFAULT_PRETRAINED_TAG
    weights: Optional[str] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    depth: Optional[int] = None  # fewer blocks than the architecture (tiny smoke/test models)
    drop_path: float = 0.0
    # attention
    variant: str = "softmax"
    rank: Optional[int] = None
    share_kv: Optional[bool] = None
    features: Optional[int] = None
    redraw_interval: Optional[int] = None
    kernel: Optional[str] = None
    landmarks: Optional[int] = None
    pinv_iterations: Optional[int] = None
    conv_kernel: Optional[int] = None
    dilation: Optional[Tuple[int, ...]] = None
    window: Optional[int] = None
    fusion: Optional[str] = None
    # data
    data: str = "synthetic"
    augment: str = "timm"
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: Optional[float] = 0.4
    num_workers: int = 2
    skip_bad_images: bool = False
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    layer_decay: Optional[float] = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: Optional[float] = 1.0
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    topk: Tuple[int, ...] = (1, 5)
    compile: bool = False
    max_train_batches: Optional[int] = None
    max_val_batches: Optional[int] = None
    log_interval: int = 20

    # ---------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a flat mapping (CLI, YAML, Ray config); unknown keys are an error."""
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown config key(s): {', '.join(hints)}; allowed keys: {', '.join(names)}")
        cfg = cls(**{k: _normalise(k, v) for k, v in values.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Checks that need no model or data. Geometry checks live in `finetune.models.check_config`."""
        _choice("variant", self.variant, VARIANTS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("augment", self.augment, AUGMENTS)
        for key in ("epochs", "batch_size", "log_interval"):
            _positive_int(key, getattr(self, key))
        for key in ("lr", "min_lr"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0 and key == "lr" or value < 0:
                raise ConfigError(f"{key}={value!r} must be a positive number")
        for key in ("weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix", "drop_path"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key}={value!r} must be a number >= 0")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be smaller than epochs={self.epochs}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay={self.layer_decay} must be in (0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be > 0 (or null for no clipping)")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers!r} must be an integer >= 0")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be an integer >= 0")
        for key in ("img_size", "patch_size", "depth", "max_train_batches", "max_val_batches"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        if self.img_size is not None and self.patch_size is not None and self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        if not self.topk or any(not isinstance(k, int) or k < 1 for k in self.topk):
            raise ConfigError(f"topk={list(self.topk)!r} must be a non-empty list of integers >= 1")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"scale={list(self.scale)!r} must satisfy 0 < min <= max <= 1")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"hflip={self.hflip} must be a probability in [0, 1]")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ConfigError(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        if self.pretrained and self.weights:
            raise ConfigError("pass either pretrained=true (hub weights) or weights=PATH, not both")

    def attention_hparams(self) -> Dict[str, Any]:
        """The hyperparameters the chosen variant consumes (others are ignored)."""
        from .models.attention import variant_hparams

        return variant_hparams(self.variant, self.to_dict())


def _normalise(key: str, value: Any) -> Any:
    """Coerce YAML/JSON/CLI shapes: lists to tuples, a single dilation/topk to a 1-tuple."""
    if key in ("dilation", "topk") and isinstance(value, int):
        return (value,)
    if key in ("dilation", "topk", "scale") and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; allowed: {', '.join(allowed)}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
