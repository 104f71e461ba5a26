"""`TrainConfig`: every knob of one fine-tuning run, shared by `vitsweep train`, sweep configs and the
Ray trainable. Values are validated here, before any model, dataset or Ray worker exists, and every
error names the key, the bad value and what is allowed.

The attention variant's own hyperparameters live in one field, ``attn``, and are declared by the
variant class (`finetune.models.attention`, asked through its registry): a flat key such as ``rank``
is still accepted and moves into ``attn`` when the chosen variant declares it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import AttentionConfigError, ConfigError
from .models.attention import builtin_variants, declared_hparams, get_attention_class

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTS = ("timm", "none")
# The built-in variant names (plug-ins are given by import path, 'package.module:ClassName').
VARIANTS = builtin_variants()
DEFAULT_MODEL = "vit_small_patch16_224"
# In21k-only weights: the ImageNet-1k fine-tuned tags have already seen ImageNet-100's images.
DEFAULT_PRETRAINED_TAG = "augreg_in21k"



@dataclass
class TrainConfig:
    """One fine-tuning run. `attn` holds the variant's hyperparameters that are set; the rest take the
    variant's defaults."""

    # model
    model: str = DEFAULT_MODEL
    pretrained: bool = True
    pretrained_tag: Optional[str] = DEFAULT_PRETRAINED_TAG
    weights: Optional[str] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    depth: Optional[int] = None  # fewer blocks than the architecture (tiny smoke/test models)
    drop_path: float = 0.0
    # attention: a built-in name or a plug-in's import path, and that variant's own hyperparameters
    variant: str = "softmax"
    attn: Dict[str, Any] = field(default_factory=dict)
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
        """Build from a mapping (CLI, YAML, Ray config); unknown keys are an error.

        Attention hyperparameters come as ``attn: {...}`` or as flat keys: a flat key the chosen
        variant declares moves into ``attn`` (over an ``attn`` entry of the same name; None means
        unset); a flat key only another registered variant declares is ignored, so a sweep can share
        e.g. ``features`` across variants.
        """
        names = cls.field_names()
        variant = values.get("variant", "softmax")
        attn_cls = get_attention_class(variant)
        attn = values.get("attn") or {}
        if not isinstance(attn, Mapping):
            raise AttentionConfigError(f"attn={attn!r} must be a mapping of the variant's hyperparameters")
        attn = dict(attn)
        others = declared_hparams()
        unknown = []
        for key, value in values.items():
            if key in names:
                continue
            if key in attn_cls.hparams:
                if value is None:
                    attn.pop(key, None)
                else:
                    attn[key] = value
            elif key not in others:
                unknown.append(key)
        if unknown:
            allowed = names + [k for k in others if k not in names]
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, allowed, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown config key(s): {', '.join(hints)}; allowed keys: {', '.join(allowed)}")
        fields = {k: _normalise(k, v) for k, v in values.items() if k in names}
        fields["attn"] = {k: v for k, v in attn.items() if v is not None}
        cfg = cls(**fields)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Checks that need no model or data (geometry checks: `finetune.train.check_config`).
        Normalises `attn` to the variant's canonical values (ints, floats, tuples)."""
        attn_cls = get_attention_class(self.variant)
        if not isinstance(self.attn, Mapping):
            raise AttentionConfigError(f"attn={self.attn!r} must be a mapping of the variant's hyperparameters")
        clash = sorted(set(attn_cls.hparams) & set(self.field_names()))
        if clash:
            raise AttentionConfigError(
                f"attention variant {self.variant!r} declares hyperparameter(s) {clash} that are TrainConfig keys; "
                "rename them in the variant"
            )
        self.attn = attn_cls.check_hparams(self.attn)
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
        """The variant's hyperparameters that are set, validated (the rest are the class's defaults)."""
        return get_attention_class(self.variant).check_hparams(self.attn)


def _normalise(key: str, value: Any) -> Any:
    """Coerce YAML/JSON/CLI shapes: lists to tuples, a single topk to a 1-tuple."""
    if key == "topk" and isinstance(value, int):
        return (value,)
    if key in ("topk", "scale") and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _plain(value: Any) -> Any:
    """JSON/YAML shapes: tuples as lists, also inside `attn`."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; allowed: {', '.join(allowed)}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
