"""`HParam`: one declared hyperparameter of an attention variant (type, default, range, help, label).

A variant class lists its hyperparameters as ``hparams = {"rank": HParam(int, 64, "...", minimum=1)}``;
everything else (CLI flags, config validation, search-space blocks, labels) is derived from that
table. `HParam.coerce` is the one check of a value: it refuses bools given as numbers, non-finite
floats, wrong types and out-of-range values with an `AttentionConfigError` that names the variant,
the key, the value and what is allowed. This module imports nothing from the project but the errors.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from ...errors import AttentionConfigError

KINDS = (int, float, bool, str)


@dataclass(frozen=True)
class HParam:
    """A variant's constructor keyword.

    Args:
        type: int, float, bool or str (the element type when `sequence`).
        default: the value used when a config does not set it (None only with `optional`).
        help: one line for ``vitsweep train --help`` (the flag's help names the variant too).
        minimum, maximum: inclusive bounds (numbers).
        choices: the allowed values.
        odd: integers only: the value must be odd.
        sequence: a non-empty tuple of `type` values (YAML lists, CLI ``nargs=+``; a bare value is a 1-tuple).
        optional: None is allowed and means "off" (e.g. no residual conv).
        short: the name in labels such as ``linformer k=16`` (default: the key).
        sweep: the values a sweep uses by default: one value is fixed, several are a grid; () leaves
            the key out of the default search-space block.
        why: why the range is what it is, appended to the error message of a refused value.
    """

    type: type
    default: Any
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    odd: bool = False
    sequence: bool = False
    optional: bool = False
    short: str = ""
    sweep: Tuple[Any, ...] = ()
    why: str = ""

    def __post_init__(self) -> None:
        if self.type not in KINDS:
            raise TypeError(f"HParam type must be one of {[k.__name__ for k in KINDS]}, not {self.type!r}")
        if self.default is None and not self.optional:
            raise TypeError("HParam default None needs optional=True")

    # ---------------------------------------------------------------- description
    def allowed(self) -> str:
        """What `coerce` accepts, in words (used in error messages and help)."""
        what = self._element_allowed()
        if self.sequence:
            what = f"a non-empty list of values each {what}"
        return what + (" (or null: off)" if self.optional else "")

    def _element_allowed(self) -> str:
        if self.choices is not None:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.type is bool:
            what = "true or false"
        elif self.type is str:
            what = "a string"
        else:
            noun = ("an odd integer" if self.odd else "an integer") if self.type is int else "a finite number"
            if self.minimum is not None and self.maximum is not None:
                what = f"{noun} in [{self.minimum}, {self.maximum}]"
            elif self.minimum is not None:
                what = f"{noun} >= {self.minimum}"
            elif self.maximum is not None:
                what = f"{noun} <= {self.maximum}"
            else:
                what = noun
        return what

    def label(self, key: str, value: Any) -> str:
        """``short=value``, sequences joined by commas (``dil=1,2,3``)."""
        if isinstance(value, (list, tuple)):
            text = ",".join(_label_value(v) for v in value)
        else:
            text = _label_value(value)
        return f"{self.short or key}={text}"

    # ---------------------------------------------------------------- the one check
    def coerce(self, variant: str, key: str, value: Any) -> Any:
        """`value` in canonical form (ints, floats, tuples), or AttentionConfigError naming it."""
        if value is None:
            if self.optional:
                return None
            raise AttentionConfigError(f"{variant} {key}=None must be {self.allowed()}")
        if not self.sequence:
            return self._scalar(variant, key, value, value)
        if isinstance(value, (str, bytes)):
            raise AttentionConfigError(f"{variant} {key}={value!r} must be {self.allowed()}")
        if not isinstance(value, (list, tuple)):
            return (self._scalar(variant, key, value, value),)  # a bare value is a 1-tuple
        if not value:
            raise AttentionConfigError(f"{variant} {key}={tuple(value)!r} must be {self.allowed()}")
        return tuple(self._scalar(variant, key, v, value) for v in value)

    def _scalar(self, variant: str, key: str, value: Any, whole: Any) -> Any:
        why = f" ({self.why})" if self.why else ""
        if whole is value:
            fail = AttentionConfigError(f"{variant} {key}={value!r} must be {self.allowed()}{why}")
        else:  # one element of a sequence
            fail = AttentionConfigError(
                f"{variant} {key}={value!r} (in {list(whole)!r}) must be {self._element_allowed()}{why}"
            )
        if self.type is bool:
            if not isinstance(value, bool):
                raise fail
        elif self.type is str:
            if not isinstance(value, str):
                raise fail
        elif isinstance(value, bool):
            raise fail
        elif self.type is int:
            try:
                value = operator.index(value)  # numpy integers too; 2.0 and "2" are refused
            except TypeError:
                raise fail from None
            if self.odd and value % 2 == 0:
                raise fail
        else:
            if not isinstance(value, numbers.Real):
                raise fail
            value = float(value)
            if not math.isfinite(value):
                raise fail
        if self.minimum is not None and value < self.minimum:
            raise fail
        if self.maximum is not None and value > self.maximum:
            raise fail
        if self.choices is not None and value not in self.choices:
            raise fail
        return value


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
