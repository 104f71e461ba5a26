"""Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity").

Algorithm. Keys and values are projected along the sequence axis to a fixed length k before the
softmax::

    K' = E^T K,  V' = F^T V              E, F: [N, k];  K', V': [k, D]
    out = softmax(q K'^T / sqrt(D)) V'    [N, k] attention matrix instead of [N, N]

E and F are learned, one pair per layer shared by its heads ("headwise sharing" in the paper), and are
the variant's only new parameters: a pretrained softmax ViT loads into everything else. They are
initialised as fairseq's Linformer (the authors' code, ``examples/linformer``) initialises its
``compress_k``/``compress_v``: ``xavier_uniform_`` with gain 1/sqrt(2), i.e. U(-b, b) with
b = sqrt(3 / (N + k)). At the swap of a pretrained softmax ViT this is 2-3x closer to softmax than
N(0, 1/k) (N = 577, k = 64: relative error 1.18 vs 3.84), since ``E^T K`` then averages keys rather
than summing them with unit-variance weights. ``share_kv=True`` uses one matrix for both (F = E).

N must be known at construction (it fixes the parameter shapes), so the variant needs the patch grid;
``rank >= N`` is refused (nothing would be compressed).

Implementation: E^T K and F^T V are one batched product each over (batch, head) with E^T broadcast,
the 1/sqrt(D) scale goes on the [k, D] projected keys, and the layer hands `attend` contiguous q, k, v
(`AttentionBase.contiguous_qkv`).

Cost per head: O(N k D) time, O(N k) memory for the attention matrix.

Hyperparameters:
    rank (k): projected sequence length, 1 <= k < N (default 64).
    share_kv: one projection for keys and values (default False).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import AttentionBase, AttentionConfigError
from .hparams import HParam
from .registry import register_attention


def _project(P: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P^T x for every matrix of a batch. P: [N, k], x: [b, N, D] -> [b, k, D]."""
    return torch.bmm(P.t().expand(x.shape[0], -1, -1), x)  # (b, k, D)


def linformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    E: torch.Tensor,
    F: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Linformer attention. q, k, v: [B, H, N, D]; E, F: [N, k] -> [B, H, N, D].

    With E = F = I_N (k = N) this is exact softmax attention.
    """
    if E.shape[0] != k.shape[-2] or F.shape[0] != v.shape[-2]:
        raise ValueError(
            f"linformer projections are built for N={E.shape[0]} tokens but got N={k.shape[-2]}; "
            "rebuild the model for this image / patch size"
        )
    # E^T K as one batched product over (batch, head) with E^T broadcast (a stride-0 batch): no copy
    # of k or v on the way in or out, ~2.5x faster forward + backward on CPU than folding (K^T E)^T
    # into one GEMM, whose K^T needs a transposing copy.
    # v may be wider or narrower than q and k (Dv; `vitsweep fidelity` passes v = I_N, Dv = N).
    lead, n, d, dv = k.shape[:-2], k.shape[-2], k.shape[-1], v.shape[-1]
    k_proj = _project(E.to(k.dtype), k.reshape(-1, n, d)).view(lead + (E.shape[1], d))  # (B, H, k, D)
    v_proj = _project(F.to(v.dtype), v.reshape(-1, n, dv)).view(lead + (F.shape[1], dv))  # (B, H, k, Dv)
    # 1/sqrt(D) on the [k, D] projected keys, not on the [N, D] queries (exact when D is a power of 4)
    k_proj = k_proj * d**-0.5
    if q.dtype == torch.float16:
        # fp32 island: fp16 logits overflow (inf - inf = NaN in softmax) above 65504, a scale bf16 and
        # SDPA's fp32 accumulators survive; bf16 has fp32's range and keeps the fast path
        with torch.autocast(device_type=q.device.type, enabled=False):
            attn = (q.float() @ k_proj.float().transpose(-2, -1)).softmax(dim=-1).to(v_proj.dtype)  # (B, H, N, k)
    else:
        attn = (q @ k_proj.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, k)
    if dropout_p > 0.0:
        attn = torch.nn.functional.dropout(attn, p=dropout_p)
    return attn @ v_proj  # (B, H, N, Dv)


@register_attention("linformer")
class LinformerAttention(AttentionBase):
    """timm-compatible Linformer attention.

    Args (besides timm's `Attention` arguments, see `AttentionBase`):
        rank: projected sequence length k, 1 <= k < N.
        share_kv: use the same projection for keys and values.
    """

    contiguous_qkv = True  # see AttentionBase.contiguous_qkv
    hparams = {
        "rank": HParam(int, 64, "projected sequence length k (< token count)", minimum=1, short="k", sweep=(32, 64)),
        "share_kv": HParam(bool, False, "one projection for keys and values", short="kv", sweep=(False,)),
    }
    needs_grid = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dd = {"device": self.qkv.weight.device, "dtype": self.qkv.weight.dtype}
        n = self.num_tokens
        self.E = nn.Parameter(torch.empty(n, self.rank, **dd))  # (N, k)
        self.F: Optional[nn.Parameter] = None if self.share_kv else nn.Parameter(torch.empty(n, self.rank, **dd))  # (N, k)
        self.reset_projections()

    def check_geometry(self) -> None:
        n = self.num_tokens
        if self.rank >= n:
            raise AttentionConfigError(
                f"linformer rank={self.rank} must be in [1, N-1] = [1, {n - 1}] for N={n} tokens "
                "(rank >= N compresses nothing)"
            )

    @classmethod
    def flops(cls, N, D, H, *, num_prefix_tokens, rank, **hparams):
        return H * (2 * rank * N * D * 2 + 2 * N * rank * D * 2)  # E^T K, F^T V; q K'^T, attn V'

    @classmethod
    def activation_bytes(cls, N, D, H, *, dtype_bytes, fused, num_prefix_tokens, rank, **hparams):
        return H * (2 * rank * D + N * rank) * dtype_bytes  # K' * scale, V'; attention (N x k)

    @torch.no_grad()
    def reset_projections(self) -> None:
        """E, F ~ xavier_uniform_ with gain 1/sqrt(2), as fairseq's Linformer."""
        nn.init.xavier_uniform_(self.E, gain=1 / math.sqrt(2))
        if self.F is not None:
            nn.init.xavier_uniform_(self.F, gain=1 / math.sqrt(2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        F = self.E if self.F is None else self.F
        dropout_p = self.attn_drop.p if self.training else 0.0
        return linformer_attention(q, k, v, self.E, F, dropout_p=dropout_p)  # (B, H, N, D)
