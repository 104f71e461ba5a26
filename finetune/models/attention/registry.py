"""Attention variants by name or import path: the one plug-in point between configs and timm's `attn_layer`.

Built-in variants register a name (`register_attention`); any other `AttentionBase` subclass is used
by its import path, ``package.module:ClassName``, with no registration and no fork. Everything that
lists variants or their hyperparameters (CLI flags, config validation, search-space blocks, labels,
the cost model, benchmarks) asks this module.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import torch

from .base import RESERVED, AttentionBase, AttentionConfigError
from .hparams import HParam

ATTENTION_VARIANTS: Dict[str, Type[AttentionBase]] = {}
PLUGIN_SYNTAX = "a plug-in is given by import path, 'package.module:ClassName'"


def _check_declaration(cls: Type[AttentionBase], variant: str) -> None:
    """A variant class must be a concrete AttentionBase with a well-formed `hparams` table."""
    if not (inspect.isclass(cls) and issubclass(cls, AttentionBase)):
        raise AttentionConfigError(
            f"attention variant {variant!r} is not a subclass of finetune.models.attention.AttentionBase ({cls!r})"
        )
    if inspect.isabstract(cls):
        raise AttentionConfigError(f"attention variant {variant!r} ({cls.__name__}) does not implement attend(q, k, v)")
    if not isinstance(cls.hparams, Mapping):
        raise AttentionConfigError(f"attention variant {variant!r}: hparams must be a dict of name -> HParam")
    for name, hp in cls.hparams.items():
        if not isinstance(hp, HParam):
            raise AttentionConfigError(f"attention variant {variant!r}: hparams[{name!r}] must be an HParam, not {hp!r}")
        if not name.isidentifier() or name in RESERVED or hasattr(AttentionBase, name):
            raise AttentionConfigError(
                f"attention variant {variant!r}: hyperparameter name {name!r} is not an identifier or is taken by "
                "AttentionBase; pick another name"
            )


def register_attention(name: str) -> Callable[[Type[AttentionBase]], Type[AttentionBase]]:
    """Class decorator: make a variant buildable by `name` (and give it CLI flags and config keys).

    A hyperparameter name shared with another registered variant must have the same type and
    sequence-ness, since both are set by one flag and one config key."""

    def wrap(cls: Type[AttentionBase]) -> Type[AttentionBase]:
        if name in ATTENTION_VARIANTS and ATTENTION_VARIANTS[name] is not cls:
            raise AttentionConfigError(f"attention variant {name!r} is registered twice")
        _check_declaration(cls, name)
        for key, hp in cls.hparams.items():
            for other, other_hp in declared_hparams().get(key, []):
                if (other_hp.type, other_hp.sequence) != (hp.type, hp.sequence):
                    raise AttentionConfigError(
                        f"attention variant {name!r} declares {key!r} as {hp.type.__name__}"
                        f"{' list' if hp.sequence else ''}, but {other!r} declares it differently"
                    )
        ATTENTION_VARIANTS[name] = cls
        cls.variant_name = name
        return cls

    return wrap


def builtin_variants() -> Tuple[str, ...]:
    """Registered variant names, in registration order."""
    return tuple(ATTENTION_VARIANTS)


def declared_hparams() -> Dict[str, List[Tuple[str, HParam]]]:
    """{hyperparameter name: [(variant, HParam), ...]} over the registered variants, in order."""
    table: Dict[str, List[Tuple[str, HParam]]] = {}
    for variant, cls in ATTENTION_VARIANTS.items():
        for key, hp in cls.hparams.items():
            table.setdefault(key, []).append((variant, hp))
    return table


def _suggest(value: str, allowed) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.lru_cache(maxsize=64)
def _import_variant(path: str) -> Type[AttentionBase]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise AttentionConfigError(f"attention variant {path!r}: {PLUGIN_SYNTAX}")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as err:
        raise AttentionConfigError(
            f"attention variant {path!r}: module {module_name!r} cannot be imported ({type(err).__name__}: {err}); "
            "is its directory on PYTHONPATH?"
        ) from None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a plug-in's own code ran: sys.exit() included
        what = f"called sys.exit({err.code!r})" if isinstance(err, SystemExit) else f"raised {type(err).__name__}: {err}"
        raise AttentionConfigError(f"attention variant {path!r}: importing module {module_name!r} {what}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttentionConfigError(f"attention variant {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    _check_declaration(obj, path)
    return obj


def get_attention_class(variant: str) -> Type[AttentionBase]:
    """The class of a registered name (``linformer``) or an import path (``my_pkg.attn:MyAttention``)."""
    if not isinstance(variant, str):
        raise AttentionConfigError(f"attention variant {variant!r} must be a name or 'package.module:ClassName'")
    if ":" in variant:
        return _import_variant(variant)
    try:
        return ATTENTION_VARIANTS[variant]
    except KeyError:
        allowed = ", ".join(ATTENTION_VARIANTS)
        raise AttentionConfigError(
            f"unknown attention variant {variant!r}{_suggest(variant, ATTENTION_VARIANTS)}; built-in: {allowed}; "
            f"{PLUGIN_SYNTAX}"
        ) from None


def variant_path(variant: str) -> str:
    """``module:Class`` of a variant, importable without any registration (for weight sidecars)."""
    cls = get_attention_class(variant)
    return f"{cls.__module__}:{cls.__qualname__}"


def variant_hparams(variant: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """The subset of a flat config that `variant` declares, checked; None means "the variant's default"."""
    cls = get_attention_class(variant)
    return cls.check_hparams({k: config[k] for k in cls.hparams if config.get(k) is not None})


def variant_label(variant: str, hparams: Mapping[str, Any]) -> str:
    """A short human label: ``atrous_linear dil=1,2,3 w=3 m=16``, ``linformer k=16``, ``softmax``.

    Shows the given hyperparameters (None: unset) in declaration order, by their `HParam.short` names;
    a plug-in is named by its class name."""
    cls = get_attention_class(variant)
    values = cls.check_hparams({k: v for k, v in hparams.items() if v is not None})
    name = variant if ":" not in variant else cls.__name__
    parts = [cls.hparams[k].label(k, values[k]) for k in cls.hparams if k in values]
    return " ".join([name, *parts])


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
    bound = dict(grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **cls.check_hparams(hparams))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **{**bound, **kwargs})

    namespace = {"__init__": __init__, "__module__": cls.__module__, "bound_kwargs": bound, "variant_name": cls.variant_id()}
    return type(cls.__name__, (cls,), namespace)


def check_attention(
    variant: str,
    *,
    dim: int,
    num_heads: int,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
    **hparams: Any,
) -> None:
    """Validate a variant's hyperparameters for a geometry without allocating: build one on `meta`.

    A plug-in (a variant given by import path) is also run once (`dry_forward`) before any training:
    its code is checked, not trusted, and anything it raises becomes one AttentionConfigError."""
    layer = attention_layer(variant, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **hparams)
    plugin = ":" in variant
    try:
        with torch.device("meta"):
            layer(dim, num_heads=num_heads, qkv_bias=True)
    except AttentionConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a plug-in's check_geometry or constructor
        if not plugin:
            raise
        raise AttentionConfigError(
            f"attention variant {variant!r} ({layer.__name__}) raised {type(err).__name__} while being built "
            f"(check_geometry or __init__): {err}"
        ) from None
    if plugin:
        key = (variant, dim, num_heads, tuple(grid_size), num_prefix_tokens, repr(sorted(layer.bound_kwargs.items())))
        _dry_forward_cached(key, layer, dim, num_heads, variant)


_DRY_RUN_OK: set = set()


def _dry_forward_cached(key: tuple, layer: Type[AttentionBase], dim: int, num_heads: int, variant: str) -> None:
    if key not in _DRY_RUN_OK:
        dry_forward(layer, dim, num_heads, variant=variant)
        _DRY_RUN_OK.add(key)


def dry_forward(layer: Type[AttentionBase], dim: int, num_heads: int, batch: int = 2, variant: str = "") -> None:
    """Build `layer` on the CPU and call ``attend`` once on a small random batch, in eval and in train
    mode: the output must be a tensor of shape (B, H, N, D), of the input's dtype, all finite.
    Anything else (or an exception) is an AttentionConfigError naming the class: a plug-in returning
    (B, N, H, D) would otherwise reshape silently into wrong tokens, and float64 or NaN fail later."""
    name = f"{variant!r} ({layer.__name__})" if variant else layer.__name__
    try:
        module = layer(dim, num_heads=num_heads, qkv_bias=True)
    except Exception as err:  # noqa: BLE001
        raise AttentionConfigError(f"attention variant {name} raised {type(err).__name__} while being built: {err}") from None
    N = module.num_tokens or 1 + 4 * 4
    shape = (batch, module.num_heads, N, module.head_dim)  # (B, H, N, D)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    for training in (False, True):
        module.train(training)
        mode = "train" if training else "eval"
        try:
            with torch.no_grad():
                out = module.attend(q, k, v)
        except Exception as err:  # noqa: BLE001
            raise AttentionConfigError(
                f"attention variant {name}: attend(q, k, v) raised {type(err).__name__} on a dry run "
                f"({mode} mode, q, k, v of shape {list(shape)}): {err}"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise AttentionConfigError(f"attention variant {name}: attend(q, k, v) returned {type(out).__name__}, not a tensor")
        if tuple(out.shape) != shape:
            raise AttentionConfigError(
                f"attention variant {name}: attend(q, k, v) returned shape {list(out.shape)} for q, k, v of shape "
                f"{list(shape)}; it must return (B, H, N, D) = {list(shape)}"
            )
        if out.dtype != q.dtype:
            raise AttentionConfigError(
                f"attention variant {name}: attend(q, k, v) returned {out.dtype} for {q.dtype} inputs; it must "
                "return the dtype of its inputs"
            )
        if not bool(torch.isfinite(out).all()):
            raise AttentionConfigError(
                f"attention variant {name}: attend(q, k, v) returned non-finite values (NaN or inf) on a dry run "
                f"({mode} mode) with standard normal q, k, v of shape {list(shape)}"
            )
