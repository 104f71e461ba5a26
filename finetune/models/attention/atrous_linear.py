"""Hybrid atrous-linear attention (ours): exact dilated local windows + a window-checked estimate of the tail.

Intuition. In most heads of a ViT, softmax attention puts most of each row's mass on a few nearby
patches (and CLS), with a long, flat tail over the rest of the image. The two families of efficient
attention each get one half right:

* From atrous attention (ACC-ViT, Rahman et al. 2024; DilateFormer, Jiao et al. 2023) we take the
  local half: heads are split into groups, one per dilation rate r in `dilation`, and a patch query
  attends *exactly* to its ``window x window`` neighbourhood sampled at stride r on the ``Hp x Wp``
  grid (positions off the grid are padded and masked), and to the prefix (CLS/register) keys.
* From kernel methods (Performer's FAVOR+ positive random features, Choromanski et al. 2021) and the
  sparse + low-rank split of Scatterbrain (Chen et al. 2021) we take a linear-cost estimate of
  everything outside the window: ``phi(q_i)^T sum_{j not in W(i)} phi(k_j) [v_j, 1]``, the global
  feature sums minus the window's own terms, in O(N m D).

Both halves estimate the same terms ``exp(s_ij)``, ``s_ij = q_i . k_j / sqrt(D)``, inside *one*
normalisation::

    num_i = sum_{j in W(i)} exp(s_ij) v_j + T_i^num        den_i = sum_{j in W(i)} exp(s_ij) + T_i^den
    out_i = num_i / den_i

and the design question is the tail estimate T_i. The first version used Performer's features
unchanged: ``phi = m^-1/2 (exp(W k' - |k'|^2/2 - c) + eps)`` with eps = 1e-4 (performer-pytorch). That
is exact in its formula but fails in the regime it was made for: on a ViT's own activations (logit
std ~2.4) the kernel parts of phi underflow against eps, so the eps terms (a uniform weight on every
key) carried ~100 % of the tail and swamped the exact window (~1e-4 of the mass): the output was the
plain average of the values. On synthetic local attention (below) it was worse than simply dropping
the tail whenever the window held most of the mass. What it is now:

1. **No eps, keys centred.** The features are FAVOR+'s kernel parts only; every term of a row (exact
   and estimated) shares one stabiliser, so the exact window can no longer be swamped. Keys are
   centred on their patch mean first: ``q_i . (k_j - mu)`` differs from ``q_i . k_j`` by a per-row
   constant, so softmax is unchanged, while FAVOR+'s variance (~ exp|q' + k'|^2) drops when the keys
   share a component (pretrained ViT keys do).
2. **Two tail estimators.** (a) the random-feature tail above (unbiased, but heavy-tailed on peaked
   logits: a typical draw underestimates, a rare one overestimates by orders of magnitude); (b) a
   mean-field tail: every tail key weighted ``exp(q_i . mean tail key)`` (Jensen: a lower bound of the
   tail mass, zero variance), its values summed exactly (global sum minus window sum, O(N w^2 D)).
3. **The window checks them, per query.** The window's exact terms are known, so each estimator is
   scored on them: ``rho2_rf`` is the relative squared error of the kernel estimates of the window
   terms, ``rho2_mf`` that of ``exp(q_i . mean window key)`` for every window key. The checked tail is
   ``g T_rf + (1 - g) T_mf`` with ``g = rho2_mf / (rho2_rf + rho2_mf)`` (inverse-error weighting),
   held fixed in the gradient. No learned parameter: pretrained weights transfer as before.
4. **A sampled estimate where the window is a sample of the row.** Without locality (iid q, k) the
   checked tail fails: the mean field underestimates the tail mass by the Jensen gap ``exp(var/2)``
   and the kernel estimates are noise, so the window's few random keys get far too much weight (1.1x
   to 1.6x Performer's error, whose eps happens to shrink such rows to the plain average). There the
   window *is* a random sample of the row, so its own Jensen gap (mean exact window term over
   ``exp(mean window logit)``, held fixed in the gradient) calibrates the mean field: the sampled
   tail is a flat weight ``gap_i exp(q_i . mean tail key)`` on every tail key. The output is
   ``(1 - pi) out_checked + pi out_sampled`` (two normalised estimates), with one ``pi`` per (image,
   head), held fixed in the gradient, from two statistics measured on the window and averaged over
   the head's queries:
   - locality ``z``: (mean window logit - mean tail logit) / its standard error over the window
     (about 0 for a random sample; ~2 for a rate-3 window on smooth inputs, 7-40 at rates 1-2);
   - shape ``e_rf / e_flat``: the squared distance of the normalised exact window weights from the
     normalised kernel estimates, over that from a flat shape (1.5-2.8 on iid and noisy inputs, where
     the features are noise; 0.03-0.6 on a trained ViT's heads, whose tails are concentrated on a
     few keys the features do find);
   ``pi = sigmoid((1.7 - z) / 0.2) * sigmoid((log(e_rf / e_flat) - log 1.25) / 0.1)``. The locality
   test alone is not enough: a trained ViT's heads are often anti-local (windows below the tail,
   z < 0), and a switch on z alone cost 0.83 against 0.57 there (the trained model below). The
   constants were set by hand on the sweeps below and that model, not learned.

Measured (relative Frobenius error vs exact softmax; q, k, v from ``finetune.fidelity.local_qkv``,
q and k a smooth field on the 14 x 14 grid plus noise, times a temperature, or iid N(0, 1) scaled to
a logit std; H = 6, D = 64, window 3, m = 64, same projection for both; mean of 3 seeds; "old
hybrid" is the eps design before the redesign, "checked only" the redesign before the switch).
Local, dilation 1 (``python -m finetune.fidelity``):

    window mass   local-only   Performer   old hybrid   checked only   hybrid
    0.55          0.321        0.70        0.24         0.149          0.149
    0.74          0.141        0.82        0.17         0.127          0.127
    0.83          0.099        0.93        0.14         0.098          0.098
    0.91          0.066        0.96        0.11         0.066          0.066
    0.95          0.045        0.96        0.064        0.045          0.045
    0.99          0.017        0.96        0.017        0.017          0.017
    0.999         0.007        0.96        0.009        0.007          0.007

Local, dilation (1, 2, 3) (``finetune.fidelity.locality_sweep(dilation=(1, 2, 3))``; the dilated
windows hold less of the mass):

    window mass   local-only   Performer   checked only   hybrid
    0.31          0.435        0.70        0.297          0.307
    0.41          0.346        0.82        0.300          0.291
    0.48          0.320        0.93        0.315          0.304
    0.68          0.238        0.96        0.238          0.237

Low locality, dilation (1, 2, 3) (``python tests/test_attention_fidelity.py``; "smooth + noise nu":
the field drowned in nu times as much noise):

    input                           local-only   Performer   checked only   hybrid
    iid, logit std 0.5              4.70         1.357       0.754          0.449
    iid, logit std 1                4.07         0.865       1.407          0.764
    iid, logit std 2                2.34         0.968       1.318          0.954
    iid, logit std 3                1.79         0.988       1.391          0.986
    smooth + noise 2, logit std 1   1.71         0.580       0.547          0.527
    smooth + noise 2, logit std 3   1.01         0.916       0.915          0.866
    smooth + noise 4, logit std 1   2.15         0.393       0.561          0.355
    smooth + noise 4, logit std 3   1.56         0.876       1.244          0.865

(at m = 16 the hybrid is 0.23-1.00x the better half on these rows; the checked-only design was up to
1.42x.) On a trained 6-block tiny ViT's own q, k, v (8 x 8 grid, BENCHMARKS.md "Attention fidelity"),
mean over blocks: local-only 0.78, Performer 0.847, checked only 0.567, hybrid 0.586 (below
Performer in every block).

Where it helps: when the mass is split between window and tail the hybrid is better than both halves
(0.55: half the local-only error); when the window holds nearly everything it equals local-only (the
checks send the tail weight to the mean field, whose mass is then negligible); without locality it is
0.33-1.00x Performer's error (iid rows are nearly flat and the calibrated flat tail is what they
are). tests/test_attention_fidelity.py asserts it is never worse than the better half by more than
3 % on local and 5 % on low-locality inputs (worst measured: 1.00x). Where not: at high logit std
without locality nothing beats the plain average by much (error ~0.99 for every method); the switch
is per head, so a head that mixes local and non-local queries gets one estimate for all; the hybrid
gives up ~3 % on the trained ViT above against the checked-only design (a few heads' shape statistic
crosses 1.25 in some images); and it is not exact: a rare heavy random-feature draw that also looks
good on the window still leaks into the checked tail.

Exactness: a head group whose window reaches every patch from every patch has no tail (it is dropped
exactly, not computed as "global minus window"), so a window covering the grid is exact softmax. The
module refuses windows wider than the grid (see Hyperparameters); that limit is reached through
`atrous_linear_attention`, which accepts any window. Prefix queries attend to all N keys exactly.

Stabilisers: keys share one offset ``c_k`` (the largest log-feature over keys and features) per
(batch, head); each query uses ``c_q``, the largest of its log-features and of its exact and mean-field
logits, so every exponential is <= 1; both cancel in num / den. The sampled estimate scales its
exact terms by ``r = exp(-shift)`` and its flat tail by the same factor, so that tail's total weight is
<= 1 however large the measured gap (it cancels within that estimate too).

Head groups. H heads are split into ``len(dilation)`` contiguous groups as evenly as possible (the
first ``H % len(dilation)`` groups get one head more; 6 heads, rates (1, 2, 3): two heads each); H
must be at least ``len(dilation)``.

Shapes (P prefix tokens, Np = Hp * Wp patches, w = window, m = features):
    q, k, v                  (B, H, N, D)       split into prefix (B, H, P, D) and patches (B, H, Np, D)
    prefix queries           (B, H, P, D)       exact softmax over all N keys
    exact window logits      (B, H, Np, w*w),  prefix logits (B, H, Np, P)
    mean tail/window logits  (B, H, Np, 1)      minus / plus the sum of the window logits over the tail /
                                                window size (the centred patch keys sum to zero, so the
                                                tail's key sum is minus the window's)
    e(q), e(k) / m           (B, H, Np, m)      kernel parts of the features (no eps)
    e(K)^T V, e(K)^T 1       (B, H, m, D), (B, H, m)
    window kernel estimates  (B, H, Np, w*w)   e(q_i) . e(k_j) / m for j in the window
    tail weights g           (B, H, Np, 1)
    locality z, gap, r       (B, H, Np, 1)      per query; z and the shape errors averaged to pi (B, H, 1, 1)
    output weights           (B, H, Np, 1) x3   (1 - pi) / den_checked, pi / den_sampled, their exact-term sum
The window products never gather windows: a dilated window is w*w fixed shifts of the grid, so each
product is w*w elementwise products of the (Hp, Wp) grid with a shifted view of itself, each on the
region where the shift stays on the grid (`window_dot`, `window_sum`, `_window_scatter` for their
adjoint; a hand-written backward that saves only their inputs). The flat tails' values (all patches'
value sum minus the window's) ride on the output's window sum: its weights are the exact-term weights
minus the random-feature weights minus the flat weight, plus the flat weight times the value sum.

Training memory: `atrous_linear_attention` runs the core as one autograd Function (`_Recompute`) that
saves q, k, v (views of the layer's qkv output, which SDPA keeps too), the gate, and O(N) statistics:
per query the held-fixed c_q, g, shift, log_gap - shift and the two window products (4 + 2 w^2
floats), per head pi and c_k. Backward reruns the forward graph from them (without the checks and the
window products' forward) and differentiates it: gradients are those of the plain graph (the same
function, `_hybrid`; tests/test_atrous_paths.py). Inference (no grad) and torch.compile (which plans
its own memory) run `_hybrid` directly.

Cost per head: O(N (w^2 + m) D + N w^2 m + N P D) time (the checks and the switch add O(N w^2));
saved for backward O(N w^2) (plus q, k, v); transient memory O(N (D + m + w^2)), no (N, w^2, D)
tensor is ever formed. The two estimates share every product: the output is one window sum of
combined weights. Training pays the forward twice (the recomputation), backward about twice more.

Speed (CPU, one thread, one ViT-S layer with qkv and output projections, batch 2, forward + backward;
`python -m benchmarks.attention --batch 2 --repeats 7 --threads 1 --tokens 197 577 3137 --variants
softmax atrous_linear --no-reference`, five runs on a shared 2-core machine): 0.34-0.47x SDPA at
N = 197, 0.43-0.66x at 577, 1.44-1.76x at 3137; autograd keeps 1.08x SDPA's bytes at every N (40 vs
37 MB at 3137; 4.7x, 174 MB, before the recomputation). The core alone, interleaved against the
pre-recomputation version: 0.84-0.88x its time at 197, 0.66-0.78x at 577, 0.76-1.3x at 3137 (noisy),
recomputation included. Where the time goes: the four feature GEMMs, ~30 elementwise maps over
(Np, m) / (Np, D) tensors and the window products (per product 3 groups x 8 shifts + the centre), the
forward twice in training plus the backward. Tried and dropped: the dense path for small grids (full q k^T and e(q) e(K)^T gathered /
scattered at the windows) was 1.4-2x slower than the shifts at N = 197 (CPU gather / scatter
backward); gathering the windows (index_select, unfold, as_strided + matmul) or channels-first
shifts were no faster at 197-577 and 2-5x slower at 3137; split prefix / patch leaves in the
recomputation (to avoid zero-filled slice gradients) gained nothing measurable.

fusion='gate' (for comparison, ACC-ViT-style gating between the atrous and the global branch): the
tail terms (all three estimators) are scaled by a learned, input-dependent ``g_i = 2 sigmoid(q_i . a_h +
b_h)`` per head, i.e. ``num_i = exact_i + g_i tail_i`` (same in den_i). ``a`` (`gate_weight`,
[H, D, 1]) and ``b`` (`gate_bias`, [H, 1, 1]) are the only new parameters; they start at zero, so
g = 1 and a gated model starts as exactly the 'sum' model (and a pretrained softmax ViT's weights
transfer the same way).

`attn_drop` is not applied (no full attention matrix exists to drop).

Hyperparameters:
    dilation: tuple of rates >= 1, one per head group (default (1, 2, 3)).
    window: odd neighbourhood side >= 1; the module requires the span (window - 1) * r + 1 to fit in
        min(Hp, Wp) for every rate r (default 3).
    features (m): random features for the tail, >= 1 (default 64).
    fusion: 'sum' (one normalised estimate) or 'gate' (learned tail weight).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import AttentionBase, AttentionConfigError
from .hparams import HParam
from .performer import orthogonal_random_features
from .registry import register_attention

FUSIONS = ("sum", "gate")
# The switch between the checked and the sampled estimate (module docstring): a head is local when its
# windows' mean logits sit more than LOCALITY_Z standard errors above its tails'; the random features
# describe the window's shape when their squared error is below SHAPE_RATIO times a flat shape's.
LOCALITY_Z = 1.7
LOCALITY_WIDTH = 0.2
SHAPE_RATIO = 1.25
SHAPE_WIDTH = 0.1  # in log(ratio)
Z_CLIP = 50.0  # bounds a query's z when its window logits have no spread (window 1, constant keys)


def head_groups(num_heads: int, num_groups: int) -> List[Tuple[int, int]]:
    """Contiguous [start, stop) head ranges, sizes as even as possible (larger groups first)."""
    base, extra = divmod(num_heads, num_groups)
    bounds, start = [], 0
    for g in range(num_groups):
        stop = start + base + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def neighbour_index(
    grid_size: Tuple[int, int], window: int, rate: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Patch indices of each patch's dilated window: [Np, window * window]; off-grid slots hold Np.

    Slot order is row-major over the offsets ``(dy, dx) in (-(w//2)..w//2)^2 * rate``; the centre slot
    ``(w*w)//2`` is the patch itself.
    """
    hp, wp = grid_size
    offsets = (torch.arange(window, device=device) - window // 2) * rate  # (w,)
    ys = torch.arange(hp, device=device)[:, None, None, None] + offsets[None, None, :, None]  # (Hp, 1, w, 1)
    xs = torch.arange(wp, device=device)[None, :, None, None] + offsets[None, None, None, :]  # (1, Wp, 1, w)
    valid = (ys >= 0) & (ys < hp) & (xs >= 0) & (xs < wp)  # (Hp, Wp, w, w)
    index = torch.where(valid, ys * wp + xs, torch.full_like(ys * wp + xs, hp * wp))  # (Hp, Wp, w, w)
    return index.reshape(hp * wp, window * window)  # (Np, w*w)


# ---------------------------------------------------------------------------------------------------
# Window products without materialising windows. A dilated window is a fixed set of grid shifts, so
# "q_i . k_j for every j in i's window" is, for each of the w*w shifts, one elementwise product of the
# grid with a shifted view of itself, restricted to where the shift stays on the grid (the rest is 0:
# no padded copies). Gathering the windows instead would write and re-read (Np, w*w, C) tensors and
# their gradients; the shift loops below touch only (Np, C) tensors and save nothing but their inputs.
# Geometry: (grid_size, window, ((h0, h1, rate), ...)) -- one entry per head group.

Geometry = Tuple[Tuple[int, int], int, Tuple[Tuple[int, int, int], ...]]


def _shifts(window: int, rate: int) -> List[Tuple[int, int]]:
    """(dy, dx) per window slot, in `neighbour_index`'s row-major slot order."""
    offsets = [(i - window // 2) * rate for i in range(window)]
    return [(dy, dx) for dy in offsets for dx in offsets]


_PLANS: dict = {}


def _plan(window: int, rate: int, hp: int, wp: int) -> Tuple[Tuple[int, slice, slice, slice, slice], ...]:
    """Per off-centre window slot o: (o, target rows, target cols, source rows, source cols) on the grid;
    target position i reads source i + shift_o (only where that is on the grid)."""
    key = (window, rate, hp, wp)
    if key in _PLANS:
        return _PLANS[key]

    def spans(shift: int, size: int) -> Tuple[slice, slice]:
        lo, hi = max(0, -shift), max(max(0, -shift), min(size, size - shift))
        return slice(lo, hi), slice(lo + shift, hi + shift)

    centre = (window * window) // 2
    plan = []
    for o, (dy, dx) in enumerate(_shifts(window, rate)):
        if o != centre:
            (ti, si), (tj, sj) = spans(dy, hp), spans(dx, wp)
            plan.append((o, ti, tj, si, sj))
    if not torch.compiler.is_compiling() and len(_PLANS) < 1024:
        _PLANS[key] = tuple(plan)
    return tuple(plan)


def _sub(t: torch.Tensor, h0: int, h1: int, rows: slice, cols: slice, slot: Optional[int] = None) -> torch.Tensor:
    """t[:, h0:h1, rows, cols] (slot given: [..., slot:slot+1], or [..., slot] with slot=~o) of a
    (B, H, Hp, Wp, C) grid as one as_strided view (a chain of slices costs several dispatches per shift)."""
    B, _, _, _, C = t.shape
    sB, sH, sR, sC, sL = t.stride()
    size = (B, h1 - h0, rows.stop - rows.start, cols.stop - cols.start)
    offset = t.storage_offset() + h0 * sH + rows.start * sR + cols.start * sC
    if slot is None:
        return t.as_strided(size + (C,), (sB, sH, sR, sC, sL), offset)
    if slot < 0:  # the slot dimension dropped
        return t.as_strided(size, (sB, sH, sR, sC), offset + ~slot * sL)
    return t.as_strided(size + (1,), (sB, sH, sR, sC, sL), offset + slot * sL)


def _window_dot(x: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """out[i, o] = x_i . y_(i + shift_o), 0 off the grid. x, y: (B, H, Np, C) -> (B, H, Np, w*w)."""
    (hp, wp), window, groups = geometry
    B, H, Np, C = x.shape
    centre = (window * window) // 2
    out = x.new_zeros(B, H, hp, wp, window * window)  # (B, H, Hp, Wp, w*w)
    xg, yg = x.view(B, H, hp, wp, C), y.view(B, H, hp, wp, C)
    full_r, full_c = slice(0, hp), slice(0, wp)
    for h0, h1, rate in groups:
        torch.linalg.vecdot(_sub(xg, h0, h1, full_r, full_c), _sub(yg, h0, h1, full_r, full_c),
                            out=_sub(out, h0, h1, full_r, full_c, ~centre))
        for o, ti, tj, si, sj in _plan(window, rate, hp, wp):
            torch.linalg.vecdot(_sub(xg, h0, h1, ti, tj), _sub(yg, h0, h1, si, sj), out=_sub(out, h0, h1, ti, tj, ~o))
    return out.view(B, H, Np, window * window)


def _window_sum(w: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """out_i = sum_o w[i, o] y_(i + shift_o). w: (B, H, Np, w*w), y: (B, H, Np, C) -> (B, H, Np, C)."""
    (hp, wp), window, groups = geometry
    B, H, Np, C = y.shape
    centre = (window * window) // 2  # the zero shift covers the whole grid: it initialises `out`
    out = y.new_empty(B, H, hp, wp, C)  # (B, H, Hp, Wp, C)
    wg, yg = w.view(B, H, hp, wp, window * window), y.view(B, H, hp, wp, C)
    full_r, full_c = slice(0, hp), slice(0, wp)
    for h0, h1, rate in groups:
        torch.mul(_sub(wg, h0, h1, full_r, full_c, centre), _sub(yg, h0, h1, full_r, full_c),
                  out=_sub(out, h0, h1, full_r, full_c))
        for o, ti, tj, si, sj in _plan(window, rate, hp, wp):
            _sub(out, h0, h1, ti, tj).addcmul_(_sub(wg, h0, h1, ti, tj, o), _sub(yg, h0, h1, si, sj))
    return out.view(B, H, Np, C)


def _window_scatter(w: torch.Tensor, x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Adjoint of both products in their shifted argument: out_j = sum_o w[j - shift_o, o] x_(j - shift_o).

    w: (B, H, Np, w*w), x: (B, H, Np, C) -> (B, H, Np, C).
    """
    (hp, wp), window, groups = geometry
    B, H, Np, C = x.shape
    centre = (window * window) // 2
    out = x.new_empty(B, H, hp, wp, C)  # (B, H, Hp, Wp, C)
    wg, xg = w.view(B, H, hp, wp, window * window), x.view(B, H, hp, wp, C)
    full_r, full_c = slice(0, hp), slice(0, wp)
    for h0, h1, rate in groups:
        torch.mul(_sub(wg, h0, h1, full_r, full_c, centre), _sub(xg, h0, h1, full_r, full_c),
                  out=_sub(out, h0, h1, full_r, full_c))
        for o, ti, tj, si, sj in _plan(window, rate, hp, wp):  # target i read source i + shift: add back
            _sub(out, h0, h1, si, sj).addcmul_(_sub(wg, h0, h1, ti, tj, o), _sub(xg, h0, h1, ti, tj))
    return out.view(B, H, Np, C)


class _WindowDot(torch.autograd.Function):
    """s[i, o] = x_i . y_(i + shift_o); backward: dx = window_sum(ds, y), dy = scatter(ds, x).
    `known`: the product already computed (by an earlier forward on the same x, y), returned as is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, geometry: Geometry, known: Optional[torch.Tensor]) -> torch.Tensor:
        x, y = x.contiguous(), y.contiguous()
        ctx.save_for_backward(x, y)
        ctx.geometry = geometry
        return _window_dot(x, y, geometry) if known is None else known.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _window_sum(grad, y, ctx.geometry) if ctx.needs_input_grad[0] else None
        dy = _window_scatter(grad, x, ctx.geometry) if ctx.needs_input_grad[1] else None
        return dx, dy, None, None


class _WindowSum(torch.autograd.Function):
    """out_i = sum_o w[i, o] y_(i + shift_o); backward: dw = window_dot(dout, y), dy = scatter(w, dout)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        w, y = w.contiguous(), y.contiguous()
        ctx.save_for_backward(w, y)
        ctx.geometry = geometry
        return _window_sum(w, y, geometry)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        w, y = ctx.saved_tensors
        grad = grad.contiguous()
        dw = _window_dot(grad, y, ctx.geometry) if ctx.needs_input_grad[0] else None
        dy = _window_scatter(w, grad, ctx.geometry) if ctx.needs_input_grad[1] else None
        return dw, dy, None


def window_dot(x: torch.Tensor, y: torch.Tensor, geometry: Geometry, known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable `_window_dot`: (B, H, Np, C) x2 -> (B, H, Np, w*w) (`known`: its value, if computed)."""
    return _WindowDot.apply(x, y, geometry, known)


def window_sum(w: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Differentiable `_window_sum`: (B, H, Np, w*w), (B, H, Np, C) -> (B, H, Np, C)."""
    return _WindowSum.apply(w, y, geometry)


def atrous_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int = 1,
    dilation: Sequence[int] = (1, 2, 3),
    window: int = 3,
    far_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hybrid attention. q, k, v: [B, H, N, D], projection: [m, D] -> [B, H, N, D] (dtype of v).

    Args:
        grid_size: (Hp, Wp) with N = num_prefix_tokens + Hp * Wp.
        dilation: one rate per head group (H split as evenly as possible, see `head_groups`).
        window: odd side of the neighbourhood; any size (a window covering the grid gives exact softmax).
        far_weight: optional [B, H, Np, 1] weight of the random-feature tail ('gate' fusion); None = 1.
    Computed in fp32 with autocast disabled.
    """
    B, H, N, D = (int(size) for size in q.shape)  # plain ints also under jit tracing (fvcore)
    P = num_prefix_tokens
    hp, wp = grid_size
    Np = hp * wp
    if N != P + Np:
        raise ValueError(f"atrous_linear: N={N} tokens but grid {hp}x{wp} + {P} prefix tokens = {P + Np}")
    if H < len(dilation):
        raise AttentionConfigError(
            f"atrous_linear needs at least one head per dilation rate: num_heads={H} < len(dilation)={len(dilation)}"
        )
    args = (projection, (hp, wp), P, tuple(int(r) for r in dilation), int(window))
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, far_weight))
    if not grads or torch.compiler.is_compiling():  # inference, or the compiler plans memory itself
        return _hybrid(q, k, v, far_weight, *args)[0]
    return _Recompute.apply(q, k, v, far_weight, args)


class _Recompute(torch.autograd.Function):
    """The hybrid with activation recomputation: saves q, k, v (views of the layer's qkv storage), the
    gate, and O(N w^2) statistics (the held-fixed stabilisers, tail and switch weights, and the two
    window products, so neither the checks nor those products' forward are rerun); backward recomputes
    the forward graph from them and differentiates it (the same gradients as `_hybrid`'s own graph)."""

    @staticmethod
    def forward(ctx, q, k, v, far_weight, args):
        out, stats = _hybrid(q, k, v, far_weight, *args)
        ctx.args = args
        ctx.save_for_backward(q, k, v, far_weight, *stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, far_weight, *stats = ctx.saved_tensors
        inputs = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in zip((q, k, v, far_weight), ctx.needs_input_grad[:4])
        ]
        with torch.enable_grad():
            out, _ = _hybrid(*inputs, *ctx.args, stats=tuple(stats))
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(out, leaves, grad, allow_unused=True))
        return (*(next(found) if t is not None and t.requires_grad else None for t in inputs), None)


# Per-geometry constants (window validity, tail sizes), built once per (grid, window, rates, heads, device).
_LAYOUTS: dict = {}


def _layout(grid_size: Tuple[int, int], window: int, dilation: Tuple[int, ...], H: int, device: torch.device):
    """(geometry, valid (H, Np, w*w) bool, n_tail (H, Np, 1), tail_on (1, H, Np, 1)) for these windows."""
    key = (tuple(grid_size), window, dilation, H, str(device))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    hp, wp = grid_size
    Np = hp * wp
    groups, valid, has_tail = [], [], []
    # Cached tensors are reused by later calls, also under autograd: never make them inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        for (h0, h1), rate in zip(head_groups(H, len(dilation)), dilation):
            groups.append((h0, h1, rate))
            idx = neighbour_index(grid_size, window, rate, device=device)  # (Np, w*w)
            valid.append((idx < Np).expand(h1 - h0, Np, window * window))  # (h, Np, w*w)
            # A window reaching every patch from every patch leaves no tail: drop it exactly rather than
            # as "global sum minus window", which would leave fp32 cancellation noise.
            reach = (window // 2) * rate
            has_tail += [float(reach < max(hp, wp) - 1 or rate > 1)] * (h1 - h0)
        valid = torch.cat(valid, dim=0)  # (H, Np, w*w)
        n_tail = Np - valid.sum(dim=-1, keepdim=True).float()  # (H, Np, 1): patches outside each window
        tail_on = torch.tensor(has_tail, device=device).view(1, H, 1, 1) * (n_tail > 0).float()  # (1, H, Np, 1)
    geometry: Geometry = ((hp, wp), window, tuple(groups))
    layout = (geometry, valid, n_tail, tail_on)
    if not torch.compiler.is_compiling():
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _hybrid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    far_weight: Optional[torch.Tensor],
    projection: torch.Tensor,
    grid_size: Tuple[int, int],
    P: int,
    dilation: Tuple[int, ...],
    window: int,
    stats: Optional[Tuple[torch.Tensor, ...]] = None,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The hybrid's forward graph -> (out, stats). stats: per query (c_q, g, shift, log_gap - shift)
    (B, H, Np, 4), per head (pi, c_k) (B, H, 1, 2), and the two window products (s_raw, p_win)
    (B, H, Np, 2 w*w). Given `stats` from an earlier call on the same inputs, the held-fixed quantities
    are read from it, the window checks skipped and the window products' forward not redone."""
    B, H, N, D = (int(size) for size in q.shape)
    hp, wp = grid_size
    Np = hp * wp
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        m = projection.shape[0]
        tiny = torch.finfo(torch.float32).tiny
        geometry, valid, n_tail, tail_on = _layout(grid_size, window, dilation, H, q.device)
        # Keys centred on their patch mean: q_i . (k_j - mu) differs from q_i . k_j by a per-query
        # constant, so softmax is unchanged, but the feature estimator's variance (~exp|q' + k'|^2)
        # drops when keys share a component (pretrained ViT keys do).
        mu = k[:, :, P:].mean(dim=2, keepdim=True)  # (B, H, 1, D)
        kp, kpre = k[:, :, P:] - mu, k[:, :, :P] - mu  # (B, H, Np, D), (B, H, P, D)
        vp, vpre = v[:, :, P:].contiguous(), v[:, :, :P]  # (B, H, Np, D), (B, H, P, D)
        qs = q[:, :, P:] * D**-0.5  # (B, H, Np, D)
        if P:  # prefix queries: exact softmax over all N (centred) keys
            qpre = q[:, :, :P] * D**-0.5  # (B, H, P, D)
            a_p = torch.cat([qpre @ kpre.transpose(-2, -1), qpre @ kp.transpose(-2, -1)], dim=-1).softmax(dim=-1)  # (B, H, P, N)
            out_prefix = a_p[..., :P] @ vpre + a_p[..., P:] @ vp  # (B, H, P, D)

        # Exact logits of the window and of the prefix keys.
        w2 = window * window
        s_raw = window_dot(qs, kp, geometry, None if stats is None else stats[2][..., :w2])  # (B, H, Np, w*w), 0 off the grid
        s_win = s_raw.masked_fill(~valid, float("-inf"))  # (B, H, Np, w*w)
        s_pre = qs @ kpre.transpose(-2, -1)  # (B, H, Np, P)
        # Mean-field tail logit q_i . (mean tail key): the centred patch keys sum to zero, so the tail's
        # key sum is minus the window's, and q_i . (window key sum) is the sum of the window logits.
        s_sum = s_raw.sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
        s_mf = -s_sum / n_tail.clamp_min(1.0)  # (B, H, Np, 1): mean tail logit

        # FAVOR+ kernel parts without Performer's eps (softmax_feature_parts, with x' = x D^-1/4 folded
        # into the projection): log e(x) = W x' - |x'|^2 / 2 - c; keys share one c_k per (batch, head).
        wt = projection.float().t()  # (D, m)
        proj_k = kp @ (wt * D**-0.25)  # (B, H, Np, m)
        diag_k = kp.square().sum(dim=-1, keepdim=True) * (0.5 * D**-0.5)  # (B, H, Np, 1)
        proj_q = qs @ (wt * D**0.25)  # (B, H, Np, m): W q', q' = qs D^1/4
        diag_q = qs.square().sum(dim=-1, keepdim=True) * (0.5 * D**0.5)  # (B, H, Np, 1)
        with torch.no_grad():
            if stats is None:
                c_k = (proj_k - diag_k).amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
                # One offset per query for every term (features, window, prefix, mean field): the largest,
                # so every exponential is <= 1; it cancels in num / den.
                c_q = torch.maximum((proj_q - diag_q).amax(dim=-1, keepdim=True), s_win.amax(dim=-1, keepdim=True) - c_k)
                c_q = torch.maximum(c_q, s_mf - c_k)
                if P:
                    c_q = torch.maximum(c_q, s_pre.amax(dim=-1, keepdim=True) - c_k)  # (B, H, Np, 1)
            else:
                c_q, c_k = stats[0][..., 0:1], stats[1][..., 1:2]  # (B, H, Np, 1), (B, H, 1, 1)
        e_k = (proj_k - (diag_k + (c_k + math.log(m)))).exp()  # (B, H, Np, m): e(k) / m
        e_q = (proj_q - (diag_q + c_q)).exp()  # (B, H, Np, m)
        a_win = (s_win - c_k - c_q).exp()  # (B, H, Np, w*w), zero off the grid
        a_pre = (s_pre - c_k - c_q).exp()  # (B, H, Np, P)
        a_mf = (s_mf - c_k - c_q).exp()  # (B, H, Np, 1)

        # The window is a held-out check of both tail estimators: its exact terms are known, so each
        # estimator's relative squared error on them (rho2_rf: the kernel estimates of the same terms;
        # rho2_mf: exp of the window's mean logit for every window key) weights it, inversely:
        # g = rho2_mf / (rho2_rf + rho2_mf) for the random-feature tail, 1 - g for the mean-field tail.
        p_win = window_dot(e_q, e_k, geometry, None if stats is None else stats[2][..., w2:])  # (B, H, Np, w*w): e(q_i) . e(k_j) / m, 0 off the grid
        with torch.no_grad():
            if stats is None:
                inv_a = 1.0 / a_win.clamp_min(tiny)  # (B, H, Np, w*w)
                mass = a_win.sum(dim=-1, keepdim=True).clamp_min(tiny)  # (B, H, Np, 1)
                n_win = Np - n_tail  # (H, Np, 1): patches in each window
                s_w = s_sum / n_win  # (B, H, Np, 1): mean window logit
                a_mf_win = (s_w - c_k - c_q).exp()  # (B, H, Np, 1)
                rho2_rf = ((p_win - a_win).square() * inv_a).sum(dim=-1, keepdim=True) / mass  # (B, H, Np, 1)
                rho2_mf = ((a_mf_win - a_win).square() * inv_a * valid).sum(dim=-1, keepdim=True) / mass
                g = rho2_mf / (rho2_rf + rho2_mf).clamp_min(tiny)  # (B, H, Np, 1)
                # Which estimate, per (image, head): the sampled one (a flat tail at the window's Jensen gap)
                # where the window is not local and the random features describe its shape no better than a
                # flat one; else the checked one. Locality: the window's mean logit above the tail's, in
                # standard errors of the window's logits (about 0 for a random sample of the row).
                dev = torch.where(valid, s_win, s_w) - s_w  # (B, H, Np, w*w), zero off the grid
                var_w = dev.square().sum(dim=-1, keepdim=True) / (n_win - 1.0).clamp_min(1.0)  # (B, H, Np, 1)
                z = ((s_w - s_mf) / (var_w / n_win).sqrt().clamp_min(tiny)).clamp(-Z_CLIP, Z_CLIP)  # (B, H, Np, 1)
                z_head = z.mean(dim=2, keepdim=True)  # (B, H, 1, 1)
                # Shape: squared distance of the normalised window weights from the kernel estimates' and from flat.
                share = a_win / mass  # (B, H, Np, w*w)
                shape_rf = p_win / p_win.sum(dim=-1, keepdim=True).clamp_min(tiny)  # (B, H, Np, w*w)
                err_rf = (shape_rf - share).square().sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
                err_flat = ((1.0 / n_win - share) * valid).square().sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
                log_ratio = err_rf.mean(dim=2, keepdim=True).clamp_min(tiny).log() - err_flat.mean(
                    dim=2, keepdim=True
                ).clamp_min(tiny).log()  # (B, H, 1, 1)
                pi = torch.sigmoid((LOCALITY_Z - z_head) / LOCALITY_WIDTH) * torch.sigmoid(
                    (log_ratio - math.log(SHAPE_RATIO)) / SHAPE_WIDTH
                )  # (B, H, 1, 1): weight of the sampled estimate
                # Jensen gap measured on the window: mean exact term over exp(mean logit), >= 1.
                log_gap = mass.log() - n_win.log() - (s_w - c_k - c_q)  # (B, H, Np, 1)
                # The sampled estimate has its own scale: exact terms times r, tail level <= 1 / n_tail.
                shift = (s_mf - c_k - c_q + log_gap + n_tail.clamp_min(1.0).log()).clamp_min(0.0)  # (B, H, Np, 1)
                stats = (
                    torch.cat([c_q, g, shift, log_gap - shift], dim=-1),  # (B, H, Np, 4)
                    torch.cat([pi, c_k], dim=-1),  # (B, H, 1, 2)
                    torch.cat([s_raw, p_win], dim=-1),  # (B, H, Np, 2 w*w): the window products
                )
            g, shift, gap_shift = stats[0][..., 1:2], stats[0][..., 2:3], stats[0][..., 3:4]  # (B, H, Np, 1) each
            pi = stats[1][..., 0:1]  # (B, H, 1, 1)
            r = (-shift).exp()  # (B, H, Np, 1)
        a_gap = (s_mf - c_k - c_q + gap_shift).exp()  # (B, H, Np, 1): mean field times the gap

        # Random-feature tail = global kernel sums minus the window's own kernel estimates.
        tail_v = e_q @ (e_k.transpose(-2, -1) @ vp)  # (B, H, Np, D)
        tail_1 = e_q @ e_k.sum(dim=2).unsqueeze(-1)  # (B, H, Np, 1)
        tail_den = (tail_1 - p_win.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (B, H, Np, 1)
        fw = tail_on if far_weight is None else tail_on * far_weight.float()  # (B|1, H, Np, 1)
        g_rf, g_mf, g_gap = fw * g, fw * (1.0 - g) * a_mf, fw * a_gap  # (B, H, Np, 1) each
        exact_mass = a_win.sum(dim=-1, keepdim=True) + a_pre.sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
        den_checked = exact_mass + g_rf * tail_den + g_mf * n_tail  # (B, H, Np, 1)
        den_sampled = r * exact_mass + g_gap * n_tail  # (B, H, Np, 1)
        # out = (1 - pi) num_checked / den_checked + pi num_sampled / den_sampled, as one weighted sum.
        w_checked = (1.0 - pi) / den_checked.clamp_min(tiny)  # (B, H, Np, 1)
        w_sampled = pi / den_sampled.clamp_min(tiny)  # (B, H, Np, 1)
        w_exact = w_checked + w_sampled * r  # (B, H, Np, 1)
        w_rf = w_checked * g_rf  # (B, H, Np, 1)
        # The flat tails weight every tail value by w_flat: all patches' value sum minus the window's.
        w_flat = w_checked * g_mf + w_sampled * g_gap  # (B, H, Np, 1)
        weights = w_exact * a_win - w_rf * p_win - w_flat  # (B, H, Np, w*w)
        out_patch = window_sum(weights, vp, geometry)  # (B, H, Np, D)
        out_patch = torch.addcmul(out_patch, w_rf, tail_v)
        out_patch = torch.addcmul(out_patch, w_flat, vp.sum(dim=2, keepdim=True))
        if P:
            out_patch = out_patch + (w_exact * a_pre) @ vpre
            out_patch = torch.cat([out_prefix, out_patch], dim=2)  # (B, H, N, D)
    return out_patch.to(out_dtype), stats


@register_attention("atrous_linear")
class AtrousLinearAttention(AttentionBase):
    """timm-compatible hybrid atrous-local + FAVOR+ attention (see the module docstring).

    Hyperparameters (besides timm's `Attention` arguments, see `AttentionBase`):
        dilation: dilation rate per head group (heads split as evenly as possible).
        window: odd window side; (window - 1) * max(dilation) + 1 <= min(Hp, Wp).
        features: random features m for the tail.
        fusion: 'sum' or 'gate' (learned per-token tail weight, initialised to 1).
    """

    hparams = {
        "dilation": HParam(
            int, (1, 2, 3), "dilation rates, one head group each (e.g. 1 2 3)", minimum=1, sequence=True, short="dil",
            sweep=((1, 2, 3),),
        ),
        "window": HParam(int, 3, "odd local window (window x window patches)", minimum=1, odd=True, short="w", sweep=(3,)),
        "features": HParam(int, 64, "random features m for the far tail", minimum=1, short="m", sweep=(64,)),
        "fusion": HParam(str, "sum", "combine local and global branches", choices=FUSIONS),
    }
    needs_grid = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dd = {"device": self.qkv.weight.device, "dtype": self.qkv.weight.dtype}
        self.register_buffer(
            "projection", orthogonal_random_features(self.features, self.head_dim, device=dd["device"]), persistent=True
        )  # (m, D)
        self.gate_weight: Optional[nn.Parameter] = None
        self.gate_bias: Optional[nn.Parameter] = None
        if self.fusion == "gate":
            self.gate_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, 1, **dd))  # (H, D, 1)
            self.gate_bias = nn.Parameter(torch.zeros(self.num_heads, 1, 1, **dd))  # (H, 1, 1)

    def check_geometry(self) -> None:
        hp, wp = self.grid_size
        for r in self.dilation:
            span = (self.window - 1) * r + 1
            if span > min(hp, wp):
                raise AttentionConfigError(
                    f"atrous_linear window={self.window} at dilation rate {r} spans {span} patches, more than the "
                    f"{hp}x{wp} grid allows (need (window - 1) * rate + 1 <= {min(hp, wp)})"
                )
        if self.num_heads < len(self.dilation):
            raise AttentionConfigError(
                f"atrous_linear dilation={self.dilation} needs at least {len(self.dilation)} heads (one group per rate); "
                f"num_heads={self.num_heads}"
            )

    @classmethod
    def flops(cls, N, D, H, *, num_prefix_tokens, features, window, fusion, **hparams):
        m, w2, P = features, window**2, num_prefix_tokens
        Np = N - P
        per_head = (
            2 * P * N * D * 2  # prefix queries: exact softmax over all N keys
            + 2 * Np * m * D * 2  # feature projections of patch q and k
            + 2 * Np * m * (2 * D + 1)  # phi(K)^T V; phi(q) @ that and @ phi(K)^T 1
            + 2 * Np * w2 * D * 2  # window logits; window weights @ V
            + 2 * Np * P * D * 2  # prefix-key logits; their weights @ V
            + 2 * Np * w2 * m  # phi(q_i) . phi(k_j) on the window
        )
        if fusion == "gate":
            per_head += 2 * Np * D  # gate logits q_i . a_h
        return H * per_head

    @classmethod
    def uncounted_flops(cls, N, D, H, *, num_prefix_tokens, features, window, **hparams):
        # The window products (w*w logits and feature terms per patch, the window-weighted sum of
        # values) run as shifted elementwise products, invisible to FlopCounterMode. (The mean tail and
        # window logits are sums of the window logits; the flat tails' values ride on the weighted sum.)
        m, w2, Np = features, window**2, N - num_prefix_tokens
        return H * (2 * Np * w2 * D * 2 + 2 * Np * w2 * m)

    @classmethod
    def activation_bytes(cls, N, D, H, *, dtype_bytes, fused, num_prefix_tokens, features, window, **hparams):
        # Recomputed in backward: beyond q, k, v (inputs, in their own dtype) only the fp32 per-query
        # statistics (c_q, g, shift, log_gap - shift), the window logits and kernel estimates (w*w each)
        # and per-head ones (pi, c_k) are saved.
        Np = N - num_prefix_tokens
        return int(H * ((4 + 2 * window**2) * Np + 2) * 4)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        far_weight = None
        if self.gate_weight is not None:
            qp = q[:, :, self.num_prefix_tokens :]  # (B, H, Np, D)
            far_weight = 2.0 * torch.sigmoid(qp @ self.gate_weight.to(qp.dtype) + self.gate_bias)  # (B, H, Np, 1)
        return atrous_linear_attention(
            q,
            k,
            v,
            self.projection,
            self.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            dilation=self.dilation,
            window=self.window,
            far_weight=far_weight,
        )  # (B, H, N, D)
