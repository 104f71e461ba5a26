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


# ---------------------------------------------------------------- torch.compile (issue 18 item 5)


@pytest.mark.parametrize("gate,dilation", [(True, (1, 2, 3)), (False, (1, 2))])
def test_compiles_fullgraph_and_matches_eager(gate, dilation):
    """fullgraph=True: no graph break (before: "torch.* op returned non-Tensor" at the shift kernels'
    storage_offset), hence no .item() / int(tensor) / data-dependent branch either; forward and input
    gradients match eager (compiled: pad-and-slice window products under plain autograd; eager: shift
    kernels under `_Recompute`) within fp32 rounding. aot_eager runs dynamo + AOTAutograd (where graph
    breaks happen) on eager kernels; inductor's C++ build takes minutes on 2 CPU cores (as in
    tests/test_compile.py), so its run is recorded in BENCHMARKS.md (max diff 6.6e-7 forward, 9.5e-7
    gradients), not repeated here."""
    torch._dynamo.reset()
    grid, prefix, window, heads = (5, 6), 1, 3, 3
    W = orthogonal_random_features(16, 16, torch.Generator().manual_seed(1))
    qkv, q, k, v, far = _inputs(grid, prefix, heads, gate=gate)

    def core(q, k, v, far):
        return atrous_linear_attention(q, k, v, W, grid, prefix, dilation, window, far_weight=far)

    compiled = torch.compile(core, fullgraph=True, backend="aot_eager")
    leaves = [qkv] + ([far] if gate else [])
    out = compiled(q, k, v, far)
    want = core(q, k, v, far)
    grad_out = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_padded_window_products_equal_the_shift_kernels():
    """The compiled path's window products against the eager kernels, values and gradients (float64)."""
    from finetune.models.attention.atrous_linear import (
        _window_dot_padded, _window_sum_padded, window_dot, window_sum,
    )

    geometry = ((4, 5), 3, ((0, 1, 1), (1, 3, 2), (3, 4, 3)))
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 4, 20, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 4, 20, 9, dtype=torch.float64, generator=g, requires_grad=True)
    eager = window_dot(x, y, geometry).square().sum() + window_sum(w, y, geometry).square().sum()
    padded = _window_dot_padded(x, y, geometry).square().sum() + _window_sum_padded(w, y, geometry).square().sum()
    torch.testing.assert_close(padded, eager)
    want = torch.autograd.grad(eager, (x, y, w))
    got = torch.autograd.grad(padded, (x, y, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- autocast (issue 18 item 4)


def _layer_pair(dim=96, heads=3, grid=(8, 8), seed=0):
    """An atrous_linear layer and a softmax layer with the same qkv / proj weights (eval mode)."""
    from finetune.models.attention import attention_layer

    torch.manual_seed(seed)
    atrous = attention_layer("atrous_linear", grid_size=grid, num_prefix_tokens=1, features=32)(dim, num_heads=heads, qkv_bias=True)
    softmax = attention_layer("softmax", grid_size=grid, num_prefix_tokens=1)(dim, num_heads=heads, qkv_bias=True)
    softmax.load_state_dict({k: v for k, v in atrous.state_dict().items() if k != "projection"})
    return atrous.eval(), softmax.eval()


def _run(layer, x, dtype):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * grad_out).sum().backward()
    return out.float().detach(), x.grad


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_error_is_a_small_multiple_of_softmaxs(dtype):
    """Output and input gradient under CPU autocast against fp32, relative to softmax's own autocast
    error on the same weights and input. The core runs in fp32 inside autocast, so only the qkv and
    output projections round: measured 0.78-0.92x softmax's error (bf16: 3.2e-3 output, 4.1e-3
    gradient; fp16: 3.8e-4, 5.5e-4); bounded by 3x (issue 18: a small multiple) plus 1e-4 absolute."""
    atrous, softmax = _layer_pair()
    x = torch.randn(2, 65, 96, generator=torch.Generator().manual_seed(1))
    ref_a, ref_sm = _run(atrous, x, None), _run(softmax, x, None)
    got_a, got_sm = _run(atrous, x, dtype), _run(softmax, x, dtype)
    for i, what in enumerate(("output", "input gradient")):
        err_a, err_sm = _rel(got_a[i], ref_a[i]), _rel(got_sm[i], ref_sm[i])
        assert err_a <= 3.0 * err_sm + 1e-4, (what, dtype, err_a, err_sm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_finite_at_a_hot_logit_scale(dtype):
    """qkv weights scaled so the logits have a std of ~50: every exponential is stabilised to <= 1,
    so output and gradients stay finite (and the rows are one-hot, like softmax's)."""
    atrous, softmax = _layer_pair()
    with torch.no_grad():
        atrous.qkv.weight.mul_(12.0)
        softmax.qkv.weight.mul_(12.0)
    x = torch.randn(2, 65, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, _ = atrous.qkv(x).reshape(2, 65, 3, 3, 32).permute(2, 0, 3, 1, 4)
        assert float((q @ k.transpose(-2, -1) / 32**0.5).std()) > 30
    out, grad = _run(atrous, x, dtype)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref = _run(atrous, x, None)
    assert _rel(out, ref[0]) < 0.5, _rel(out, ref[0])
