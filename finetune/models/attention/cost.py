"""Analytic cost of the attention core (what `attend` computes), per image: a dispatch to the variant
class's own `flops`, `uncounted_flops` and `activation_bytes` (formulas live with each variant).

`attention_flops` counts the forward FLOPs of the products inside `attend` with a multiply-add as 2
FLOPs, the convention of `torch.utils.flop_counter.FlopCounterMode`; like it, elementwise maps,
reductions, exponentials and softmax are not counted. FlopCounterMode sees matmuls and convolutions
only, so the hybrid's window products, which run elementwise, are invisible to it: `uncounted_flops`
gives that part, and the tests check ``attention_flops - uncounted_flops`` against FlopCounterMode on
each variant's pure function. Exact softmax is counted as its readable path (two N x N x D
products); SDPA kernels do the same arithmetic.

`attention_activation_bytes` is the memory autograd keeps for the backward pass inside `attend`
(intermediates saved by the core, not q, k, v themselves), which is what grows with N during
training; the tests check it against the storages actually saved (`saved_tensors_hooks`).

Symbols: N tokens (P prefix + Np = Hp * Wp patches), D head width, H heads, m random features /
landmarks, k rank, w window. Costs are per image (batch 1); multiply by B.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

from .base import AttentionBase
from .registry import get_attention_class


def _resolve(variant: str, hparams: Dict[str, Any]) -> Tuple[Type[AttentionBase], int, Dict[str, Any]]:
    """(class, num_prefix_tokens, every declared hyperparameter with defaults filled in)."""
    cls = get_attention_class(variant)
    prefix = hparams.pop("num_prefix_tokens", 1)
    return cls, prefix, cls.resolve_hparams(hparams)


def attention_flops(variant: str, N: int, D: int, H: int, **hparams: Any) -> Optional[int]:
    """Forward FLOPs (2 per multiply-add) of one image's attention core, all heads.

    Hyperparameters as the variant declares them, unset ones at their defaults, plus
    `num_prefix_tokens` (default 1). None when the variant declares no cost model (a plug-in may not).
    """
    cls, prefix, hp = _resolve(variant, dict(hparams))
    flops = cls.flops(N, D, H, num_prefix_tokens=prefix, **hp)
    return None if flops is None else int(flops)


def uncounted_flops(variant: str, N: int, D: int, H: int, **hparams: Any) -> int:
    """The part of `attention_flops` that FlopCounterMode cannot see: multiply-adds done elementwise.

    Only `atrous_linear` has any among the built-ins: its window products run as shifted elementwise
    products with a hand-written backward, much faster than Np tiny batched matmuls.
    """
    cls, prefix, hp = _resolve(variant, dict(hparams))
    return int(cls.uncounted_flops(N, D, H, num_prefix_tokens=prefix, **hp))


def attention_activation_bytes(
    variant: str,
    N: int,
    D: int,
    H: int,
    dtype_bytes: int = 4,
    fused: bool = True,
    **hparams: Any,
) -> Optional[int]:
    """Bytes autograd saves inside one image's attention core (all heads), excluding q, k, v.

    `dtype_bytes` is the element size of the input dtype; performer, nystrom and atrous_linear
    compute in fp32 regardless (and keep fp32 copies of lower-precision q, k, v). `fused` (softmax
    only): SDPA's kernels keep O(N) statistics, the readable path keeps the N x N attention matrix.
    Small O(H N) terms (row maxima, denominators) are included where they are saved; index tensors
    are not. q, k, v are assumed laid out as `AttentionBase.forward` makes them (strided views of one
    qkv tensor), which decides where torch copies them. None when the variant declares no model.
    """
    cls, prefix, hp = _resolve(variant, dict(hparams))
    size = cls.activation_bytes(N, D, H, dtype_bytes=dtype_bytes, fused=fused, num_prefix_tokens=prefix, **hp)
    return None if size is None else int(size)
