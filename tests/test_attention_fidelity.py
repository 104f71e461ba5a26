"""The hybrid against its two halves across locality, its exact limit and gradients; the smaller
fixes (Linformer's init, the ORF sign correction, Nystrom's iteration bound)."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.fidelity import exact_key_mask, local_only_attention, local_qkv, locality_sweep, rel_err
from finetune.models.attention import (
    AttentionConfigError,
    atrous_linear_attention,
    attention_layer,
    check_attention,
    linformer_attention,
    softmax_attention,
)
from finetune.models.attention.performer import orthogonal_random_features, performer_attention

TOL = 0.03  # "never worse" within 3 % (mean over seeds; per-seed worst measured 1.008x)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep():
    # temperatures 0.8 .. 5: window mass 0.55 .. 0.999 (see finetune.fidelity.local_qkv)
    return locality_sweep(temperatures=(0.8, 1.0, 1.2, 2.0, 3.0, 5.0), seeds=(0, 1, 2), features=64)


def test_locality_range_spans_split_to_local(sweep):
    masses = [r["window_mass"] for r in sweep]
    assert masses[0] < 0.6 and masses[-1] > 0.998, masses
    assert masses == sorted(masses)


def test_hybrid_never_worse_than_the_better_half(sweep):
    for r in sweep:
        best = min(r["local_only"], r["performer"])
        assert r["atrous_linear"] <= best * (1 + TOL), r


def test_hybrid_beats_both_halves_where_the_mass_is_split(sweep):
    split = [r for r in sweep if r["window_mass"] < 0.8]
    assert len(split) >= 2
    for r in split:  # measured: mass 0.55: 0.15 vs 0.32 / 0.69; mass 0.74: 0.127 vs 0.141 / 0.82
        assert r["atrous_linear"] < min(r["local_only"], r["performer"]), r
        if r["window_mass"] < 0.6:
            assert r["atrous_linear"] < 0.6 * min(r["local_only"], r["performer"]), r


@pytest.mark.parametrize("dilation,m", [((1, 2, 3), 16), ((1,), 16)])
def test_hybrid_vs_halves_other_budgets(dilation, m):
    rows = locality_sweep(temperatures=(0.8, 1.2, 3.0), seeds=(0, 1), features=m, dilation=dilation)
    for r in rows:
        assert r["atrous_linear"] <= min(r["local_only"], r["performer"]) * (1 + TOL), r


# ---------------------------------------------------------------- low locality

LOW_TOL = 0.05  # "never worse than the better half" on low-locality inputs within 5 % (worst measured 1.00x)


def iid_qkv(seed: int, logit_std: float, *, grid=(14, 14), heads: int = 6, head_dim: int = 64):
    """q, k, v [1, H, 1 + Hp*Wp, D] iid N(0, 1), q and k scaled so the logits q . k / sqrt(D) have std
    `logit_std`: no locality at all (a CLS token first, as random as the rest)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, heads, 1 + grid[0] * grid[1], head_dim)
    scale = math.sqrt(logit_std)
    return [scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g), torch.randn(shape, generator=g)]


# (name, generator(seed)): iid at logit std 0.5 .. 3; the smooth field drowned in noise (weak locality:
# noise 2 and 4 times the field), scaled to logit std about 1 and 3.
LOW_LOCALITY = [(f"iid, logit std {c:g}", lambda s, c=c: iid_qkv(s, c)) for c in (0.5, 1.0, 2.0, 3.0)] + [
    (f"smooth + noise {nu:g}, logit std {c:g}", lambda s, nu=nu, c=c: local_qkv(s, math.sqrt(c / (1 + nu * nu)), noise=nu))
    for nu in (2.0, 4.0)
    for c in (1.0, 3.0)
]


def low_locality_sweep(features: int = 64, dilation=(1, 2, 3), seeds=(0, 1, 2), window: int = 3):
    """Per LOW_LOCALITY case, means over seeds: relative errors of local-only, Performer and the hybrid
    (same projection) against exact softmax."""
    grid, heads = (14, 14), 6
    mask = exact_key_mask(heads, grid, 1, dilation, window)
    rows = []
    for name, make in LOW_LOCALITY:
        row = {"case": name, "local_only": 0.0, "performer": 0.0, "atrous_linear": 0.0}
        for s in seeds:
            q, k, v = make(s)
            exact = softmax_attention(q, k, v, fused=False)
            W = orthogonal_random_features(features, 64, torch.Generator().manual_seed(100 + s))
            row["local_only"] += rel_err(local_only_attention(q, k, v, mask), exact) / len(seeds)
            row["performer"] += rel_err(performer_attention(q, k, v, W), exact) / len(seeds)
            hybrid = atrous_linear_attention(q, k, v, W, grid, 1, tuple(dilation), window)
            row["atrous_linear"] += rel_err(hybrid, exact) / len(seeds)
        rows.append(row)
    return rows


@pytest.mark.parametrize("dilation,m", [((1, 2, 3), 64), ((1,), 64), ((1, 2, 3), 16), ((1,), 16)])
def test_hybrid_never_worse_than_performer_without_locality(dilation, m):
    """Without locality the window is a random sample of the row: the hybrid switches to the mean field
    calibrated by the window's Jensen gap (module docstring). Measured: 0.33-1.01x the better half (it
    was 1.1-1.6x Performer's error on iid q, k with logit std 1-3)."""
    for r in low_locality_sweep(features=m, dilation=dilation):
        assert r["atrous_linear"] <= min(r["local_only"], r["performer"]) * (1 + LOW_TOL), r


def test_locality_switch_keeps_the_checked_tail_on_local_heads():
    """Dilated heads on smooth inputs (rates 2, 3) keep the checked tail: the sampled estimate alone would
    be 1.2x worse there (module docstring); the hybrid stays below both halves."""
    for r in locality_sweep(temperatures=(0.8, 1.0), seeds=(0, 1, 2), features=64, dilation=(1, 2, 3)):
        assert r["atrous_linear"] < 0.9 * min(r["local_only"], r["performer"]), r


# ---------------------------------------------------------------- every regime (issue 21)

REGIME_TOL = 0.10  # the hybrid's error is at most 1.1x the better half's in every regime (mean over seeds)


def clustered_qkv(seed: int, temperature: float, *, grid=(14, 14), heads: int = 6, head_dim: int = 64,
                  clusters: int = 8, field: float = 1.0):
    """q, k, v [1, H, 1 + Hp*Wp, D] with non-local structure: every patch belongs to one of `clusters`
    random centres (labels scattered over the grid, so a row's mass sits on far-away keys of its
    cluster), plus `field` times a smooth field (some locality), plus noise; v follows the clusters."""
    g = torch.Generator().manual_seed(seed)
    np_ = grid[0] * grid[1]
    centres = torch.randn(heads, clusters, head_dim, generator=g)
    labels = torch.randint(0, clusters, (heads, np_), generator=g)[..., None].expand(heads, np_, head_dim)
    smooth = local_qkv(seed, 1.0, grid=grid, heads=heads, head_dim=head_dim, noise=0.0)[0][0, :, 1:]  # (H, Np, D)
    x = torch.gather(centres, 1, labels) + field * smooth  # (H, Np, D)
    q = temperature * (x + 0.5 * torch.randn(x.shape, generator=g))
    k = temperature * (x + 0.5 * torch.randn(x.shape, generator=g))
    v = torch.gather(torch.randn(heads, clusters, head_dim, generator=g), 1, labels) + 0.5 * torch.randn(x.shape, generator=g)
    cls = [torch.randn(1, heads, 1, head_dim, generator=g) for _ in range(3)]
    return [torch.cat([c, t[None]], dim=2) for c, t in zip(cls, (q, k, v))]


def _noisy(nu: float, c: float, grid=(14, 14)):
    """The smooth field under `nu` times as much noise, scaled to a logit std of about `c`."""
    return lambda s: local_qkv(s, math.sqrt(c / (1 + nu * nu)), noise=nu, grid=grid)


# (name, grid, generator(seed)). Window mass and logit std of each (dilation 1, 2, 3; dilation 1 in
# brackets) are printed by `python tests/test_attention_fidelity.py`.
REGIMES = [
    ("local strong (T 3)", (14, 14), lambda s: local_qkv(s, 3.0)),
    ("local split (T 0.8)", (14, 14), lambda s: local_qkv(s, 0.8)),
    ("local weak (noise 0.5, std 1)", (14, 14), _noisy(0.5, 1.0)),
    ("non-local, noise 1, std 0.5", (14, 14), _noisy(1.0, 0.5)),
    ("non-local, noise 1, std 1", (14, 14), _noisy(1.0, 1.0)),
    ("non-local, noise 2, std 1", (14, 14), _noisy(2.0, 1.0)),
    ("non-local 8x8, noise 2, std 0.5", (8, 8), _noisy(2.0, 0.5, (8, 8))),
    ("non-local 8x8, noise 2, std 1", (8, 8), _noisy(2.0, 1.0, (8, 8))),
    ("non-local 8x8, iid, std 0.5", (8, 8), lambda s: iid_qkv(s, 0.5, grid=(8, 8))),
    ("non-local 8x8, iid, std 1", (8, 8), lambda s: iid_qkv(s, 1.0, grid=(8, 8))),
    ("clustered + field, std 1", (14, 14), lambda s: clustered_qkv(s, 0.5)),
    ("clustered, std 0.75", (14, 14), lambda s: clustered_qkv(s, 0.5, field=0.0)),
    ("iid, std 1", (14, 14), lambda s: iid_qkv(s, 1.0)),
    ("iid, std 3", (14, 14), lambda s: iid_qkv(s, 3.0)),
]


def regime_sweep(features: int = 64, dilation=(1, 2, 3), seeds=(0, 1, 2), window: int = 3, regimes=REGIMES):
    """Per regime, means over seeds: window mass (window + CLS), logit std, and the relative errors of
    local-only, Performer and the hybrid (same projection) against exact softmax."""
    from finetune.fidelity import logits, masked_mass

    rows = []
    for name, grid, make in regimes:
        mask = exact_key_mask(6, grid, 1, dilation, window)
        row = {"case": name, "window_mass": 0.0, "logit_std": 0.0, "local_only": 0.0, "performer": 0.0, "atrous_linear": 0.0}
        for s in seeds:
            q, k, v = make(s)
            exact = softmax_attention(q, k, v, fused=False)
            W = orthogonal_random_features(features, 64, torch.Generator().manual_seed(100 + s))
            row["window_mass"] += masked_mass(q, k, mask, 1) / len(seeds)
            row["logit_std"] += float(logits(q, k).std()) / len(seeds)
            row["local_only"] += rel_err(local_only_attention(q, k, v, mask), exact) / len(seeds)
            row["performer"] += rel_err(performer_attention(q, k, v, W), exact) / len(seeds)
            hybrid = atrous_linear_attention(q, k, v, W, grid, 1, tuple(dilation), window)
            row["atrous_linear"] += rel_err(hybrid, exact) / len(seeds)
        rows.append(row)
    return rows


def test_regimes_include_non_local_windows_with_10_to_20_percent_of_the_mass():
    rows = {r["case"]: r for r in regime_sweep(seeds=(0,), regimes=[r for r in REGIMES if "non-local" in r[0]])}
    held = [r for r in rows.values() if 0.1 <= r["window_mass"] <= 0.2 and 0.5 <= r["logit_std"] <= 1.2]
    assert len(held) >= 4, rows


@pytest.mark.parametrize("dilation,m", [((1, 2, 3), 64), ((1,), 64), ((1, 2, 3), 16)])
def test_hybrid_within_1_1x_of_the_better_half_in_every_regime(dilation, m):
    """Issue 21: in no regime (local, weak, non-local with 10-20 % of the mass in the window at logit std
    0.5-1, clustered, iid) is the hybrid worse than 1.1x the better of its halves. Seeded (inputs and
    projections), so deterministic; mean of 3 seeds, because one draw of 16-64 random features has a
    spread of +-10 % around the mean (the bound is on the estimator, not on one draw)."""
    for r in regime_sweep(features=m, dilation=dilation):
        assert r["atrous_linear"] <= min(r["local_only"], r["performer"]) * (1 + REGIME_TOL), r


def _print_regime_table() -> None:
    for m, dilation in ((64, (1, 2, 3)), (64, (1,)), (16, (1, 2, 3))):
        print(f"\nm={m}, dilation={dilation}")
        print("| regime | window mass | logit std | local-only | performer | atrous_linear | / better half |")
        print("|---|---|---|---|---|---|---|")
        for r in regime_sweep(features=m, dilation=dilation):
            best = min(r["local_only"], r["performer"])
            print(f"| {r['case']} | {r['window_mass']:.3f} | {r['logit_std']:.2f} | {r['local_only']:.3f} | "
                  f"{r['performer']:.3f} | {r['atrous_linear']:.3f} | {r['atrous_linear'] / best:.2f} |", flush=True)


def _print_low_locality_table() -> None:
    for m, dilation in ((64, (1, 2, 3)), (16, (1, 2, 3)), (64, (1,))):
        print(f"\nm={m}, dilation={dilation}")
        print("| case | local-only | performer | atrous_linear | / better half |")
        print("|---|---|---|---|---|")
        for r in low_locality_sweep(features=m, dilation=dilation):
            best = min(r["local_only"], r["performer"])
            print(f"| {r['case']} | {r['local_only']:.3f} | {r['performer']:.3f} | {r['atrous_linear']:.3f} | "
                  f"{r['atrous_linear'] / best:.2f} |")


def test_peaked_rows_are_not_swamped_by_the_tail():
    """The failure the redesign fixes: with 99.9 % of the mass in the window, the old hybrid's eps
    terms carried the row (error 0.22 vs 0.008 local-only); now it is the local-only error."""
    q, k, v = local_qkv(0, 5.0)
    mask = exact_key_mask(6, (14, 14), 1, (1,), 3)
    exact = softmax_attention(q, k, v, fused=False)
    W = orthogonal_random_features(64, 64, torch.Generator().manual_seed(0))
    local = rel_err(local_only_attention(q, k, v, mask), exact)
    hybrid = rel_err(atrous_linear_attention(q, k, v, W, (14, 14), 1, (1,), 3), exact)
    assert hybrid <= local * 1.01 + 1e-6, (hybrid, local)


def test_keys_shared_component_does_not_matter():
    """Centring the keys is exact for softmax: a common key offset leaves the hybrid unchanged."""
    q, k, v = local_qkv(1, 1.0)
    W = orthogonal_random_features(32, 64, torch.Generator().manual_seed(0))
    shift = 3.0 * torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(2))
    a = atrous_linear_attention(q, k, v, W, (14, 14), 1, (1, 2, 3), 3)
    b = atrous_linear_attention(q, k + shift, v, W, (14, 14), 1, (1, 2, 3), 3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("grid,prefix", [((4, 4), 1), ((3, 5), 0)])
def test_window_covering_grid_is_exact_softmax(grid, prefix):
    q, k, v = local_qkv(0, 2.0, grid=grid, heads=3, head_dim=16)
    if not prefix:
        q, k, v = (t[:, :, 1:] for t in (q, k, v))
    W = orthogonal_random_features(8, 16, torch.Generator().manual_seed(0))
    out = atrous_linear_attention(q, k, v, W, grid, prefix, (1,), 2 * max(grid) - 1)
    torch.testing.assert_close(out, softmax_attention(q, k, v, fused=False), atol=1e-5, rtol=0)


def test_gradients_match_float64_reference():
    """Autograd through the shifted window products (hand-written backward, gradchecked in
    test_attention.py) equals the dense float64 estimator's gradients (tail weight held fixed)."""
    from test_attention import dense_hybrid

    grid, P, dilation, window, m = (5, 6), 1, (1, 2), 3, 16
    q, k, v = (t.clone().requires_grad_(True) for t in local_qkv(3, 0.8, grid=grid, heads=4, head_dim=16))
    W = orthogonal_random_features(m, 16, torch.Generator().manual_seed(1))
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    (atrous_linear_attention(q, k, v, W, grid, P, dilation, window) * weight).sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    (dense_hybrid(q64, k64, v64, W, grid, P, dilation, window) * weight.double()).sum().backward()
    for mine, ref in zip(ours, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(mine.double(), ref, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- smaller fixes


def test_linformer_init_is_fairseqs_and_closer_at_the_swap():
    layer = attention_layer("linformer", grid_size=(14, 14), num_prefix_tokens=1, rank=64)(384, num_heads=6)
    bound = math.sqrt(3 / (197 + 64))  # xavier_uniform_ gain 1/sqrt(2)
    assert layer.E.abs().max() <= bound and layer.E.abs().max() > 0.95 * bound
    assert abs(layer.E.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    q, k, v = local_qkv(0, 0.6)
    exact = softmax_attention(q, k, v, fused=False)
    g = torch.Generator().manual_seed(0)
    old = rel_err(linformer_attention(q, k, v, torch.randn(197, 64, generator=g) / 8, torch.randn(197, 64, generator=g) / 8), exact)
    new = rel_err(linformer_attention(q, k, v, layer.E.detach(), layer.F.detach()), exact)
    assert new < 0.8 * old, (new, old)  # measured 1.10 vs 1.63


def test_orthogonal_features_are_sign_corrected():
    first = torch.stack([orthogonal_random_features(8, 8, torch.Generator().manual_seed(s))[0, 0] for s in range(400)])
    positive = (first > 0).float().mean().item()
    assert 0.4 < positive < 0.6, positive  # without the correction: 0 of 400
    W = orthogonal_random_features(16, 16, torch.Generator().manual_seed(0))
    directions = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(16), atol=1e-5, rtol=0)


def test_performer_kernel_estimate_is_unbiased_after_sign_correction():
    q, k, _ = local_qkv(0, 0.3, heads=1, head_dim=8, grid=(2, 2))
    exact = (q[0, 0, 1] @ k[0, 0, 2] / math.sqrt(8)).exp()
    est = []
    for s in range(300):
        W = orthogonal_random_features(8, 8, torch.Generator().manual_seed(s))
        f = lambda x: (W @ x * 8**-0.25 - 0.5 * (x @ x) / math.sqrt(8)).exp()  # noqa: E731
        est.append((f(q[0, 0, 1]) @ f(k[0, 0, 2])) / 8)
    assert abs(torch.stack(est).mean().item() / exact.item() - 1) < 0.03


def test_nystrom_iterations_are_bounded_with_the_reason():
    with pytest.raises(AttentionConfigError) as err:
        check_attention("nystrom", dim=192, num_heads=3, grid_size=(8, 8), num_prefix_tokens=1, pinv_iterations=30)
    assert "pinv_iterations=30" in str(err.value) and "diverges" in str(err.value)
    check_attention("nystrom", dim=192, num_heads=3, grid_size=(8, 8), num_prefix_tokens=1, pinv_iterations=8)


def test_performer_reference_points_unchanged():
    """Performer itself is not redesigned: same estimator as before, only the projection draw changed."""
    q, k, v = local_qkv(0, 0.3, heads=2, head_dim=16, grid=(4, 4))
    W = orthogonal_random_features(512, 16, torch.Generator().manual_seed(0))
    assert rel_err(performer_attention(q, k, v, W), softmax_attention(q, k, v, fused=False)) < 0.1


if __name__ == "__main__":  # python tests/test_attention_fidelity.py: the regime and low-locality tables
    torch.set_num_threads(1)
    _print_regime_table()
    _print_low_locality_table()
