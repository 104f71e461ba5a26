"""The hybrid's execution paths agree: the recomputing autograd Function (training) against the plain
autograd graph of the same forward, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from finetune.models.attention import atrous_linear_attention
from finetune.models.attention.atrous_linear import _hybrid
from finetune.models.attention.performer import orthogonal_random_features


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [
    # grid, prefix, dilation, window, features, heads
    ((5, 6), 1, (1, 2), 3, 24, 4),
    ((14, 14), 1, (1, 2, 3), 3, 64, 6),
    ((6, 6), 0, (2,), 3, 8, 2),
    ((4, 5), 2, (1, 1, 1), 9, 16, 3),  # window covering the grid: no tail
    ((7, 9), 1, (1, 2, 3), 5, 24, 3),
]


def _inputs(grid, prefix, heads, D=16, B=2, seed=0, gate=False):
    gen = torch.Generator().manual_seed(seed)
    N = prefix + grid[0] * grid[1]
    qkv = torch.randn(B, N, 3, heads, D, generator=gen, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each, views of one storage
    far = None
    if gate:
        far = (2 * torch.rand(B, heads, grid[0] * grid[1], 1, generator=gen)).requires_grad_(True)
    return qkv, q, k, v, far


@pytest.mark.parametrize("grid,prefix,dilation,window,m,heads", CASES)
@pytest.mark.parametrize("gate", [False, True])
def test_recompute_matches_plain_graph(grid, prefix, dilation, window, m, heads, gate):
    W = orthogonal_random_features(m, 16, torch.Generator().manual_seed(1))
    qkv, q, k, v, far = _inputs(grid, prefix, heads, gate=gate)
    out = atrous_linear_attention(q, k, v, W, grid, prefix, dilation, window, far_weight=far)
    grad_out = torch.randn_like(out)
    leaves = [qkv] + ([far] if gate else [])
    got = torch.autograd.grad(out, leaves, grad_out)
    plain, _ = _hybrid(q, k, v, far, W, grid, prefix, tuple(dilation), window)  # the autograd graph itself
    want = torch.autograd.grad(plain, leaves, grad_out)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_training_saves_only_qkv_and_per_query_statistics():
    grid, prefix, heads, D = (14, 14), 1, 6, 16
    W = orthogonal_random_features(32, D, torch.Generator().manual_seed(1))
    qkv, q, k, v, _ = _inputs(grid, prefix, heads, D=D)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        atrous_linear_attention(q, k, v, W, grid, prefix, (1, 2, 3), 3)
    seen.pop(qkv.untyped_storage().data_ptr())  # q, k, v: one storage
    B, Np = 2, grid[0] * grid[1]
    # per query (B, H, Np, 4) and the window products (B, H, Np, 2 * 9); per head (pi, c_k) (B, H, 1, 2); fp32
    assert sum(seen.values()) == B * heads * ((4 + 18) * Np + 2) * 4


def test_inference_builds_no_graph():
    W = orthogonal_random_features(16, 16, torch.Generator().manual_seed(1))
    _, q, k, v, _ = _inputs((5, 6), 1, 3)
    with torch.no_grad():
        out = atrous_linear_attention(q, k, v, W, (5, 6), 1, (1, 2, 3), 3)
    assert out.grad_fn is None
    torch.testing.assert_close(out, atrous_linear_attention(q, k, v, W, (5, 6), 1, (1, 2, 3), 3).detach())


def test_training_after_inference_mode_on_the_same_geometry():
    """The window layout is cached per geometry: one built under inference_mode must not poison training."""
    W = orthogonal_random_features(16, 16, torch.Generator().manual_seed(1))
    _, q, k, v, far = _inputs((5, 7), 1, 3, gate=True)
    with torch.inference_mode():
        atrous_linear_attention(q, k, v, W, (5, 7), 1, (1, 2, 3), 3)
    out = atrous_linear_attention(q, k, v, W, (5, 7), 1, (1, 2, 3), 3, far_weight=far)
    out.sum().backward()
    assert torch.isfinite(far.grad).all()


def test_window_kernels_respect_storage_offsets():
    """The shift kernels view their inputs with as_strided: inputs that start inside a larger storage
    (contiguous slices) must give what fresh copies give, in values and gradients."""
    from finetune.models.attention.atrous_linear import window_dot, window_sum

    geometry = ((4, 5), 3, ((0, 1, 1), (1, 3, 2)))
    base = torch.randn(3, 2, 3, 20, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 2, 3, 20, 9, dtype=torch.float64, requires_grad=True)
    x, y, w = base[1], base[2], weights[1]  # contiguous views at nonzero storage offsets
    assert x.storage_offset() and y.storage_offset() and w.storage_offset()
    fx, fy, fw = (t.detach().clone().requires_grad_(True) for t in (x, y, w))
    got = window_dot(x, y, geometry).sum() + window_sum(w, y, geometry).square().sum()
    want = window_dot(fx, fy, geometry).sum() + window_sum(fw, fy, geometry).square().sum()
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(base.grad[1], fx.grad)
    torch.testing.assert_close(base.grad[2], fy.grad)
    torch.testing.assert_close(weights.grad[1], fw.grad)
