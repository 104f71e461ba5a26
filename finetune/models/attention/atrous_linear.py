"""Hybrid atrous-linear attention (ours): exact dilated local windows + a window-checked estimate of the tail.

Heads are split into groups, one per dilation rate r. A patch query attends *exactly* to its
``window x window`` neighbourhood sampled at stride r on the ``Hp x Wp`` grid and to the prefix
(CLS/register) keys (atrous attention: ACC-ViT, DilateFormer). Everything outside the window is
estimated in O(N m D) inside the same normalisation (Scatterbrain's sparse + low-rank split,
Chen et al. 2021): FAVOR+ kernel sums over all keys minus their window terms, a zero-variance
mean-field tail, and, where the window is a random sample of the row, a mean field calibrated by the
window's own Jensen gap. The window's exact terms score the estimators per query and switch between
the estimates per (image, head); no learned parameter, so pretrained softmax weights transfer, and a
window covering the grid is exact softmax. Prefix queries attend to all N keys exactly.

The design, its derivation, the measured fidelity in every regime (local, weak, non-local, iid),
speed, memory and what was tried and dropped are in docs/attention.md, section "atrous_linear
(hybrid)". The code below follows its stages: `_exact_logits`, `_feature_logits`, `_stabilisers`,
`_exponentials`, `_window_checks`, `_combine`.

Execution paths (same maths, tests/test_atrous_paths.py): training runs `_Recompute` (saves q, k, v
and O(N w^2) statistics, recomputes the graph in backward); inference runs `_hybrid`; under
`torch.compile` (fullgraph) `_hybrid` runs with pad-and-slice window products (`_window_dot_padded`,
`_window_sum_padded`) instead of the in-place shift kernels, so inductor can fuse them. Everything is
fp32 with autocast disabled; no host syncs (no `.item()`, no data-dependent Python branches).

Hyperparameters:
    dilation: tuple of rates >= 1, one per head group (default (1, 2, 3)).
    window: odd neighbourhood side >= 1; the module requires the span (window - 1) * r + 1 to fit in
        min(Hp, Wp) for every rate r (default 3).
    features (m): random features for the tail, >= 1 (default 64).
    fusion: 'sum' (one normalised estimate) or 'gate' (learned tail weight ``2 sigmoid(q . a + b)``
        per head, a and b zero-initialised: starts as exactly the 'sum' model).

`attn_drop` is not applied (no full attention matrix exists to drop).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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


def _window_dot_padded(x: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """`_window_dot` from out-of-place ops only (zero-pad the grid, slice each shift): the form
    torch.compile traces and fuses. x, y: (B, H, Np, C) -> (B, H, Np, w*w)."""
    (hp, wp), window, groups = geometry
    B, H, Np, C = x.shape
    xg, yg = x.reshape(B, H, hp, wp, C), y.reshape(B, H, hp, wp, C)
    parts = []
    for h0, h1, rate in groups:
        reach = (window // 2) * rate
        yp = F.pad(yg[:, h0:h1], (0, 0, reach, reach, reach, reach))  # (B, h, Hp + 2 reach, Wp + 2 reach, C)
        xh = xg[:, h0:h1]
        slots = [(xh * yp[:, :, reach + dy : reach + dy + hp, reach + dx : reach + dx + wp]).sum(dim=-1)
                 for dy, dx in _shifts(window, rate)]  # w*w x (B, h, Hp, Wp)
        parts.append(torch.stack(slots, dim=-1))  # (B, h, Hp, Wp, w*w)
    return torch.cat(parts, dim=1).reshape(B, H, Np, window * window)


def _window_sum_padded(w: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """`_window_sum` from out-of-place ops only (see `_window_dot_padded`).
    w: (B, H, Np, w*w), y: (B, H, Np, C) -> (B, H, Np, C)."""
    (hp, wp), window, groups = geometry
    B, H, Np, C = y.shape
    wg, yg = w.reshape(B, H, hp, wp, window * window), y.reshape(B, H, hp, wp, C)
    parts = []
    for h0, h1, rate in groups:
        reach = (window // 2) * rate
        yp = F.pad(yg[:, h0:h1], (0, 0, reach, reach, reach, reach))  # (B, h, Hp + 2 reach, Wp + 2 reach, C)
        wh = wg[:, h0:h1]
        acc = None
        for o, (dy, dx) in enumerate(_shifts(window, rate)):
            term = wh[..., o : o + 1] * yp[:, :, reach + dy : reach + dy + hp, reach + dx : reach + dx + wp]
            acc = term if acc is None else acc + term
        parts.append(acc)  # (B, h, Hp, Wp, C)
    return torch.cat(parts, dim=1).reshape(B, H, Np, C)


def window_dot(x: torch.Tensor, y: torch.Tensor, geometry: Geometry, known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable `_window_dot`: (B, H, Np, C) x2 -> (B, H, Np, w*w) (`known`: its value, if computed).
    Under torch.compile: `_window_dot_padded` (plain autograd, no custom Function, no in-place views)."""
    if torch.compiler.is_compiling():
        return _window_dot_padded(x, y, geometry) if known is None else known
    return _WindowDot.apply(x, y, geometry, known)


def window_sum(w: torch.Tensor, y: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Differentiable `_window_sum`: (B, H, Np, w*w), (B, H, Np, C) -> (B, H, Np, C) (compiled:
    `_window_sum_padded`)."""
    if torch.compiler.is_compiling():
        return _window_sum_padded(w, y, geometry)
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


def _build_layout(grid_size: Tuple[int, int], window: int, dilation: Tuple[int, ...], H: int, device: torch.device):
    """(geometry, valid (H, Np, w*w) bool, n_tail (H, Np, 1), tail_on (1, H, Np, 1)), made on `device`
    (no host-to-device copies)."""
    hp, wp = grid_size
    Np = hp * wp
    groups, valid, has_tail = [], [], []
    for (h0, h1), rate in zip(head_groups(H, len(dilation)), dilation):
        groups.append((h0, h1, rate))
        idx = neighbour_index(grid_size, window, rate, device=device)  # (Np, w*w)
        valid.append((idx < Np).expand(h1 - h0, Np, window * window))  # (h, Np, w*w)
        # A window reaching every patch from every patch leaves no tail: drop it exactly rather than
        # as "global sum minus window", which would leave fp32 cancellation noise.
        reach = (window // 2) * rate
        has_tail.append(torch.full((h1 - h0,), float(reach < max(hp, wp) - 1 or rate > 1), device=device))
    valid_t = torch.cat(valid, dim=0)  # (H, Np, w*w)
    n_tail = Np - valid_t.sum(dim=-1, keepdim=True).float()  # (H, Np, 1): patches outside each window
    tail_on = torch.cat(has_tail).view(1, H, 1, 1) * (n_tail > 0).float()  # (1, H, Np, 1)
    geometry: Geometry = ((hp, wp), window, tuple(groups))
    return geometry, valid_t, n_tail, tail_on


def _layout(grid_size: Tuple[int, int], window: int, dilation: Tuple[int, ...], H: int, device: torch.device):
    """`_build_layout`, cached in eager mode (under torch.compile it is traced into the graph)."""
    if torch.compiler.is_compiling():
        return _build_layout(grid_size, window, dilation, H, device)
    key = (tuple(grid_size), window, dilation, H, str(device))
    if key not in _LAYOUTS:
        # Cached tensors are reused by later calls, also under autograd: never make them inference tensors.
        with torch.inference_mode(False), torch.no_grad():
            layout = _build_layout(grid_size, window, dilation, H, device)
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return _LAYOUTS[key]


def _centred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: int):
    """Split into prefix and patches; keys centred on their patch mean (q_i . (k_j - mu) differs from
    q_i . k_j by a per-query constant, so softmax is unchanged, while FAVOR+'s variance ~exp|q' + k'|^2
    drops when keys share a component, as pretrained ViT keys do); patch queries scaled by D^-1/2.
    -> qs (B, H, Np, D), kp (B, H, Np, D), kpre (B, H, P, D), vp (B, H, Np, D), vpre (B, H, P, D)."""
    D = q.shape[-1]
    mu = k[:, :, P:].mean(dim=2, keepdim=True)  # (B, H, 1, D)
    kp, kpre = k[:, :, P:] - mu, k[:, :, :P] - mu
    vp, vpre = v[:, :, P:].contiguous(), v[:, :, :P]
    return q[:, :, P:] * D**-0.5, kp, kpre, vp, vpre


def _prefix_attention(q: torch.Tensor, kpre: torch.Tensor, kp: torch.Tensor, vpre: torch.Tensor, vp: torch.Tensor, P: int):
    """Prefix queries: exact softmax over all N (centred) keys. -> (B, H, P, D)."""
    qpre = q[:, :, :P] * q.shape[-1] ** -0.5  # (B, H, P, D)
    a_p = torch.cat([qpre @ kpre.transpose(-2, -1), qpre @ kp.transpose(-2, -1)], dim=-1).softmax(dim=-1)  # (B, H, P, N)
    return a_p[..., :P] @ vpre + a_p[..., P:] @ vp


def _exact_logits(qs, kp, kpre, geometry: Geometry, valid, n_tail, known: Optional[torch.Tensor]):
    """Exact logits of the window (s_raw: 0 off the grid; s_win: -inf there) and of the prefix keys, the
    window logits' sum and the mean-field tail logit q_i . (mean tail key): the centred patch keys sum to
    zero, so the tail's key sum is minus the window's. -> (B, H, Np, w*w) x2, (B, H, Np, P), (B, H, Np, 1) x2."""
    s_raw = window_dot(qs, kp, geometry, known)  # (B, H, Np, w*w)
    s_win = s_raw.masked_fill(~valid, float("-inf"))
    s_pre = qs @ kpre.transpose(-2, -1)  # (B, H, Np, P)
    s_sum = s_raw.sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
    return s_raw, s_win, s_pre, s_sum, -s_sum / n_tail.clamp_min(1.0)


def _feature_logits(qs: torch.Tensor, kp: torch.Tensor, projection: torch.Tensor):
    """FAVOR+ log-features without Performer's eps (softmax_feature_parts with x' = x D^-1/4 folded into
    the projection): W x' and |x'|^2 / 2 for patch queries (qs = q D^-1/2) and centred keys.
    -> proj_q (B, H, Np, m), diag_q (B, H, Np, 1), proj_k (B, H, Np, m), diag_k (B, H, Np, 1)."""
    D = qs.shape[-1]
    wt = projection.float().t()  # (D, m)
    proj_k = kp @ (wt * D**-0.25)
    diag_k = kp.square().sum(dim=-1, keepdim=True) * (0.5 * D**-0.5)
    proj_q = qs @ (wt * D**0.25)  # W q', q' = qs D^1/4
    diag_q = qs.square().sum(dim=-1, keepdim=True) * (0.5 * D**0.5)
    return proj_q, diag_q, proj_k, diag_k


@torch.no_grad()
def _stabilisers(proj_q, diag_q, proj_k, diag_k, s_win, s_mf, s_pre, P: int):
    """c_k (B, H, 1, 1): the largest key log-feature; c_q (B, H, Np, 1): per query the largest of its
    log-features and exact and mean-field logits (minus c_k), so every exponential is <= 1. Both cancel
    in num / den."""
    c_k = (proj_k - diag_k).amax(dim=(-2, -1), keepdim=True)
    c_q = torch.maximum((proj_q - diag_q).amax(dim=-1, keepdim=True), s_win.amax(dim=-1, keepdim=True) - c_k)
    c_q = torch.maximum(c_q, s_mf - c_k)
    if P:
        c_q = torch.maximum(c_q, s_pre.amax(dim=-1, keepdim=True) - c_k)
    return c_q, c_k


def _exponentials(proj_q, diag_q, proj_k, diag_k, s_win, s_pre, s_mf, c_q, c_k, m: int):
    """The stabilised terms: e(q) (B, H, Np, m), e(k) / m (B, H, Np, m), exact window terms (B, H, Np,
    w*w; 0 off the grid), prefix terms (B, H, Np, P), the mean-field term (B, H, Np, 1)."""
    e_k = (proj_k - (diag_k + (c_k + math.log(m)))).exp()
    e_q = (proj_q - (diag_q + c_q)).exp()
    return e_q, e_k, (s_win - c_k - c_q).exp(), (s_pre - c_k - c_q).exp(), (s_mf - c_k - c_q).exp()


@torch.no_grad()
def _window_checks(s_raw, s_win, s_sum, s_mf, a_win, p_win, valid, n_tail, c_q, c_k):
    """The held-fixed statistics, measured on the window (docs/attention.md, "atrous_linear (hybrid)"):
    -> stats: per query (c_q, g, shift, log_gap - shift) (B, H, Np, 4), per head (pi, c_k) (B, H, 1, 2),
    the window products (s_raw, p_win) (B, H, Np, 2 w*w).
    g: inverse-error weight of the random-feature tail against the mean field (each scored on the
    window's exact terms); pi: weight of the sampled estimate (non-local head whose window shape the
    features fit no better than flat); log_gap: the window's Jensen gap; shift: the sampled estimate's scale."""
    tiny = torch.finfo(torch.float32).tiny
    Np = s_raw.shape[2]
    inv_a = 1.0 / a_win.clamp_min(tiny)  # (B, H, Np, w*w)
    mass = a_win.sum(dim=-1, keepdim=True).clamp_min(tiny)  # (B, H, Np, 1)
    n_win = Np - n_tail  # (H, Np, 1): patches in each window
    s_w = s_sum / n_win  # (B, H, Np, 1): mean window logit
    a_mf_win = (s_w - c_k - c_q).exp()
    rho2_rf = ((p_win - a_win).square() * inv_a).sum(dim=-1, keepdim=True) / mass
    rho2_mf = ((a_mf_win - a_win).square() * inv_a * valid).sum(dim=-1, keepdim=True) / mass
    g = rho2_mf / (rho2_rf + rho2_mf).clamp_min(tiny)  # (B, H, Np, 1)
    # Locality: the window's mean logit above the tail's, in standard errors of the window's logits.
    dev = torch.where(valid, s_win, s_w) - s_w  # (B, H, Np, w*w), zero off the grid
    var_w = dev.square().sum(dim=-1, keepdim=True) / (n_win - 1.0).clamp_min(1.0)
    z = ((s_w - s_mf) / (var_w / n_win).sqrt().clamp_min(tiny)).clamp(-Z_CLIP, Z_CLIP)
    z_head = z.mean(dim=2, keepdim=True)  # (B, H, 1, 1)
    # Shape: squared distance of the normalised window weights from the kernel estimates' and from flat.
    share = a_win / mass
    shape_rf = p_win / p_win.sum(dim=-1, keepdim=True).clamp_min(tiny)
    err_rf = (shape_rf - share).square().sum(dim=-1, keepdim=True)  # (B, H, Np, 1)
    err_flat = ((1.0 / n_win - share) * valid).square().sum(dim=-1, keepdim=True)
    log_ratio = err_rf.mean(dim=2, keepdim=True).clamp_min(tiny).log() - err_flat.mean(
        dim=2, keepdim=True
    ).clamp_min(tiny).log()  # (B, H, 1, 1)
    pi = torch.sigmoid((LOCALITY_Z - z_head) / LOCALITY_WIDTH) * torch.sigmoid(
        (log_ratio - math.log(SHAPE_RATIO)) / SHAPE_WIDTH
    )  # (B, H, 1, 1)
    log_gap = mass.log() - n_win.log() - (s_w - c_k - c_q)  # (B, H, Np, 1): >= 0
    # The sampled estimate has its own scale: exact terms times r = exp(-shift), tail level <= 1 / n_tail.
    shift = (s_mf - c_k - c_q + log_gap + n_tail.clamp_min(1.0).log()).clamp_min(0.0)
    return (
        torch.cat([c_q, g, shift, log_gap - shift], dim=-1),
        torch.cat([pi, c_k], dim=-1),
        torch.cat([s_raw, p_win], dim=-1),
    )


def _combine(stats, terms, e_q, e_k, vp, vpre, s_mf, n_tail, tail_on, far_weight, geometry: Geometry, P: int):
    """out = (1 - pi) num_checked / den_checked + pi num_sampled / den_sampled, as one window sum of
    combined weights plus the random-feature and flat tails. terms: (a_win, a_pre, a_mf, p_win).
    -> (B, H, Np, D)."""
    a_win, a_pre, a_mf, p_win = terms
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        c_q, g, shift, gap_shift = stats[0].unbind(-1)  # (B, H, Np) each
        c_q, g, shift, gap_shift = (t.unsqueeze(-1) for t in (c_q, g, shift, gap_shift))  # (B, H, Np, 1)
        pi, c_k = stats[1][..., 0:1], stats[1][..., 1:2]  # (B, H, 1, 1)
        r = (-shift).exp()
    a_gap = (s_mf - c_k - c_q + gap_shift).exp()  # (B, H, Np, 1): mean field times the gap
    # Random-feature tail = global kernel sums minus the window's own kernel estimates.
    tail_v = e_q @ (e_k.transpose(-2, -1) @ vp)  # (B, H, Np, D)
    tail_1 = e_q @ e_k.sum(dim=2).unsqueeze(-1)  # (B, H, Np, 1)
    tail_den = (tail_1 - p_win.sum(dim=-1, keepdim=True)).clamp_min(0.0)
    fw = tail_on if far_weight is None else tail_on * far_weight.float()  # (B|1, H, Np, 1)
    g_rf, g_mf, g_gap = fw * g, fw * (1.0 - g) * a_mf, fw * a_gap
    exact_mass = a_win.sum(dim=-1, keepdim=True) + a_pre.sum(dim=-1, keepdim=True)
    den_checked = exact_mass + g_rf * tail_den + g_mf * n_tail
    den_sampled = r * exact_mass + g_gap * n_tail
    w_checked = (1.0 - pi) / den_checked.clamp_min(tiny)  # (B, H, Np, 1)
    w_sampled = pi / den_sampled.clamp_min(tiny)
    w_exact = w_checked + w_sampled * r
    w_rf = w_checked * g_rf
    # The flat tails weight every tail value by w_flat: all patches' value sum minus the window's.
    w_flat = w_checked * g_mf + w_sampled * g_gap
    out = window_sum(w_exact * a_win - w_rf * p_win - w_flat, vp, geometry)  # (B, H, Np, D)
    out = torch.addcmul(out, w_rf, tail_v)
    out = torch.addcmul(out, w_flat, vp.sum(dim=2, keepdim=True))
    if P:
        out = out + (w_exact * a_pre) @ vpre
    return out


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
    """The hybrid's forward graph -> (out, stats) (stats: see `_window_checks`). Given `stats` from an
    earlier call on the same inputs, the held-fixed quantities are read from it, the window checks
    skipped and the window products' forward not redone."""
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        w2 = window * window
        geometry, valid, n_tail, tail_on = _layout(grid_size, window, dilation, int(q.shape[1]), q.device)  # int under jit tracing
        qs, kp, kpre, vp, vpre = _centred(q, k, v, P)
        known = (None, None) if stats is None else (stats[2][..., :w2], stats[2][..., w2:])
        s_raw, s_win, s_pre, s_sum, s_mf = _exact_logits(qs, kp, kpre, geometry, valid, n_tail, known[0])
        proj_q, diag_q, proj_k, diag_k = _feature_logits(qs, kp, projection)
        if stats is None:
            c_q, c_k = _stabilisers(proj_q, diag_q, proj_k, diag_k, s_win, s_mf, s_pre, P)
        else:
            c_q, c_k = stats[0][..., 0:1], stats[1][..., 1:2]  # (B, H, Np, 1), (B, H, 1, 1)
        m = projection.shape[0]
        e_q, e_k, a_win, a_pre, a_mf = _exponentials(proj_q, diag_q, proj_k, diag_k, s_win, s_pre, s_mf, c_q, c_k, m)
        p_win = window_dot(e_q, e_k, geometry, known[1])  # (B, H, Np, w*w): e(q_i) . e(k_j) / m, 0 off the grid
        if stats is None:
            stats = _window_checks(s_raw, s_win, s_sum, s_mf, a_win, p_win, valid, n_tail, c_q, c_k)
        out = _combine(stats, (a_win, a_pre, a_mf, p_win), e_q, e_k, vp, vpre, s_mf, n_tail, tail_on, far_weight, geometry, P)
        if P:
            out = torch.cat([_prefix_attention(q, kpre, kp, vpre, vp, P), out], dim=2)  # (B, H, N, D)
    return out.to(out_dtype), stats


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
