"""Exact softmax attention, the baseline.

``softmax(q k^T / sqrt(D)) v`` through `F.scaled_dot_product_attention` (flash / memory-efficient
kernels on GPU), or the readable matmul path when `fused_attn` is off (FLOP counting, debugging).
Cost: O(N^2 D) time per head; O(N) memory with the fused kernels, O(N^2) on the readable path.
Outputs equal timm's stock `Attention` with the same weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn

from .base import AttentionBase
from .registry import register_attention


def softmax_flops(N: int, D: int) -> int:
    """Per head: q k^T and attn v, 2 FLOPs per multiply-add."""
    return 2 * N * N * D + 2 * N * N * D


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    fused: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention. q, k, v: [B, H, N, D] -> [B, H, N, D]."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v  # (B, H, N, D)


@register_attention("softmax")
class SoftmaxAttention(AttentionBase):
    """timm-compatible exact attention; `fused_attn` picks SDPA or the readable path."""

    hparams = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_attn = use_fused_attn()

    @classmethod
    def flops(cls, N, D, H, *, num_prefix_tokens, **hparams):
        # Counted as the readable path (two N x N x D products); SDPA kernels do the same arithmetic.
        return H * softmax_flops(N, D)

    @classmethod
    def activation_bytes(cls, N, D, H, *, dtype_bytes, fused, num_prefix_tokens, **hparams):
        # fused: SDPA keeps the output and the log-sum-exp; readable: q * scale and the N x N softmax.
        elems = N * D + N if fused else N * D + N * N
        return H * elems * dtype_bytes

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.0
        return softmax_attention(q, k, v, dropout_p=dropout_p, fused=self.fused_attn, scale=self.scale)
