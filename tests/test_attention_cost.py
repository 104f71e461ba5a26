"""The analytic cost model against what torch counts (FLOPs) and what autograd keeps (activations)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from finetune.models.attention import (
    AttentionConfigError,
    atrous_linear_attention,
    attention_layer,
    linformer_attention,
    nystrom_attention,
    performer_attention,
    softmax_attention,
)
from finetune.models.attention.atrous_linear import neighbour_index
from finetune.models.attention.cost import attention_activation_bytes, attention_flops, uncounted_flops
from finetune.models.attention.performer import orthogonal_random_features

H, D = 3, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(variant, grid, prefix, hp):
    """(pure function of q, k, v, extra leaf inputs, N, analytic hyperparameters)."""
    N = prefix + grid[0] * grid[1]
    if variant == "softmax":
        return (lambda q, k, v: softmax_attention(q, k, v, fused=False)), [], N, {}
    if variant == "linformer":
        E = torch.randn(N, hp["rank"], requires_grad=True)
        Fm = torch.randn(N, hp["rank"], requires_grad=True)
        return (lambda q, k, v: linformer_attention(q, k, v, E, Fm)), [E, Fm], N, hp
    if variant == "performer":
        W = orthogonal_random_features(hp["features"], D)
        return (lambda q, k, v: performer_attention(q, k, v, W, kernel=hp.get("kernel", "softmax"))), [W], N, hp
    if variant == "nystrom":
        return (lambda q, k, v: nystrom_attention(q, k, v, hp["landmarks"], hp["pinv_iterations"])), [], N, hp
    if variant == "atrous_linear":
        W = orthogonal_random_features(hp["features"], D)
        fn = lambda q, k, v: atrous_linear_attention(q, k, v, W, grid, prefix, hp["dilation"], hp["window"])  # noqa: E731
        return fn, [W], N, {**hp, "num_prefix_tokens": prefix}
    raise AssertionError(variant)


CASES = [
    ("softmax", (7, 9), 1, {}),
    ("linformer", (7, 9), 1, {"rank": 10}),
    ("linformer", (14, 14), 1, {"rank": 64}),
    ("performer", (7, 9), 1, {"features": 24}),
    ("performer", (14, 14), 1, {"features": 64}),
    ("performer", (7, 9), 1, {"features": 24, "kernel": "relu"}),
    ("nystrom", (7, 9), 1, {"landmarks": 12, "pinv_iterations": 6}),
    ("nystrom", (14, 14), 1, {"landmarks": 32, "pinv_iterations": 3}),
    ("atrous_linear", (7, 9), 1, {"features": 24, "window": 5, "dilation": (1, 2, 3)}),
    ("atrous_linear", (14, 14), 2, {"features": 64, "window": 3, "dilation": (1, 2, 3)}),
    ("atrous_linear", (6, 6), 0, {"features": 8, "window": 3, "dilation": (2,)}),
]


@pytest.mark.parametrize("variant,grid,prefix,hp", CASES)
def test_flops_match_flop_counter(variant, grid, prefix, hp):
    fn, _, N, analytic_hp = _case(variant, grid, prefix, hp)
    q, k, v = (torch.randn(2, H, N, D) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        fn(q, k, v)
    counted = counter.get_total_flops()
    analytic = 2 * (attention_flops(variant, N, D, H, **analytic_hp) - uncounted_flops(variant, N, D, H, **analytic_hp))
    assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)


@pytest.mark.parametrize("variant,hp", [("nystrom", {"landmarks": 8, "conv_kernel": 5}), ("atrous_linear", {"fusion": "gate", "features": 16})])
def test_flops_of_module_extras_match_flop_counter(variant, hp):
    """What `attend` adds around the pure function: nystrom's value conv, the hybrid's gate."""
    layer = attention_layer(variant, grid_size=(8, 8), num_prefix_tokens=1, **hp)(D * H, num_heads=H)
    q, k, v = (torch.randn(1, H, 65, D) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        layer.attend(q, k, v)
    analytic = attention_flops(variant, 65, D, H, **hp) - uncounted_flops(variant, 65, D, H, **hp)
    assert abs(analytic - counter.get_total_flops()) <= 0.02 * counter.get_total_flops()


def test_uncounted_window_flops_are_the_window_products():
    """The hybrid's window products written as batched matmuls over gathered windows (which
    FlopCounterMode does see) must cost exactly `uncounted_flops`; other variants have none."""
    grid, P, window, m = (6, 7), 1, 5, 12
    Np = grid[0] * grid[1]
    w2 = window * window
    x, k_, v_ = (torch.randn(1, H, Np, D) for _ in range(3))
    phi_q, phi_k = torch.rand(1, H, Np, m), torch.rand(1, H, Np, m)
    weights = torch.rand(1, H, Np, w2)
    idx = neighbour_index(grid, window, 1)  # (Np, w*w)
    win = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 1))[:, :, idx]  # noqa: E731  (1, H, Np, w*w, C)
    k_win, v_win, phi_k_win = win(k_), win(v_), win(phi_k)
    with FlopCounterMode(display=False) as counter:
        x.unsqueeze(-2) @ k_win.transpose(-2, -1)  # window logits
        phi_q.unsqueeze(-2) @ phi_k_win.transpose(-2, -1)  # window feature terms
        weights.unsqueeze(-2) @ v_win  # weighted values (the flat tails' values included)
    analytic = uncounted_flops("atrous_linear", P + Np, D, H, features=m, window=window, num_prefix_tokens=P)
    assert analytic == counter.get_total_flops()
    for variant in ("softmax", "linformer", "performer", "nystrom"):
        assert uncounted_flops(variant, 197, 64, 6) == 0


def _saved_bytes(fn, inputs, exclude):
    """Bytes of the distinct storages autograd saves while running fn (leaf inputs excluded)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and t.dtype not in (torch.int64, torch.bool):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


@pytest.mark.parametrize("variant,grid,prefix,hp", CASES)
def test_activation_bytes_match_saved_tensors(variant, grid, prefix, hp):
    fn, leaves, N, analytic_hp = _case(variant, grid, prefix, hp)
    qkv = torch.randn(1, N, 3, H, D, requires_grad=True)  # laid out as AttentionBase.forward makes them
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each, non-contiguous views
    measured = _saved_bytes(fn, (q, k, v), [qkv, *leaves])
    analytic = attention_activation_bytes(variant, N, D, H, fused=False, **analytic_hp)
    assert abs(analytic - measured) <= 0.15 * measured, (analytic, measured)


def test_linear_variants_scale_linearly_and_softmax_quadratically():
    small, large = 197, 3137
    ratio = {
        v: attention_flops(v, large, 64, 6, **hp) / attention_flops(v, small, 64, 6, **hp)
        for v, hp in [("softmax", {}), ("linformer", {}), ("performer", {}), ("nystrom", {}), ("atrous_linear", {})]
    }
    n_ratio = large / small
    assert ratio["softmax"] == pytest.approx(n_ratio**2, rel=1e-9)
    for v in ("linformer", "performer", "nystrom", "atrous_linear"):
        assert ratio[v] < 1.1 * n_ratio, (v, ratio[v])
    fused = attention_activation_bytes("softmax", large, 64, 6)
    readable = attention_activation_bytes("softmax", large, 64, 6, fused=False)
    assert readable > 40 * fused


def test_unknown_variant_is_refused():
    with pytest.raises(AttentionConfigError, match="'flash'"):
        attention_flops("flash", 197, 64, 6)
