"""Attention zoo: exactness limits, approximation quality, weight transfer, training plumbing, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

from finetune.models.attention import (
    AttentionConfigError,
    SoftmaxAttention,
    atrous_linear_attention,
    attention_layer,
    check_attention,
    linformer_attention,
    nystrom_attention,
    performer_attention,
    softmax_attention,
)
from finetune.models.attention.atrous_linear import head_groups, neighbour_index, window_dot, window_sum
from finetune.models.attention.nystrom import iterative_pinv, segment_means
from finetune.models.attention.performer import favor_features, orthogonal_random_features, softmax_feature_parts

GRID = (8, 8)  # 32 px images, 4 px patches
VARIANTS = {
    "softmax": {},
    "linformer": {"rank": 16},
    "linformer_shared": {"rank": 16, "share_kv": True},
    "performer": {"features": 32},
    "nystrom": {"landmarks": 8},
    "nystrom_conv": {"landmarks": 8, "conv_kernel": 3},
    "atrous_linear": {"features": 32, "dilation": (1, 2, 3), "window": 3},
    "atrous_linear_gate": {"features": 32, "fusion": "gate"},
}
# State-dict keys each variant adds to a block's `attn` (parameters and persistent buffers).
OWN_KEYS = {
    "softmax": set(),
    "linformer": {"E", "F"},
    "linformer_shared": {"E"},
    "performer": {"projection"},
    "nystrom": set(),
    "nystrom_conv": {"res_conv.weight"},
    "atrous_linear": {"projection"},
    "atrous_linear_gate": {"projection", "gate_weight", "gate_bias"},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: OpenMP hand-offs cost more than they save, badly so on a loaded 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _variant(name: str) -> str:
    return name.split("_shared")[0].split("_conv")[0].replace("_gate", "")


def tiny_vit(name: str = "softmax", depth: int = 2, global_pool: str = "token", **overrides):
    hp = {**VARIANTS[name], **overrides}
    layer = attention_layer(_variant(name), grid_size=GRID, num_prefix_tokens=1, **hp)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=4,
        depth=depth,
        global_pool=global_pool,
        attn_layer=layer,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def qkv(B=2, H=3, N=21, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3)]


def smooth_qkv(seed: int, grid=(14, 14), H=3, D=64, temperature=1.0, B=1):
    """Queries/keys from a smooth random field on the patch grid (nearby patches look alike, as in a
    ViT on a natural image), plus noise and a random CLS token."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = grid

    def field():
        low = torch.randn(B * H, D, 4, 4, generator=g)
        f = F.interpolate(low, size=grid, mode="bicubic", align_corners=False)  # (BH, D, Hp, Wp)
        f = f.reshape(B, H, D, hp * wp).transpose(-1, -2)  # (B, H, Np, D)
        return f / f.norm(dim=-1, keepdim=True) * math.sqrt(D)

    f = field()
    q = temperature * (f + 0.3 * torch.randn(f.shape, generator=g))
    k = temperature * (f + 0.3 * torch.randn(f.shape, generator=g))
    v = field() + 0.5 * torch.randn(f.shape, generator=g)
    cls = [torch.randn(B, H, 1, D, generator=g) for _ in range(3)]
    return [torch.cat([c, x], dim=2) for c, x in zip(cls, (q, k, v))]


# ---------------------------------------------------------------- exact limits


@pytest.mark.parametrize("fused", [True, False])
def test_softmax_equals_timm_attention(fused):
    torch.manual_seed(0)
    ours = SoftmaxAttention(48, num_heads=4, qkv_bias=True)
    stock = TimmAttention(48, num_heads=4, qkv_bias=True)
    stock.load_state_dict(ours.state_dict())
    ours.fused_attn = fused
    x = torch.randn(2, 17, 48)
    torch.testing.assert_close(ours(x), stock(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [21, 32])
def test_nystrom_with_landmarks_covering_sequence_is_exact(N):
    q, k, v = qkv(N=N)
    exact = softmax_attention(q, k, v, fused=False)
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=N), exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=N + 5), exact, atol=1e-5, rtol=0)


def test_linformer_identity_projection_is_exact():
    q, k, v = qkv(N=23)
    eye = torch.eye(23)
    torch.testing.assert_close(
        linformer_attention(q, k, v, eye, eye), softmax_attention(q, k, v, fused=False), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "grid,prefix,dilation", [((4, 4), 1, (1, 1, 1)), ((3, 5), 2, (1,)), ((4, 5), 0, (1, 1, 1))]
)
def test_atrous_linear_window_covering_grid_is_exact(grid, prefix, dilation):
    N = prefix + grid[0] * grid[1]
    q, k, v = qkv(N=N)
    window = 2 * max(grid) - 1  # every patch is in every patch's neighbourhood: the tail is empty
    projection = orthogonal_random_features(16, 16, torch.Generator().manual_seed(0))
    exact = softmax_attention(q, k, v, fused=False)
    out = atrous_linear_attention(q, k, v, projection, grid, prefix, dilation, window)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=0)
    gate = torch.rand(2, 3, grid[0] * grid[1], 1) * 2  # any tail weight: there is no tail
    out = atrous_linear_attention(q, k, v, projection, grid, prefix, dilation, window, far_weight=gate)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=0)


def dense_hybrid(q, k, v, W, grid, P, dilation, window):
    """The hybrid estimator spelled out densely in float64 (no stabilisers needed): exact terms on the
    dilated window and the prefix keys, and two normalised estimates mixed per head, (1 - pi) checked +
    pi sampled. Checked tail: g * (FAVOR+ kernel estimates, no eps) + (1 - g) * (mean field: every tail
    key weighted exp(q . mean tail key)), g = rho2_mf / (rho2_rf + rho2_mf) from the two estimators'
    relative squared errors on the window's own terms. Sampled tail: the mean field times the window's
    Jensen gap (mean exact window term / exp(mean window logit)). pi = sigmoid((1.7 - z) / 0.2) *
    sigmoid((log(e_rf / e_flat) - log 1.25) / 0.1), z the head's mean over queries of (mean window logit
    - mean tail logit) / (its standard error), e_rf and e_flat the head's mean squared distances of the
    normalised window weights from the normalised kernel estimates and from flat."""
    q, k, v, W = q.double(), k.double(), v.double(), W.double()
    B, H, N, D = q.shape
    m, Np = W.shape[0], N - P
    k = k - k[:, :, P:].mean(dim=2, keepdim=True)  # centred keys: softmax unchanged
    s = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, N, N)
    a = s.exp()
    feat = lambda x: (x @ W.T * D**-0.25 - 0.5 * (x * x).sum(-1, keepdim=True) / math.sqrt(D)).exp()  # noqa: E731
    kern = feat(q) @ feat(k).transpose(-2, -1) / m  # (B, H, N, N): FAVOR+ estimates of exp(s)
    exact = torch.zeros(H, N, N, dtype=torch.bool)
    exact[:, :P, :] = True
    exact[:, :, :P] = True
    win = torch.zeros(H, N, N, dtype=torch.bool)
    for (h0, h1), rate in zip(head_groups(H, len(dilation)), dilation):
        idx = neighbour_index(grid, window, rate)  # (Np, w*w)
        for i in range(Np):
            for j in idx[i].tolist():
                if j < Np:
                    win[h0:h1, P + i, P + j] = True
    exact |= win
    tail = ~exact  # (H, N, N)
    with torch.no_grad():  # the tail weight is held fixed in the gradient, as in the module
        mass = (win * a).sum(-1, keepdim=True).clamp_min(1e-300)
        rho2_rf = (win * (kern - a) ** 2 / a).sum(-1, keepdim=True) / mass
        n_win = win.sum(-1, keepdim=True).clamp_min(1)  # (H, N, 1)
        mean_field_win = ((q * (win.double() @ k / n_win)).sum(-1, keepdim=True) / math.sqrt(D)).exp()  # (B, H, N, 1)
        rho2_mf = (win * (mean_field_win - a) ** 2 / a).sum(-1, keepdim=True) / mass
        g = rho2_mf / (rho2_rf + rho2_mf).clamp_min(1e-300)  # (B, H, N, 1)
        s_win = (q * (win.double() @ k / n_win)).sum(-1, keepdim=True) / math.sqrt(D)  # (B, H, N, 1)
        var_win = (win * (s - s_win) ** 2).sum(-1, keepdim=True) / (n_win - 1).clamp_min(1)
        gap = (win * a).sum(-1, keepdim=True) / n_win / mean_field_win  # (B, H, N, 1)
    n_tail = tail.sum(-1, keepdim=True).clamp_min(1)  # (H, N, 1)
    k_tail = (tail.double() @ k) / n_tail  # (B, H, N, D)
    mean_field = ((q * k_tail).sum(-1, keepdim=True) / math.sqrt(D)).exp()  # (B, H, N, 1)
    with torch.no_grad():
        z = (s_win - (q * k_tail).sum(-1, keepdim=True) / math.sqrt(D)) / (var_win / n_win).sqrt()  # (B, H, N, 1)
        share = win * a / mass  # (B, H, N, N)
        e_rf = ((win * kern / (win * kern).sum(-1, keepdim=True).clamp_min(1e-300) - share) ** 2).sum(-1, keepdim=True)
        e_flat = (win * (1 / n_win - share) ** 2).sum(-1, keepdim=True)  # (B, H, N, 1)
        ratio = e_rf[:, :, P:].mean(dim=2, keepdim=True) / e_flat[:, :, P:].mean(dim=2, keepdim=True)  # (B, H, 1, 1)
        pi = torch.sigmoid((1.7 - z[:, :, P:].mean(dim=2, keepdim=True)) / 0.2) * torch.sigmoid(
            (ratio.log() - math.log(1.25)) / 0.1
        )  # (B, H, 1, 1)
    checked = torch.where(exact, a, 0.0) + tail * (g * kern + (1 - g) * mean_field)  # (B, H, N, N)
    sampled = torch.where(exact, a, 0.0) + tail * mean_field * gap  # (B, H, N, N)
    out = lambda w: (w @ v) / w.sum(-1, keepdim=True)  # noqa: E731
    return (1 - pi) * out(checked) + pi * out(sampled)


def test_atrous_linear_matches_dense_reference():
    grid, P, dilation, window, m = (5, 6), 1, (1, 2), 3, 24
    H, D = 4, 16
    q, k, v = qkv(B=2, H=H, N=31, D=D, seed=3)
    W = orthogonal_random_features(m, D, torch.Generator().manual_seed(1))
    out = atrous_linear_attention(q, k, v, W, grid, P, dilation, window)
    torch.testing.assert_close(out.double(), dense_hybrid(q, k, v, W, grid, P, dilation, window), atol=1e-5, rtol=1e-4)
    q, k, v = smooth_qkv(0, grid=grid, H=H, D=D, temperature=1.5)  # peaked rows too
    torch.testing.assert_close(
        atrous_linear_attention(q, k, v, W, grid, P, dilation, window).double(),
        dense_hybrid(q, k, v, W, grid, P, dilation, window), atol=1e-5, rtol=1e-4,
    )


def test_neighbour_index_dilated_window_and_borders():
    idx = neighbour_index((5, 6), window=3, rate=2)  # (30, 9)
    assert idx.shape == (30, 9)
    centre = 2 * 6 + 3  # patch (2, 3)
    assert idx[centre].tolist() == [1, 3, 5, 13, 15, 17, 25, 27, 29]  # rows 0, 2, 4 x cols 1, 3, 5
    corner = idx[0].tolist()  # patch (0, 0): only offsets (0, 0), (0, +2), (+2, 0), (+2, +2) are on the grid
    assert corner == [30, 30, 30, 30, 0, 2, 30, 12, 14]
    assert head_groups(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert head_groups(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_window_products_match_gather_and_have_correct_gradients():
    grid, window = (3, 4), 3
    geometry = (grid, window, ((0, 1, 1), (1, 3, 2)))
    x, y = (torch.randn(1, 3, 12, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(1, 3, 12, 9, dtype=torch.float64, requires_grad=True)
    padded = F.pad(y, (0, 0, 0, 1))  # (B, H, Np+1, C): row Np is the zero padding
    gathered = []
    for h0, h1, rate in geometry[2]:
        idx = neighbour_index(grid, window, rate)  # (Np, w*w)
        gathered.append(padded[:, h0:h1][:, :, idx])  # (B, h, Np, w*w, C)
    gathered = torch.cat(gathered, dim=1)
    torch.testing.assert_close(window_dot(x, y, geometry), (x.unsqueeze(-2) * gathered).sum(-1))
    torch.testing.assert_close(window_sum(w, y, geometry), (w.unsqueeze(-1) * gathered).sum(-2))
    assert torch.autograd.gradcheck(lambda a, b: window_dot(a, b, geometry), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: window_sum(a, b, geometry), (w, y))


def test_nystrom_segments_are_uneven_and_unpadded():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10, 1)
    means = segment_means(x, 3)  # segments [0, 3), [3, 6), [6, 10)
    torch.testing.assert_close(means.flatten(), torch.tensor([1.0, 4.0, 7.5]))
    a = torch.randn(2, 5, 5).softmax(-1)
    torch.testing.assert_close(iterative_pinv(a, 20), torch.linalg.pinv(a), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- approximation quality


def test_performer_error_falls_with_features():
    q, k, v = qkv(B=1, H=2, N=65, D=16, seed=1)
    q, k = 0.5 * q, 0.5 * k
    exact = softmax_attention(q, k, v, fused=False)
    errors = []
    for m in (8, 32, 128, 512):
        per_seed = [
            rel_err(performer_attention(q, k, v, orthogonal_random_features(m, 16, torch.Generator().manual_seed(s))), exact)
            for s in range(5)
        ]
        errors.append(sum(per_seed) / len(per_seed))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_performer_matches_reference_package():
    """Same projection, same stabilisers and eps as performer-pytorch (benchmark-only dependency)."""
    reference = pytest.importorskip("performer_pytorch.performer_pytorch")
    q, k, v = qkv(N=50, D=16, seed=5)
    W = orthogonal_random_features(24, 16, torch.Generator().manual_seed(0))
    phi_q = reference.softmax_kernel(q, projection_matrix=W, is_query=True)
    phi_k = reference.softmax_kernel(k, projection_matrix=W, is_query=False)
    expected = reference.linear_attention(phi_q, phi_k, v)
    torch.testing.assert_close(performer_attention(q, k, v, W), expected, atol=1e-5, rtol=1e-4)


def test_performer_relu_kernel_is_a_positive_average():
    q, k, v = qkv(N=40, D=16, seed=4)
    W = orthogonal_random_features(32, 16, torch.Generator().manual_seed(0))
    out = performer_attention(q, k, v, W, kernel="relu")
    # Positive weights normalised to one: every output coordinate lies within the values' range.
    lo, hi = v.amin(dim=2, keepdim=True), v.amax(dim=2, keepdim=True)
    assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()
    assert rel_err(out, softmax_attention(q, k, v, fused=False)) > 1e-3  # a different kernel, not softmax


@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize(
    "inputs,margin",
    [("smooth", 0.6), ("smooth_cool", 0.9), ("iid", 0.95)],
)
def test_atrous_linear_beats_performer_at_equal_features(inputs, margin, m):
    """Same q, k, v and the same random projection. On spatially smooth inputs (the ViT regime) the
    exact windows carry the heavy part of each row and the hybrid is far better: measured 0.36x
    (smooth) and 0.60-0.71x (smooth_cool). On structureless iid N(0, 1) q, k (logit std 1, no
    locality) it is better too: measured 0.65x at m = 16 and 0.87x at m = 64. There the window is a
    random sample of the row, so the hybrid takes its sampled estimate (a flat tail at the Jensen gap
    measured on the window, see the atrous_linear docstring); before that switch it was 1.13x and
    1.59x, which the margin bounded at 1.7. tests/test_attention_fidelity.py sweeps both regimes."""
    errors = {"performer": 0.0, "atrous_linear": 0.0}
    seeds = range(4)
    for s in seeds:
        if inputs == "iid":
            q, k, v = qkv(B=1, H=3, N=197, D=64, seed=s)
        else:
            q, k, v = smooth_qkv(s, temperature=1.0 if inputs == "smooth" else 0.5)
        exact = softmax_attention(q, k, v, fused=False)
        W = orthogonal_random_features(m, 64, torch.Generator().manual_seed(100 + s))
        errors["performer"] += rel_err(performer_attention(q, k, v, W), exact) / len(seeds)
        hybrid = atrous_linear_attention(q, k, v, W, (14, 14), 1, (1, 2, 3), 3)
        errors["atrous_linear"] += rel_err(hybrid, exact) / len(seeds)
    assert errors["atrous_linear"] < margin * errors["performer"], errors


# ---------------------------------------------------------------- transfer and training plumbing


@pytest.mark.parametrize("name", list(VARIANTS))
def test_softmax_weights_transfer(name):
    source = tiny_vit("softmax")
    target = tiny_vit(name)
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    expected = {f"blocks.{b}.attn.{key}" for b in range(2) for key in OWN_KEYS[name]}
    assert set(result.missing_keys) == expected
    new_params = {n for n, _ in target.named_parameters()} - set(source.state_dict())
    assert new_params <= expected


def test_gate_starts_as_sum_fusion():
    torch.manual_seed(0)
    summed = tiny_vit("atrous_linear", fusion="sum").eval()
    gated = tiny_vit("atrous_linear", fusion="gate").eval()
    gated.load_state_dict(summed.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gated(x), summed(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = tiny_vit(name, depth=1, global_pool="avg")  # with CLS pooling, patch outputs of the last block are unused
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_autocast_and_batch_of_one(name):
    torch.manual_seed(0)
    model = tiny_vit(name, depth=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (1, 10)
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # batch of one == the same image inside a batch
        torch.testing.assert_close(model(x), model(torch.cat([x, torch.randn(2, 3, 32, 32)]))[:1], atol=1e-5, rtol=1e-4)


def test_fp16_inputs_are_computed_in_fp32_and_returned_as_fp16():
    q, k, v = qkv(N=65, D=16, dtype=torch.float16)
    W = orthogonal_random_features(32, 16, torch.Generator().manual_seed(0))
    for out in (
        performer_attention(q, k, v, W),
        nystrom_attention(q, k, v, 8, 6),
        atrous_linear_attention(q, k, v, W, (8, 8), 1, (1, 2, 3), 3),
    ):
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
    q32, k32, v32 = q.float(), k.float(), v.float()
    reference = atrous_linear_attention(q32, k32, v32, W, (8, 8), 1, (1, 2, 3), 3)
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=1e-2)  # only the fp16 rounding of the output


@pytest.mark.parametrize("name", ["performer", "atrous_linear"])
def test_random_features_survive_state_dict_round_trip(name):
    torch.manual_seed(1)
    a = tiny_vit(name, depth=1)
    torch.manual_seed(2)
    b = tiny_vit(name, depth=1)
    assert not torch.equal(a.blocks[0].attn.projection, b.blocks[0].attn.projection)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.blocks[0].attn.projection, b.blocks[0].attn.projection)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_performer_redraws_only_in_training_at_interval():
    torch.manual_seed(0)
    model = tiny_vit("performer", depth=1, redraw_interval=2)
    attn = model.blocks[0].attn
    x = torch.randn(1, 3, 32, 32)
    first = attn.projection.clone()
    model.eval()
    for _ in range(5):
        model(x)
    assert torch.equal(attn.projection, first)
    model.train()
    model(x)
    model(x)
    assert torch.equal(attn.projection, first)  # two calls: not yet
    model(x)
    assert not torch.equal(attn.projection, first)  # third call redraws
    never = tiny_vit("performer", depth=1).train()
    before = never.blocks[0].attn.projection.clone()
    for _ in range(4):
        never(x)
    assert torch.equal(never.blocks[0].attn.projection, before)


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "variant,hparams,needle",
    [
        ("linformer", {"rank": 65}, "rank=65"),
        ("linformer", {"rank": 100}, "rank=100"),
        ("linformer", {"rank": 0}, "rank=0"),
        ("linformer", {"rank": 2.5}, "rank=2.5"),
        ("performer", {"features": 0}, "features=0"),
        ("performer", {"kernel": "cosine"}, "kernel='cosine'"),
        ("performer", {"redraw_interval": -1}, "redraw_interval=-1"),
        ("nystrom", {"landmarks": 0}, "landmarks=0"),
        ("nystrom", {"pinv_iterations": 0}, "pinv_iterations=0"),
        ("nystrom", {"conv_kernel": 4}, "conv_kernel=4"),
        ("atrous_linear", {"dilation": (0, 1)}, "dilation=0"),
        ("atrous_linear", {"dilation": ()}, "dilation=()"),
        ("atrous_linear", {"window": 4}, "window=4"),
        ("atrous_linear", {"window": 5, "dilation": (1, 2)}, "window=5 at dilation rate 2 spans 9"),
        ("atrous_linear", {"window": 9, "dilation": (1,)}, "window=9 at dilation rate 1 spans 9"),
        ("atrous_linear", {"fusion": "concat"}, "fusion='concat'"),
        ("atrous_linear", {"features": 0}, "features=0"),
        ("atrous_linear", {"dilation": (1, 2, 3, 1)}, "num_heads=3"),
    ],
)
def test_bad_hyperparameters_are_named(variant, hparams, needle):
    with pytest.raises(AttentionConfigError) as err:
        check_attention(variant, dim=192, num_heads=3, grid_size=GRID, num_prefix_tokens=1, **hparams)
    assert needle in str(err.value)


@pytest.mark.parametrize("variant", ["linformer", "atrous_linear"])
def test_grid_is_required(variant):
    with pytest.raises(AttentionConfigError, match="grid"):
        attention_layer(variant, grid_size=None, num_prefix_tokens=1)(192, num_heads=3)


def test_linformer_refuses_other_sequence_length():
    layer = attention_layer("linformer", grid_size=GRID, num_prefix_tokens=1, rank=8)(48, num_heads=3)
    with pytest.raises(ValueError, match="N=65"):
        layer(torch.randn(1, 50, 48))


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    check_attention(
        "atrous_linear", dim=192, num_heads=3, grid_size=GRID, num_prefix_tokens=1,
        dilation=[np.int64(1), np.int64(2)], window=np.int64(3), features=np.int64(8),
    )
    check_attention("nystrom", dim=192, num_heads=3, grid_size=GRID, num_prefix_tokens=1, landmarks=np.int64(8))
