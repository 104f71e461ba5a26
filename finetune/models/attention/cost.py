"""Analytic cost of the attention core (what `attend` computes), per image, for every variant.

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

from typing import Any, Optional, Sequence

from .base import AttentionConfigError

# Variants computed in fp32 whatever the input dtype (autocast is disabled inside them).
_FP32_CORE = {"performer", "nystrom", "atrous_linear"}


def _softmax_flops(N: int, D: int) -> int:
    return 2 * N * N * D + 2 * N * N * D  # q k^T, attn v


def attention_flops(variant: str, N: int, D: int, H: int, **hparams: Any) -> int:
    """Forward FLOPs (2 per multiply-add) of one image's attention core, all heads.

    Hyperparameters as the variants take them, with their defaults; `atrous_linear` also takes
    `num_prefix_tokens` (default 1), and `nystrom` `conv_kernel` (the value residual, default None).
    """
    if variant == "softmax":
        per_head = _softmax_flops(N, D)
    elif variant == "linformer":
        k = hparams.get("rank", 64)
        per_head = 2 * k * N * D * 2 + 2 * N * k * D * 2  # E^T K, F^T V; q K'^T, attn V'
    elif variant == "performer":
        m = hparams.get("features", 64)
        per_head = 2 * N * m * D * 2 + 2 * N * m * (D + 1) * 2  # phi(q), phi(k); phi(K)^T [V,1], phi(Q) ctx
    elif variant == "nystrom":
        m = hparams.get("landmarks", 32)
        iters = hparams.get("pinv_iterations", 6)
        conv = hparams.get("conv_kernel")
        if m >= N:
            per_head = _softmax_flops(N, D)
        else:
            per_head = (
                2 * N * m * D  # kernel_1 = q k~^T
                + 2 * m * m * D  # kernel_2 = q~ k~^T
                + 2 * m * N * D  # kernel_3 = q~ k^T
                + 2 * m * N * D  # kernel_3 v
                + iters * 4 * 2 * m * m * m  # Razavi iteration: four m x m x m products each
                + 2 * m * m * D  # pinv @ context
                + 2 * N * m * D  # kernel_1 @ context
            )
        if conv is not None:
            per_head += 2 * N * D * conv  # depthwise (conv_kernel x 1) residual on v
    elif variant == "atrous_linear":
        m = hparams.get("features", 64)
        w2 = hparams.get("window", 3) ** 2
        P = hparams.get("num_prefix_tokens", 1)
        Np = N - P
        per_head = (
            2 * P * N * D * 2  # prefix queries: exact softmax over all N keys
            + 2 * Np * m * D * 2  # feature projections of patch q and k
            + 2 * Np * m * (D + 1) * 2  # phi(K)^T [V,1]; phi(q) @ context
            + 2 * Np * w2 * D * 2  # window logits; window weights @ V
            + 2 * Np * P * D * 2  # prefix-key logits; their weights @ V
            + 2 * Np * w2 * m  # phi(q_i) . phi(k_j) on the window
        )
        if hparams.get("fusion", "sum") == "gate":
            per_head += 2 * Np * D  # gate logits q_i . a_h
    else:
        raise AttentionConfigError(f"no cost model for attention variant {variant!r}")
    return int(H * per_head)


def uncounted_flops(variant: str, N: int, D: int, H: int, **hparams: Any) -> int:
    """The part of `attention_flops` that FlopCounterMode cannot see: multiply-adds done elementwise.

    Only `atrous_linear` has any: its window products (w*w logits and feature terms per patch, and the
    window-weighted sum of values) run as shifted elementwise products with a hand-written backward,
    which is much faster than Np tiny batched matmuls and never materialises the windows.
    """
    if variant != "atrous_linear":
        return 0
    m = hparams.get("features", 64)
    w2 = hparams.get("window", 3) ** 2
    Np = N - hparams.get("num_prefix_tokens", 1)
    return int(H * (2 * Np * w2 * D * 2 + 2 * Np * w2 * m))


def attention_activation_bytes(
    variant: str,
    N: int,
    D: int,
    H: int,
    dtype_bytes: int = 4,
    fused: bool = True,
    **hparams: Any,
) -> int:
    """Bytes autograd saves inside one image's attention core (all heads), excluding q, k, v.

    `dtype_bytes` is the element size of the input dtype; performer, nystrom and atrous_linear
    compute in fp32 regardless (and keep fp32 copies of lower-precision q, k, v). `fused` (softmax only): SDPA's kernels keep O(N) statistics, the
    readable path keeps the N x N attention matrix. Small O(H N) terms (row maxima, denominators) are
    included where they are saved; index tensors are not. q, k, v are assumed laid out as
    `AttentionBase.forward` makes them (strided views of one qkv tensor), which decides where torch
    copies them.
    """
    b = 4 if variant in _FP32_CORE else dtype_bytes
    # Inputs below fp32 are copied to fp32 by the fp32-core variants (and those copies are saved).
    upcast = 3 * N * D if (variant in _FP32_CORE and dtype_bytes < 4) else 0
    if variant == "softmax":
        if fused:
            elems = N * D + N  # output + log-sum-exp
        else:
            elems = N * D + N * N  # q * scale; softmax output (N x N)
    elif variant == "linformer":
        k = hparams.get("rank", 64)
        elems = N * D + 2 * k * D + N * k  # q * scale; K', V'; attention (N x k)
    elif variant == "performer":
        m = hparams.get("features", 64)
        # scaled q, k; exponents, their exps and features of q and k (relu: pre-activations and
        # features); [V,1] and the output; context
        feature_maps = 3 * N * m if hparams.get("kernel", "softmax") == "relu" else 6 * N * m + N
        elems = 2 * N * D + feature_maps + 2 * N * (D + 1) + m * (D + 1)
    elif variant == "nystrom":
        m = hparams.get("landmarks", 32)
        iters = hparams.get("pinv_iterations", 6)
        if m >= N:
            return attention_activation_bytes("softmax", N, D, H, dtype_bytes, fused=True)
        # scaled q; kernels 1 and 3; landmarks and contexts; kernel 2 and ~6 m x m iterates per pinv step
        elems = N * D + 2 * N * m + 4 * m * D + (6 * iters + 2) * m * m
    elif variant == "atrous_linear":
        m = hparams.get("features", 64)
        w2 = hparams.get("window", 3) ** 2
        P = hparams.get("num_prefix_tokens", 1)
        Np = N - P
        elems = (
            P * D + P * N  # prefix queries: scaled q, attention over all N keys
            + 6 * Np * D  # q, k scaled for the features; scaled q, k, v, and the tail's values for the windows
            + 8 * Np * m  # exps of the feature exponents, kernel parts e(q), e(k), phi(k) (+ transposed copy), phi(q)
            + Np * (D + 1) + m * (D + 1)  # [V,1]; context
            + 4 * Np * w2  # window logits, exact weights, phi terms, combined weights
            + 4 * Np + 4 * Np * P  # denominators and tail weights; prefix logits and weights
        )
    else:
        raise AttentionConfigError(f"no cost model for attention variant {variant!r}")
    return int(H * (elems + upcast) * b)


def attention_cost_table(
    variants: Sequence[str], N: int, D: int, H: int, hparams: Optional[dict] = None
) -> dict:
    """{variant: {"flops": int, "activation_bytes": int}} for a quick comparison at one N."""
    hparams = hparams or {}
    return {
        v: {
            "flops": attention_flops(v, N, D, H, **hparams.get(v, {})),
            "activation_bytes": attention_activation_bytes(v, N, D, H, **hparams.get(v, {})),
        }
        for v in variants
    }
