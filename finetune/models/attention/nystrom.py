"""Nystromformer attention (Xiong et al., AAAI 2021): a Nystrom low-rank approximation of softmax.

Algorithm. Choose m landmarks per head, the means of q and of k over m contiguous segments of the
sequence (``q~, k~: [m, D]``). The N x N softmax matrix is approximated through three small ones::

    softmax(q k^T) ~= softmax(q k~^T) pinv(softmax(q~ k~^T)) softmax(q~ k^T)
                       [N, m]          [m, m]                [m, N]

and multiplied right-to-left with v, so no N x N matrix is ever formed. The pseudo-inverse is the
iterative Moore-Penrose scheme of Razavi et al. (2014) used by Nystromformer,
``Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))``, started from ``Z0 = A^T / (||A||_1 ||A||_inf)``
(per matrix), and always run in fp32.

Segments: N is rarely divisible by m (197 = 1 CLS + 196 patches), so segment s covers tokens
``[floor(s N / m), floor((s+1) N / m))``: lengths differ by at most one and every mean is over real
tokens only. (The reference implementation zero-pads the sequence to a multiple of m and then averages
the padding into the first segment's landmark.) When ``m >= N`` there is nothing to compress and the
exact softmax is returned.

Optional residual: a depthwise convolution over the sequence axis of v, kernel ``(conv_kernel, 1)``,
one filter per head (as in the paper's code), added to the output; it is the only new parameter.

Implementation: the 1/sqrt(D) scale is applied to the [m, D] landmarks, not the [N, D] queries, and
the segment means' backward is one gather (`_SegmentMeans`); the layer hands `attend` contiguous q, k,
v (`AttentionBase.contiguous_qkv`).

Cost per head: O(N m D + m^3 * pinv_iterations) time, O(N m + m^2) memory. `attn_drop` is not
applied (as in the paper's code, the three kernels are not dropped out).

Hyperparameters:
    landmarks (m): number of landmarks, >= 1 (default 32).
    pinv_iterations: Razavi iterations, 1..8 (default 6). The iteration converges to the exact
        pseudo-inverse of the m x m landmark kernel; with spread logits that kernel is near-singular and
        its exact pseudo-inverse blows the output up (iid q, k, logit std 1, m = 32: relative error 0.73
        at 6 iterations, 1.9 at 12, 7.0 at 20; logit std 4: 3.6, 32, 120), so the count is capped at 8:
        a few iterations act as a regularised inverse. On smooth, low-spread logits 8 is within 15 %
        of the converged error.
    conv_kernel: odd kernel length of the value residual conv, or None for none (default None).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import AttentionBase, fp32_core_bytes
from .hparams import HParam
from .registry import register_attention
from .softmax import SoftmaxAttention, softmax_attention, softmax_flops

# More iterations converge to the exact pseudo-inverse of the landmark kernel, which is near-singular
# when logits are spread: its smallest singular values blow up and the output diverges (iid q, k with
# logit std 1, 32 landmarks: relative error 0.73 at 6 iterations, 1.9 at 12, 7.0 at 20; std 4: 3.6,
# 32, 120). A few iterations are a truncated, regularised inverse.
MAX_PINV_ITERATIONS = 8
PINV_WHY = (
    "more iterations approach the exact pseudo-inverse of a near-singular landmark kernel and the output "
    "diverges on peaked attention"
)


def _segment_bounds(n: int, segments: int, device: torch.device) -> torch.Tensor:
    """Segment s covers tokens ``[bounds[s], bounds[s+1])``: (m+1,) int64."""
    return torch.div(torch.arange(segments + 1, device=device) * n, segments, rounding_mode="floor")  # (m+1,)


def _segment_sums(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sums of x over the segments: [..., N, D] -> [..., m, D], as differences of the running sum at
    each segment's last token (the running sum before the first segment is 0)."""
    ends = x.cumsum(dim=-2)[..., bounds[1:] - 1, :]  # (..., m, D): sum of tokens [0, bounds[s+1])
    return ends - torch.nn.functional.pad(ends[..., :-1, :], (0, 0, 1, 0))  # (..., m, D)


class _SegmentMeans(torch.autograd.Function):
    """`segment_means` with its backward as one gather: each token's gradient is its segment's, over
    the segment's length (autograd's own backward of the running sum is a reverse cumsum over a dense
    zero-filled [N, D] gradient, several passes over [N, D] per call)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, segments: int):
        bounds = _segment_bounds(x.shape[-2], segments, x.device)  # (m+1,)
        lengths = (bounds[1:] - bounds[:-1]).to(x.dtype)  # (m,)
        ctx.save_for_backward(bounds, lengths)
        ctx.num_tokens = x.shape[-2]  # a Python int: the backward needs no host sync to read N
        return _segment_sums(x, bounds) / lengths[:, None]  # (..., m, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bounds, lengths = ctx.saved_tensors
        segment_of = torch.searchsorted(bounds[1:], torch.arange(ctx.num_tokens, device=grad.device), right=True)  # (N,)
        return (grad / lengths[:, None]).index_select(-2, segment_of), None  # (..., N, D)


def segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """Means of x over `segments` contiguous, nearly equal, unpadded segments. [B, H, N, D] -> [B, H, m, D]."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SegmentMeans.apply(x, segments)
    bounds = _segment_bounds(x.shape[-2], segments, x.device)  # (m+1,)
    lengths = (bounds[1:] - bounds[:-1]).to(x.dtype)  # (m,)
    return _segment_sums(x, bounds) / lengths[:, None]  # (B, H, m, D)


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by Razavi's iteration. a: [..., m, m] -> [..., m, m], in fp32.

    Each step ``Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))`` is four batched products and three
    subtractions from precomputed ``c I`` (plain ``bmm``: fvcore's traced counter sees it, ``baddbmm``
    it would not, and it is no faster at m = 32)."""
    a = a.float()
    batch, m = a.shape[:-2], a.shape[-1]
    a = a.reshape(-1, m, m)  # (b, m, m)
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1)  # (b,) max column sum = ||a||_1
    row = abs_a.sum(dim=-1).amax(dim=-1)  # (b,) max row sum = ||a||_inf
    z = a.transpose(-2, -1) / (col * row)[:, None, None]  # (b, m, m)
    eye = torch.eye(m, device=a.device, dtype=a.dtype)  # (m, m)
    eye7, eye15, eye13 = 7 * eye, 15 * eye, 13 * eye
    for _ in range(iterations):
        az = torch.bmm(a, z)  # (b, m, m)
        t = eye15 - torch.bmm(az, eye7 - az)  # 15 I - AZ (7 I - AZ)
        t = eye13 - torch.bmm(az, t)  # 13 I - AZ (...)
        z = torch.bmm(z, t) * 0.25  # Z (...) / 4
    return z.reshape(*batch, m, m)


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: int = 32,
    pinv_iterations: int = 6,
) -> torch.Tensor:
    """Nystrom approximation of ``softmax(q k^T / sqrt(D)) v``. q, k, v: [B, H, N, D] -> [B, H, N, D].

    Exact softmax when ``landmarks >= N``. Computed in fp32 with autocast disabled. The 1/sqrt(D)
    scale goes onto the [m, D] landmarks rather than the [N, D] queries (the same numbers when D is a
    power of 4, as 16 and 64: the scale is then a power of two).
    """
    n = int(q.shape[-2])  # a plain int also under jit tracing (fvcore)
    if landmarks >= n:
        return softmax_attention(q, k, v)  # (B, H, N, D)
    scale = q.shape[-1] ** -0.5
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32, k32, v32 = q.float(), k.float(), v.float()
        q_land = segment_means(q32, landmarks) * scale  # (B, H, m, D), scaled
        k_land = segment_means(k32, landmarks)  # (B, H, m, D)
        kernel_1 = (q32 @ (k_land * scale).transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, m)
        kernel_2 = (q_land @ k_land.transpose(-2, -1)).softmax(dim=-1)  # (B, H, m, m)
        kernel_3 = (q_land @ k32.transpose(-2, -1)).softmax(dim=-1)  # (B, H, m, N)
        context = kernel_3 @ v32  # (B, H, m, D)
        context = iterative_pinv(kernel_2, pinv_iterations) @ context  # (B, H, m, D)
        out = kernel_1 @ context  # (B, H, N, D)
    return out.to(v.dtype)


@register_attention("nystrom")
class NystromAttention(AttentionBase):
    """timm-compatible Nystromformer attention.

    Hyperparameters (besides timm's `Attention` arguments, see `AttentionBase`):
        landmarks: number of landmarks m (>= 1); m >= N computes exact softmax.
        pinv_iterations: iterations of the Moore-Penrose pseudo-inverse (>= 1).
        conv_kernel: odd length of the depthwise value-residual conv along the sequence, or None.
    """

    contiguous_qkv = True  # see AttentionBase.contiguous_qkv
    hparams = {
        "landmarks": HParam(int, 32, "landmark count m (>= tokens: exact attention)", minimum=1, short="m", sweep=(32, 64)),
        "pinv_iterations": HParam(
            int, 6, "Razavi pseudo-inverse iterations (at most 8)", minimum=1, maximum=MAX_PINV_ITERATIONS,
            short="pinv", why=PINV_WHY,
        ),
        "conv_kernel": HParam(
            int, None, "depthwise conv residual on values (odd kernel)", minimum=1, odd=True, optional=True, short="conv"
        ),
    }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.res_conv: Optional[nn.Conv2d] = None
        if self.conv_kernel is not None:
            self.res_conv = nn.Conv2d(
                self.num_heads,
                self.num_heads,
                kernel_size=(self.conv_kernel, 1),
                padding=(self.conv_kernel // 2, 0),
                groups=self.num_heads,
                bias=False,
                device=self.qkv.weight.device,
                dtype=self.qkv.weight.dtype,
            )

    @classmethod
    def flops(cls, N, D, H, *, num_prefix_tokens, landmarks, pinv_iterations, conv_kernel, **hparams):
        m, iters = landmarks, pinv_iterations
        if m >= N:
            per_head = softmax_flops(N, D)  # exact softmax
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
        if conv_kernel is not None:
            per_head += 2 * N * D * conv_kernel  # depthwise (conv_kernel x 1) residual on v
        return H * per_head

    @classmethod
    def activation_bytes(cls, N, D, H, *, dtype_bytes, fused, num_prefix_tokens, landmarks, pinv_iterations, **hparams):
        m = landmarks
        if m >= N:
            return SoftmaxAttention.activation_bytes(N, D, H, dtype_bytes=dtype_bytes, fused=True, num_prefix_tokens=num_prefix_tokens)
        # kernels 1 and 3; landmarks (q~, k~ and the scaled k~) and contexts; kernel 2, Z0 and 5 m x m
        # iterates per pinv step
        return fp32_core_bytes(2 * N * m + 5 * m * D + (5 * pinv_iterations + 2) * m * m, N, D, H, dtype_bytes)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = nystrom_attention(q, k, v, self.landmarks, self.pinv_iterations)  # (B, H, N, D)
        if self.res_conv is not None:
            out = out + self.res_conv(v)  # (B, H, N, D): heads are the conv's channels
        return out
