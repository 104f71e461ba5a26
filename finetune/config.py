"""`TrainConfig`: every knob of one fine-tuning run, shared by `vitsweep train`, sweep configs and the
Ray trainable. Values are validated here, before any model, dataset or Ray worker exists, and every
error names the key, the bad value and what is allowed.

Each key is declared once: its type is the field's annotation and its range the `_key(...)` rule next
to it (`Rule`). `validate` derives every per-key check from these declarations: exact types (a YAML
string "false" is not a bool, 2.0 is not an integer, true is not a number), finite numbers, ranges and
choices. Only the checks that relate two keys are written out.

The attention variant's own hyperparameters live in one field, ``attn``, and are declared by the
variant class (`finetune.models.attention`, asked through its registry): a flat key such as ``rank``
is still accepted and moves into ``attn`` when the chosen variant declares it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import operator
import re
import typing
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
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,3})?"


@dataclass(frozen=True)
class Rule:
    """The range of one key: inclusive (`ge`, `le`) or exclusive (`gt`, `lt`) bounds on numbers (on
    each element of a tuple), `choices`, or a regular expression a string must match in full
    (`pattern`, described by `means`). Strings must be non-empty."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    pattern: Optional[str] = None
    means: str = ""

    def describe(self) -> str:
        """The range in words: "in [0, 1)", ">= 1", "one of 'a', 'b'" ("" when unbounded)."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.pattern is not None:
            return self.means
        low = f"[{_num(self.ge)}" if self.ge is not None else (f"({_num(self.gt)}" if self.gt is not None else None)
        high = f"{_num(self.le)}]" if self.le is not None else (f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if high:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return ""

    def admits(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return False
        return not (
            (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        )


def _key(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: Any):
    """A TrainConfig field with its `Rule`."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


@dataclass
class TrainConfig:
    """One fine-tuning run. `attn` holds the variant's hyperparameters that are set; the rest take the
    variant's defaults."""

    # model
    model: str = DEFAULT_MODEL
    pretrained: bool = True
    pretrained_tag: Optional[str] = DEFAULT_PRETRAINED_TAG
    weights: Optional[str] = None
    img_size: Optional[int] = _key(None, ge=1, le=4096)
    patch_size: Optional[int] = _key(None, ge=1, le=1024)
    depth: Optional[int] = _key(None, ge=1, le=1000)  # fewer blocks than the architecture (tiny smoke/test models)
    drop_path: float = _key(0.0, ge=0, lt=1)
    # attention: a built-in name or a plug-in's import path, and that variant's own hyperparameters
    variant: str = "softmax"
    attn: Dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "synthetic"
    augment: str = _key("timm", choices=AUGMENTS)
    scale: Tuple[float, float] = _key((0.08, 1.0), gt=0, le=1)
    hflip: float = _key(0.5, ge=0, le=1)
    color_jitter: Optional[float] = _key(0.4, ge=0, le=1)
    num_workers: int = _key(2, ge=0, le=256)
    skip_bad_images: bool = False
    # optimisation
    epochs: int = _key(10, ge=1, le=100_000)
    batch_size: int = _key(64, ge=1, le=65_536)
    lr: float = _key(1e-3, gt=0, le=1)
    weight_decay: float = _key(0.05, ge=0, le=1)
    warmup_epochs: float = _key(1.0, ge=0)
    min_lr: float = _key(1e-6, ge=0, le=1)
    layer_decay: Optional[float] = _key(None, gt=0, le=1)
    label_smoothing: float = _key(0.0, ge=0, lt=1)
    mixup: float = _key(0.0, ge=0, le=10)
    cutmix: float = _key(0.0, ge=0, le=10)
    clip_grad: Optional[float] = _key(1.0, gt=0, le=1e6)
    # run
    seed: int = _key(0, ge=0, le=2**32 - 1)
    device: str = _key("auto", pattern=DEVICE_PATTERN, means="auto, cpu, mps, cuda or cuda:N (N a device index)")
    precision: str = _key("fp32", choices=PRECISIONS)
    topk: Tuple[int, ...] = _key((1, 5), ge=1, le=1000)
    compile: bool = False
    tf32: bool = True  # fp32 matmuls/convolutions on CUDA tensor cores as TF32 (docs/gpu.md); no effect on CPU
    eval_at_start: bool = False
    max_train_batches: Optional[int] = _key(None, ge=1)
    max_val_batches: Optional[int] = _key(None, ge=1)
    log_interval: int = _key(20, ge=1, le=1_000_000)

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
        if not isinstance(values, Mapping):
            raise ConfigError(f"config must be a mapping of TrainConfig keys, not {type(values).__name__}: {values!r}")
        names = cls.field_names()
        variant = values.get("variant", "softmax")
        if not isinstance(variant, str) or not variant.strip():
            raise ConfigError(f"variant={variant!r} must be a non-empty string: {', '.join(VARIANTS)} or 'package.module:ClassName'")
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
                close = difflib.get_close_matches(str(k), allowed, n=1)
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
        Normalises every value to its canonical form (floats, tuples, `attn` to the variant's)."""
        for f in dataclasses.fields(self):
            if f.name != "attn":
                setattr(self, f.name, check_key(f.name, getattr(self, f.name)))
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
        # checks that relate two keys
        if self.warmup_epochs > self.epochs or (self.warmup_epochs == self.epochs and self.epochs > 1):
            raise ConfigError(f"warmup_epochs={self.warmup_epochs:g} must be smaller than epochs={self.epochs}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr:g} must be <= lr={self.lr:g} (the cosine schedule decays from lr to min_lr)")
        if self.img_size is not None and self.patch_size is not None and self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        lo, hi = self.scale
        if lo > hi:
            raise ConfigError(f"scale={list(self.scale)!r} must satisfy 0 < min <= max <= 1")
        if self.pretrained and self.weights:
            raise ConfigError("pass either pretrained=true (hub weights) or weights=PATH, not both")

    def attention_hparams(self) -> Dict[str, Any]:
        """The variant's hyperparameters that are set, validated (the rest are the class's defaults)."""
        return get_attention_class(self.variant).check_hparams(self.attn)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def key_allowed(name: str) -> str:
    """What key `name` accepts, in words, from its declaration."""
    rule: Rule = _FIELDS[name].metadata.get("rule", Rule())
    kind, optional = _unwrap(_TYPES[name])
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        count = "a non-empty list of" if args[-1] is Ellipsis else f"a list of {len(args)}"
        rng = rule.describe()
        what = f"{count} {_noun(args[0], Rule(), plural=True)}" + (f", each {rng}" if rng else "")
    else:
        what = _noun(kind, rule)
    return what + (" (or null)" if optional else "")


def check_key(name: str, value: Any) -> Any:
    """`value` of key `name` in canonical form, or a ConfigError naming key, value and what is allowed."""
    rule: Rule = _FIELDS[name].metadata.get("rule", Rule())
    kind, optional = _unwrap(_TYPES[name])
    if value is None and optional:
        return None

    def fail() -> ConfigError:
        hint = ""
        if kind is bool and isinstance(value, str):
            hint = " (a YAML boolean such as true, not a string)"
        elif isinstance(value, float) and not math.isfinite(value):
            hint = " (NaN and infinity are not allowed)"
        elif rule.choices is not None:
            close = difflib.get_close_matches(str(value), [str(c) for c in rule.choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{name}={_plain(value)!r} must be {key_allowed(name)}{hint}")

    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or not value:
            raise fail()
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise fail()
        out = []
        for element in value:
            element = _scalar(args[0], element, fail)
            if not rule.admits(element):
                raise fail()
            out.append(element)
        return tuple(out)
    value = _scalar(kind, value, fail)
    if not rule.admits(value):
        raise fail()
    return value


def _unwrap(hint: Any) -> Tuple[Any, bool]:
    """(the type, whether None is allowed) of Optional[X] or X."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _noun(kind: Any, rule: Rule, plural: bool = False) -> str:
    """"a positive integer <= 100000", "a number in [0, 1)", "one of 'timm', 'none'", "true or false"."""
    if kind is bool:
        return "true or false"
    if kind is str:
        return rule.describe() or ("non-empty strings" if plural else "a non-empty string")
    if rule.choices is not None:
        return rule.describe()
    if kind is int and rule.ge == 1:
        noun, rest = "positive integer", Rule(le=rule.le).describe()
    elif kind is float and rule.gt == 0:
        noun, rest = "positive number", Rule(le=rule.le, lt=rule.lt).describe()
    else:
        noun, rest = ("integer" if kind is int else "number"), rule.describe()
    if plural:
        noun += "s"
    else:
        noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    return noun + (f" {rest}" if rest else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _scalar(kind: Any, value: Any, fail) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise fail()
        return value
    if kind is int:
        if isinstance(value, bool):
            raise fail()
        try:
            return operator.index(value)  # numpy integers too; 2.0 and "2" are refused
        except TypeError:
            raise fail() from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise fail()
        value = float(value)
        if not math.isfinite(value):
            raise fail()
        return value
    if kind is dict or typing.get_origin(kind) is dict:
        if not isinstance(value, Mapping):
            raise fail()
        return value
    raise TypeError(f"TrainConfig declares an unsupported type {kind!r}")


def _normalise(key: str, value: Any) -> Any:
    """Coerce YAML/JSON/CLI shapes: a single topk to a 1-tuple (lists become tuples in `check_key`)."""
    if key == "topk" and isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return value


def _plain(value: Any) -> Any:
    """JSON/YAML shapes: tuples as lists, also inside `attn`."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
