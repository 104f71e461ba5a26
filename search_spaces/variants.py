"""Variant blocks of a sweep, derived from each attention variant's own declaration.

`block(variant, **values)` gives ``{"variant": ..., "fixed": {...}, "search": {...}}`` for a sweep's
``variants:`` list. Every hyperparameter the variant declares with `HParam.sweep` values is in the
block by default; a keyword replaces its values. A one-value tuple is fixed, several are a grid::

    block("linformer")                                   # rank grid (32, 64), share_kv fixed False
    block("linformer", rank=(16,))                       # rank fixed at 16
    block("atrous_linear", dilation=((1, 2, 3), (1, 2)), features=(16,))
    block("my_pkg.attn:MyAttention", radius=(4, 8))     # a plug-in, by import path

A sequence hyperparameter (``dilation``) takes a tuple of sequences, one per candidate. Every value is
checked by the variant's `HParam`; geometry (rank vs. tokens, dilation vs. grid) is checked for each
configuration by `search_spaces.validate` before Ray starts.
"""

from __future__ import annotations

from typing import Any, Dict, List

from finetune.errors import ConfigError
from finetune.models.attention import get_attention_class
from finetune.models.attention.hparams import HParam


def _candidates(variant: str, key: str, hp: HParam, values: Any) -> List[Any]:
    """The candidate values of one key, each checked by its HParam, as YAML-shaped values (lists)."""
    if not isinstance(values, (list, tuple)):
        if hp.sequence:
            raise ConfigError(f"block({variant!r}, {key}={values!r}): give a tuple of candidate lists, e.g. {key}=((1, 2),)")
        values = (values,)
    out = []
    for value in values:
        if hp.sequence and not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"block({variant!r}, {key}={values!r}): each candidate of a list hyperparameter is itself a list; "
                f"e.g. {key}=({list(values)!r},) for one candidate"
            )
        value = hp.coerce(variant, key, value)
        out.append(list(value) if isinstance(value, tuple) else value)
    return out


def block(variant: str, **values: Any) -> Dict[str, Any]:
    """The sweep block of `variant`: its declared sweep values, with `values` (key=(v1, v2, ...)) instead."""
    cls = get_attention_class(variant)
    unknown = [k for k in values if k not in cls.hparams]
    if unknown:
        raise ConfigError(
            f"block({variant!r}): unknown hyperparameter(s) {unknown}; {variant} declares: {', '.join(cls.hparams) or 'none'}"
        )
    fixed: Dict[str, Any] = {}
    search: Dict[str, Any] = {}
    for key, hp in cls.hparams.items():
        candidates = _candidates(variant, key, hp, values[key] if key in values else hp.sweep)
        if len(candidates) == 1:
            fixed[key] = candidates[0]
        elif candidates:
            search[key] = {"grid": candidates}
    out: Dict[str, Any] = {"variant": variant}
    if fixed:
        out["fixed"] = fixed
    if search:
        out["search"] = search
    return out
