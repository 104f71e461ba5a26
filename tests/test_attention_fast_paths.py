"""The hand-written fast paths of linformer / performer / nystrom against the plain autograd
composition they replace: same outputs and the same gradients (float64, so agreement is to rounding)."""

from __future__ import annotations

import pytest
import torch

from finetune.models.attention import attention_layer
from finetune.models.attention.base import split_heads
from finetune.models.attention.nystrom import _segment_bounds, _segment_sums, segment_means
from finetune.models.attention.performer import (
    favor_features,
    linear_attention,
    orthogonal_random_features,
    performer_attention,
)


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


@pytest.mark.parametrize("N,m,D,scale", [(50, 24, 16, 1.0), (33, 8, 12, 2.0), (65, 70, 8, 0.5)])
def test_performer_softmax_fast_path_matches_autograd_composition(N, m, D, scale):
    g = torch.Generator().manual_seed(N)
    q, k, v = (scale * torch.randn(2, 3, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    W = orthogonal_random_features(m, D, torch.Generator().manual_seed(1)).double()
    grad_out = torch.randn(2, 3, N, D, generator=g, dtype=torch.float64)

    def composition64(q, k, v):  # favor_features casts to fp32; redo it in float64 for the comparison
        from finetune.models.attention.performer import SOFTMAX_KERNEL_EPS as eps, softmax_feature_parts

        pq, dq = softmax_feature_parts(q, W)
        pk, dk = softmax_feature_parts(k, W)
        phi_q = m**-0.5 * ((pq - dq - pq.amax(-1, keepdim=True).detach()).exp() + eps)
        phi_k = m**-0.5 * ((pk - dk - pk.amax((-2, -1), keepdim=True).detach()).exp() + eps)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        out = phi_q @ (phi_k.transpose(-2, -1) @ v1)
        return out[..., :-1] / out[..., -1:]

    # performer_attention (fp32) against the composition it replaced, at fp32 accuracy ...
    q32, k32, v32, W32, g32 = (t.float() for t in (q, k, v, W, grad_out))
    fast = _grads(lambda q, k, v: performer_attention(q, k, v, W32), (q32, k32, v32), g32)
    plain32 = _grads(lambda q, k, v: linear_attention(*favor_features(q, k, W32), v), (q32, k32, v32), g32)
    for a, b in zip(fast, plain32):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # ... and the hand-written backward itself, run in float64, against autograd to rounding
    from finetune.models.attention.performer import _FavorSoftmax

    flat = lambda t: t.reshape(6, N, D)  # noqa: E731
    exact = _grads(lambda q, k, v: _FavorSoftmax.apply(flat(q), flat(k), flat(v), W).reshape(2, 3, N, D), (q, k, v), grad_out)
    plain = _grads(composition64, (q, k, v), grad_out)
    for a, b in zip(exact, plain):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("Dv", [1, 5, 20])
def test_performer_fast_path_with_a_value_width_unlike_the_head_width(Dv):
    # the fidelity tools pass values of another width than q and k (e.g. one-hot or summary values)
    g = torch.Generator().manual_seed(Dv)
    q, k = (torch.randn(2, 3, 30, 8, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 30, Dv, generator=g)
    grad_out = torch.randn(2, 3, 30, Dv, generator=g)
    W = orthogonal_random_features(16, 8, torch.Generator().manual_seed(1))
    fast = _grads(lambda q, k, v: performer_attention(q, k, v, W), (q, k, v), grad_out)
    plain = _grads(lambda q, k, v: linear_attention(*favor_features(q, k, W), v), (q, k, v), grad_out)
    assert fast[0].shape == (2, 3, 30, Dv)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_performer_no_grad_and_grad_paths_agree():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    W = orthogonal_random_features(32, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        eval_out = performer_attention(q, k, v, W)
    train_out = performer_attention(q.requires_grad_(), k, v, W)
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)


@pytest.mark.parametrize("N,m", [(10, 3), (197, 32), (50, 49), (7, 7)])
def test_segment_means_gather_backward_matches_autograd(N, m):
    x = torch.randn(2, 3, N, 5, dtype=torch.float64)
    grad_out = torch.randn(2, 3, m, 5, dtype=torch.float64)
    bounds = _segment_bounds(N, m, x.device)
    lengths = (bounds[1:] - bounds[:-1]).double()
    fast = _grads(lambda t: segment_means(t, m), (x,), grad_out)
    plain = _grads(lambda t: _segment_sums(t, bounds) / lengths[:, None], (x,), grad_out)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_split_heads_matches_timm_layout():
    B, N, H, D = 2, 7, 3, 4
    y = torch.randn(B, N, 3 * H * D, dtype=torch.float64)
    grads = [torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3)]
    yf = y.clone().requires_grad_(True)
    parts = split_heads(yf, H, D)
    assert all(p.is_contiguous() and p.shape == (B, H, N, D) for p in parts)
    torch.autograd.backward(parts[:2], grads[:2])  # v unused: its gradient is zero
    yr = y.clone().requires_grad_(True)
    ref = yr.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    torch.autograd.backward(ref[:2], grads[:2])
    for a, b in zip(parts, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(yf.grad, yr.grad, atol=0, rtol=0)


@pytest.mark.parametrize("variant,hp", [("linformer", {"rank": 8}), ("performer", {"features": 16}), ("nystrom", {"landmarks": 6})])
def test_contiguous_layer_matches_strided_layer(variant, hp):
    """The variant's layer with contiguous q, k, v (its default) equals the same layer on timm's
    strided views, outputs and every gradient."""
    torch.manual_seed(0)
    cls = attention_layer(variant, grid_size=(6, 6), num_prefix_tokens=1, **hp)
    fast = cls(48, num_heads=3, qkv_bias=True)
    strided = cls(48, num_heads=3, qkv_bias=True)
    strided.load_state_dict(fast.state_dict())
    strided.contiguous_qkv = False
    x = torch.randn(2, 37, 48)
    outs = []
    for layer in (fast, strided):
        out = layer(x)
        out.square().mean().backward()
        outs.append((out, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), outs[0][0], atol=1e-6, rtol=1e-5)
