"""Attention variants keyed by name: the one plug-in point between configs and timm's `attn_layer`."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

import torch

from .base import AttentionBase, AttentionConfigError

ATTENTION_VARIANTS: Dict[str, Type[AttentionBase]] = {}


def register_attention(name: str) -> Callable[[Type[AttentionBase]], Type[AttentionBase]]:
    """Class decorator: make a variant buildable by `name`."""

    def wrap(cls: Type[AttentionBase]) -> Type[AttentionBase]:
        if name in ATTENTION_VARIANTS and ATTENTION_VARIANTS[name] is not cls:
            raise ValueError(f"attention variant {name!r} is registered twice")
        ATTENTION_VARIANTS[name] = cls
        cls.variant_name = name
        return cls

    return wrap


def _suggest(value: str, allowed) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_attention_class(variant: str) -> Type[AttentionBase]:
    try:
        return ATTENTION_VARIANTS[variant]
    except KeyError:
        allowed = ", ".join(sorted(ATTENTION_VARIANTS))
        raise AttentionConfigError(
            f"unknown attention variant {variant!r}{_suggest(variant, ATTENTION_VARIANTS)}; allowed: {allowed}"
        ) from None


def variant_hparams(variant: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """The subset of a flat config that `variant` consumes; None means "the variant's default"."""
    cls = get_attention_class(variant)
    return {k: config[k] for k in cls.hparams if config.get(k) is not None}


def attention_layer(
    variant: str,
    *,
    grid_size: Optional[Tuple[int, int]],
    num_prefix_tokens: int,
    **hparams: Any,
) -> Type[AttentionBase]:
    """A class for timm's ``attn_layer=`` with geometry and the variant's hyperparameters bound.

    timm checks ``issubclass(attn_layer, ...)``, so a `functools.partial` will not do: this returns a
    thin subclass of the variant whose constructor fills in the bound keyword arguments.
    """
    cls = get_attention_class(variant)
    unknown = sorted(set(hparams) - set(cls.hparams))
    if unknown:
        allowed = ", ".join(cls.hparams) or "none"
        raise AttentionConfigError(
            f"unknown hyperparameter(s) {unknown} for attention variant {variant!r}; allowed: {allowed}"
        )
    bound = dict(grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **hparams)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **{**bound, **kwargs})

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "bound_kwargs": bound})


def check_attention(
    variant: str,
    *,
    dim: int,
    num_heads: int,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
    **hparams: Any,
) -> None:
    """Validate a variant's hyperparameters for a geometry without allocating: build one on `meta`."""
    layer = attention_layer(variant, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **hparams)
    with torch.device("meta"):
        layer(dim, num_heads=num_heads, qkv_bias=True)
