"""Performer attention: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021).

Algorithm. The softmax kernel ``exp(q . k / sqrt(D))`` is written as an expectation over random
projections ``w ~ N(0, I_D)``::

    exp(q' . k') = E_w[ exp(w . q' - |q'|^2 / 2) * exp(w . k' - |k'|^2 / 2) ],   x' = x / D^(1/4)

and estimated with ``m`` orthogonal random rows ``W: [m, D]`` (blocks of a QR of a Gaussian matrix,
rows rescaled to chi-distributed norms), giving positive features ``phi(x) = m^(-1/2) exp(W x' -
|x'|^2/2)``. Attention becomes linear in N::

    out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)

Max-stabilisers and eps exactly as in the reference ``performer-pytorch`` ``softmax_kernel``:
``phi(x) = m^(-1/2) (exp(W x' - |x'|^2/2 - c) + eps)`` with ``c`` the row maximum of ``W q'`` for a
query and one global maximum of ``W k'`` over all keys of a (batch, head) for keys, ``eps = 1e-4``.
Every exponent is <= 0. The maxima alone would cancel in the ratio; with eps added after them they do
not quite: eps gives every key a small uniform weight, a shrinkage towards plain averaging that keeps
denominators positive and, on inputs where FAVOR+'s variance is large (large |q|, |k|), lowers the
error a lot (on iid N(0, 1) q, k with D = 64, from ~2.8 to ~0.9 relative error at m = 64).
Features and both products are computed in fp32 (also under autocast). The softmax kernel runs as
one fused function with a hand-written backward (`_favor_softmax_forward`, `_FavorSoftmax`): the same
maths with the data scale on the projection, the m^(-1/2) factor (which cancels) dropped and eps added
as rank-one terms, so only the two exponential maps are stored; `favor_features` and
`linear_attention` remain the reference composition (and the relu kernel's path).
``kernel='relu'`` uses ``phi(x) = relu(W x') + eps`` instead (the generalised-kernel Performer).

Cost per head: O(N m D) time, O(N m + m D) memory (versus O(N^2 D) and O(N^2) for softmax).

Hyperparameters:
    features (m): number of random features, >= 1 (default 64).
    redraw_interval: redraw the projection every this many training forward calls; None or 0 never
        redraws (default None). Redrawing happens only in training mode.
    kernel: 'softmax' (FAVOR+ estimate of softmax) or 'relu'.

`attn_drop` is not applied: no attention matrix is ever formed.

The projection matrix is a persistent buffer: checkpoints restore exactly the features a model was
trained with. It is drawn from torch's global RNG (training is seeded globally).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import AttentionBase, AttentionConfigError, fp32_core_bytes
from .hparams import HParam
from .registry import register_attention

PERFORMER_KERNELS = ("softmax", "relu")
# Added to every stabilised softmax-kernel feature (performer-pytorch's default).
SOFTMAX_KERNEL_EPS = 1e-4
RELU_KERNEL_EPS = 1e-3


def orthogonal_random_features(
    features: int,
    head_dim: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Orthogonal Gaussian projection W: [features, head_dim] (FAVOR+ 'ORF' with chi-distributed norms).

    Rows come in blocks of ``head_dim`` mutually orthogonal directions (QR of a Gaussian matrix, the
    columns of Q multiplied by the signs of diag(R) so the directions are uniform), each row rescaled
    to the norm of an independent Gaussian vector so marginals match N(0, I). Drawn on
    the CPU in fp32 (reproducible across devices) and moved to `device`.
    """
    blocks = []
    for _ in range(-(-features // head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, device="cpu")  # (D, D)
        q, r = torch.linalg.qr(gaussian)  # (D, D), orthonormal columns
        # Sign correction: with diag(R) > 0 the QR factor is Haar-distributed; LAPACK's raw Q is not
        # (its first column points away from the first axis in every draw: a biased kernel estimate).
        q = q * torch.sign(torch.diagonal(r))[None, :]  # (D, D)
        blocks.append(q.T)
    directions = torch.cat(blocks, dim=0)[:features]  # (m, D)
    norms = torch.randn(features, head_dim, generator=generator, device="cpu").norm(dim=1)  # (m,)
    return (directions * norms[:, None]).to(device)  # (m, D)


def softmax_feature_parts(x: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W x', |x'|^2 / 2)`` with ``x' = x D^(-1/4)``. x: [B, H, N, D] fp32 -> [B, H, N, m], [B, H, N, 1]."""
    x = x * x.shape[-1] ** -0.25
    proj = x @ projection.t()  # (B, H, N, m)
    return proj, 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (B, H, N, m), (B, H, N, 1)


def favor_features(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor,
    kernel: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive random features phi(q), phi(k): [B, H, N, D] -> [B, H, N, m], in fp32.

    Softmax kernel: per-query-row max stabiliser for q, one global max per (batch, head) for k, then
    eps, as performer-pytorch's ``softmax_kernel``.
    """
    q, k, projection = q.float(), k.float(), projection.float()
    m = projection.shape[0]
    if kernel == "softmax":
        ratio = m**-0.5
        proj_q, diag_q = softmax_feature_parts(q, projection)  # (B, H, N, m), (B, H, N, 1)
        proj_k, diag_k = softmax_feature_parts(k, projection)  # (B, H, N, m), (B, H, N, 1)
        c_q = proj_q.amax(dim=-1, keepdim=True).detach()  # (B, H, N, 1)
        c_k = proj_k.amax(dim=(-2, -1), keepdim=True).detach()  # (B, H, 1, 1)
        phi_q = ratio * ((proj_q - diag_q - c_q).exp() + SOFTMAX_KERNEL_EPS)  # (B, H, N, m)
        phi_k = ratio * ((proj_k - diag_k - c_k).exp() + SOFTMAX_KERNEL_EPS)  # (B, H, N, m)
        return phi_q, phi_k
    if kernel == "relu":
        normaliser = q.shape[-1] ** -0.25
        phi_q = torch.relu((q * normaliser) @ projection.t()) + RELU_KERNEL_EPS  # (B, H, N, m)
        phi_k = torch.relu((k * normaliser) @ projection.t()) + RELU_KERNEL_EPS  # (B, H, N, m)
        return phi_q, phi_k
    raise AttentionConfigError(f"performer kernel={kernel!r} is not one of {PERFORMER_KERNELS}")


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``phi(Q) (phi(K)^T [V, 1])``, normalised. phi: [B, H, N, m], v: [B, H, N, D] -> [B, H, N, D] fp32."""
    v1 = torch.cat([v.float(), v.new_ones(v.shape[:-1] + (1,), dtype=torch.float32)], dim=-1)  # (B, H, N, D+1)
    context = phi_k.transpose(-2, -1) @ v1  # (B, H, m, D+1)
    out = phi_q @ context  # (B, H, N, D+1)
    return out[..., :-1] / out[..., -1:]  # (B, H, N, D)


def _favor_softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor):
    """FAVOR+ softmax-kernel attention on [b, N, D] fp32 inputs, in as few passes over [N, m] as it
    takes, plus what its backward needs.

    The same numbers as `favor_features` + `linear_attention`, rearranged:
    - the D^(-1/4) data scale goes onto the [m, D] projection (w) instead of q and k;
    - the feature scale m^(-1/2) is dropped: it multiplies numerator and denominator alike;
    - eps is never added to an [N, m] map: with e = exp(...) and phi = e + eps,
      ``phi_k^T [V, 1] = e_k^T [V, 1] + eps 1 colsum([V, 1])`` and
      ``phi_q C = e_q C + eps 1 colsum(C)``, rank-one terms on [m, D+1] and [1, D+1] tensors;
    - the [V, 1] column is the key-feature sum, so [V, 1] is never built.

    Returns out [b, N, D] and (w, e_q, e_k, C, den) for the backward.
    """
    n, d = q.shape[-2], q.shape[-1]
    w = projection * d**-0.25  # (m, D)
    half_scale = 0.5 * d**-0.5  # |x D^(-1/4)|^2 / 2 = |x|^2 D^(-1/2) / 2
    e_q = q @ w.t()  # (b, N, m)
    shift_q = torch.linalg.vector_norm(q, dim=-1, keepdim=True).square_().mul_(half_scale)  # (b, N, 1)
    shift_q += e_q.amax(dim=-1, keepdim=True)  # per-query stabiliser
    e_q.sub_(shift_q).exp_()  # (b, N, m)
    e_k = k @ w.t()  # (b, N, m)
    shift_k = torch.linalg.vector_norm(k, dim=-1, keepdim=True).square_().mul_(half_scale)  # (b, N, 1)
    shift_k += e_k.amax(dim=(-2, -1), keepdim=True)  # one stabiliser per (batch, head)
    e_k.sub_(shift_k).exp_()  # (b, N, m)
    eps = SOFTMAX_KERNEL_EPS
    # plain two-input bmm + add_ (no baddbmm, no out=): fvcore's jit-traced MAC counter handles only that
    context_v = torch.bmm(e_k.transpose(-2, -1), v).add_(v.sum(dim=-2, keepdim=True), alpha=eps)  # (b, m, D): phi_k^T V
    k_sum = e_k.sum(dim=-2, keepdim=True).add_(eps * n).transpose(-2, -1)  # (b, m, 1): phi_k^T 1
    context = torch.cat([context_v, k_sum], dim=-1)  # (b, m, D+1)
    full = torch.bmm(e_q, context).add_(context.sum(dim=-2, keepdim=True), alpha=eps)  # (b, N, D+1) = phi_q C
    dv = v.shape[-1]  # the value width may differ from the query/key width d
    den = full[..., dv:].clone()  # (b, N, 1)
    return full[..., :dv] / den, (w, e_q, e_k, context, den)


class _FavorSoftmax(torch.autograd.Function):
    """FAVOR+ softmax-kernel attention with a hand-written backward: [b, N, D] fp32 -> [b, N, D].

    Saves e_q, e_k [N, m], the output and its denominator (autograd's own graph of the same maths
    keeps ~3x as many [N, m] maps and walks each of them several times more)."""

    @staticmethod
    def forward(ctx, q, k, v, projection):
        out, (w, e_q, e_k, context, den) = _favor_softmax_forward(q, k, v, projection)
        ctx.save_for_backward(q, k, v, w, e_q, e_k, context, out, den)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, w, e_q, e_k, context, out, den = ctx.saved_tensors
        d, dv = q.shape[-1], v.shape[-1]  # query/key width, value width
        eps = SOFTMAX_KERNEL_EPS
        g_num = grad / den  # (b, N, Dv): d loss / d numerator
        # no out= into a slice (torch.compile refuses a non-contiguous out= tensor): one cat instead
        g_full = torch.cat([g_num, (g_num * out).sum(dim=-1, keepdim=True).neg_()], dim=-1)  # (b, N, Dv+1)
        g_eq = g_full @ context.transpose(-2, -1)  # (b, N, m)
        g_context = torch.baddbmm(g_full.sum(dim=-2, keepdim=True).mul_(eps), e_q.transpose(-2, -1), g_full)  # (b, m, Dv+1)
        g_cv = g_context[..., :dv]  # (b, m, Dv)
        g_ek = torch.baddbmm(g_context[..., dv].unsqueeze(-2), v, g_cv.transpose(-2, -1))  # (b, N, m)
        g_v = torch.baddbmm(g_cv.sum(dim=-2, keepdim=True).mul_(eps), e_k, g_cv)  # (b, N, D)
        # exponent = x w^T - |x|^2 D^(-1/2) / 2 (stabilisers are constants): d/dx = w - D^(-1/2) x
        grads = []
        for g_e, e, x in ((g_eq, e_q, q), (g_ek, e_k, k)):
            g_e.mul_(e)  # (b, N, m): d loss / d exponent
            g_x = g_e @ w  # (b, N, D)
            g_x.addcmul_(x, g_e.sum(dim=-1, keepdim=True), value=-(d**-0.5))
            grads.append(g_x)
        return grads[0], grads[1], g_v, None


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel: str = "softmax",
) -> torch.Tensor:
    """FAVOR+ attention. q, k, v: [B, H, N, D], projection: [m, D] -> [B, H, N, D] (dtype of v).

    Estimates ``softmax(q k^T / sqrt(D)) v``; computed in fp32 with autocast disabled. The softmax
    kernel runs `_favor_softmax_forward` (and its hand-written backward when gradients are needed);
    the relu kernel, and a projection that itself requires grad, the plain composition of
    `favor_features` and `linear_attention`.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        if kernel == "softmax" and not projection.requires_grad:
            lead = q.shape[:-2]
            q32, k32, v32 = (t.float().reshape((-1,) + t.shape[-2:]) for t in (q, k, v))  # (b, N, D)
            projection = projection.float()
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                out = _FavorSoftmax.apply(q32, k32, v32, projection)  # (b, N, D)
            else:
                out = _favor_softmax_forward(q32, k32, v32, projection)[0]  # (b, N, D)
            return out.reshape(lead + out.shape[-2:]).to(v.dtype)  # (B, H, N, D)
        phi_q, phi_k = favor_features(q, k, projection, kernel)  # (B, H, N, m) each
        out = linear_attention(phi_q, phi_k, v)  # (B, H, N, D)
    return out.to(v.dtype)


@register_attention("performer")
class PerformerAttention(AttentionBase):
    """timm-compatible Performer (FAVOR+) attention.

    Hyperparameters (besides timm's `Attention` arguments, see `AttentionBase`):
        features: number of random features m (>= 1).
        redraw_interval: training forward calls between redraws of the projection; None/0: never.
        kernel: 'softmax' (FAVOR+) or 'relu'.
    """

    contiguous_qkv = True  # see AttentionBase.contiguous_qkv
    hparams = {
        "features": HParam(int, 64, "random features m", minimum=1, short="m", sweep=(64, 128)),
        "redraw_interval": HParam(
            int, None, "redraw features every N training steps (0: never)", minimum=0, optional=True, short="redraw"
        ),
        "kernel": HParam(str, "softmax", "feature map", choices=PERFORMER_KERNELS),
    }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.redraw_interval = self.redraw_interval or None
        device = self.qkv.weight.device
        self.register_buffer(
            "projection", orthogonal_random_features(self.features, self.head_dim, device=device), persistent=True
        )  # (m, D)
        self.calls_since_redraw = 0

    @classmethod
    def flops(cls, N, D, H, *, num_prefix_tokens, features, **hparams):
        m = features
        if hparams.get("kernel", "softmax") == "softmax":  # phi(q), phi(k); phi(K)^T V, phi(Q) [ctx, k_sum]
            return H * (2 * N * m * D * 2 + 2 * N * m * D + 2 * N * m * (D + 1))
        return H * (2 * N * m * D * 2 + 2 * N * m * (D + 1) * 2)  # phi(q), phi(k); phi(K)^T [V,1], phi(Q) ctx

    @classmethod
    def activation_bytes(cls, N, D, H, *, dtype_bytes, fused, num_prefix_tokens, features, kernel, **hparams):
        m = features
        if kernel == "softmax":  # exp features of q and k; the output and its denominator; context, w
            return fp32_core_bytes(2 * N * m + N * (D + 1) + m * (2 * D + 1), N, D, H, dtype_bytes)
        # scaled q, k; relu pre-activations and features of q and k; [V,1] and the output; context
        return fp32_core_bytes(2 * N * D + 3 * N * m + 2 * N * (D + 1) + m * (D + 1), N, D, H, dtype_bytes)

    @torch.no_grad()
    def redraw_projection(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw a fresh projection in place (same shape, device and dtype)."""
        fresh = orthogonal_random_features(self.features, self.head_dim, generator=generator)
        self.projection.copy_(fresh)
        self.calls_since_redraw = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw_interval:
            if self.calls_since_redraw >= self.redraw_interval:
                self.redraw_projection()
            self.calls_since_redraw += 1
        return performer_attention(q, k, v, self.projection, kernel=self.kernel)  # (B, H, N, D)
