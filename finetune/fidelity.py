"""Attention fidelity: how far each variant's output is from exact softmax on a model's own q, k, v.

`capture_qkv` runs a ViT on a few batches and keeps every block's q, k, v (forward pre-hooks on the
`AttentionBase` modules, recomputing timm's ``qkv``, ``q_norm``, ``k_norm``). `fidelity_rows` then
runs each variant configuration's `attend` on those same q, k, v and reports, per block:
- ``rel_err``: ``||out - softmax|| / ||softmax||`` over all captured images, heads and tokens;
- ``coverage``: the softmax mass the variant computes exactly (atrous_linear: its dilated windows
  plus the prefix keys, averaged over patch queries; softmax: 1; the others compute no softmax term
  exactly: None, shown as n/a);
- ``logit_std``: the spread of the exact logits ``q . k / sqrt(D)`` (one value per block).
A configuration equal to the model's own attention uses the model's own module (its trained
parameters); any other is built fresh for the block's geometry (random features and Linformer's
projections drawn from ``seed``), as at the swap of pretrained weights.

Every variant is linear in v, so its implied attention matrix is ``attend(q, k, I_N)``:
`implied_attention` computes it, and `attention_map_figure` draws rows of it beside softmax's.

The synthetic generator `local_qkv` (q, k smooth over the patch grid plus noise, scaled by a
temperature) and `locality_sweep` measure the hybrid against its two halves (exact local windows
alone; Performer alone at the same m) across locality; ``python -m finetune.fidelity`` prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .models.attention import AttentionBase, attention_layer, get_attention_class, variant_label
from .models.attention.atrous_linear import atrous_linear_attention, head_groups, neighbour_index
from .models.attention.performer import orthogonal_random_features, performer_attention
from .models.attention.softmax import softmax_attention


@dataclass(frozen=True)
class VariantConfig:
    """One variant configuration: a name (or import path) and its hyperparameters (unset: default)."""

    variant: str
    attn: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, variant: str, attn: Optional[Mapping[str, Any]] = None) -> "VariantConfig":
        resolved = get_attention_class(variant).resolve_hparams(dict(attn or {}))  # defaults filled in
        return cls(variant, tuple(sorted(resolved.items())))

    @property
    def hparams(self) -> Dict[str, Any]:
        return dict(self.attn)

    @property
    def label(self) -> str:
        return variant_label(self.variant, self.hparams)


# ----------------------------------------------------------------------------- geometry helpers
def exact_key_mask(num_heads: int, grid: Tuple[int, int], num_prefix: int, dilation: Sequence[int],
                   window: int) -> torch.Tensor:
    """(H, N, N) bool: the keys atrous_linear computes exactly for each query (its dilated window and
    the prefix keys; prefix queries: every key)."""
    np_ = grid[0] * grid[1]
    n = num_prefix + np_
    mask = torch.zeros(num_heads, n, n, dtype=torch.bool)
    mask[:, :num_prefix, :] = True
    mask[:, :, :num_prefix] = True
    for (h0, h1), rate in zip(head_groups(num_heads, len(dilation)), dilation):
        idx = neighbour_index(grid, window, rate)  # (Np, w*w)
        rows = torch.arange(np_)[:, None].expand_as(idx)  # (Np, w*w)
        ok = idx < np_
        mask[h0:h1, num_prefix + rows[ok], num_prefix + idx[ok]] = True
    return mask


def logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q . k / sqrt(D) in fp32. [B, H, N, D] -> [B, H, N, N]."""
    return (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5


def masked_mass(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, num_prefix: int) -> float:
    """Softmax mass inside `mask` ([H, N, N]), averaged over the patch queries."""
    attn = logits(q, k).softmax(dim=-1)  # (B, H, N, N)
    return float((attn * mask).sum(dim=-1)[:, :, num_prefix:].mean())


def local_only_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax restricted to `mask`'s keys (the exact windows alone). -> [B, H, N, D]."""
    return logits(q, k).masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v.float()


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact.float()).norm() / exact.float().norm())


# ----------------------------------------------------------------------------- synthetic local attention
def local_qkv(seed: int, temperature: float, *, grid: Tuple[int, int] = (14, 14), heads: int = 6,
              head_dim: int = 64, correlation: int = 4, noise: float = 0.1) -> List[torch.Tensor]:
    """q, k, v [1, H, 1 + Hp*Wp, D]: a smooth random field on the patch grid (bicubic from a
    `correlation` x `correlation` grid, each token scaled to norm sqrt(D)), q and k the field plus
    `noise` times N(0, 1), times `temperature`; v another field plus noise; a random CLS token first.
    Higher temperatures put more of each row's softmax mass on nearby patches."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = grid

    def smooth() -> torch.Tensor:
        low = torch.randn(heads, head_dim, correlation, correlation, generator=g)
        f = F.interpolate(low, size=grid, mode="bicubic", align_corners=False)  # (H, D, Hp, Wp)
        f = f.reshape(1, heads, head_dim, hp * wp).transpose(-1, -2)  # (1, H, Np, D)
        return f / f.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)

    f = smooth()
    q = temperature * (f + noise * torch.randn(f.shape, generator=g))
    k = temperature * (f + noise * torch.randn(f.shape, generator=g))
    v = smooth() + 0.5 * torch.randn(f.shape, generator=g)
    cls = [torch.randn(1, heads, 1, head_dim, generator=g) for _ in range(3)]
    return [torch.cat([c, x], dim=2) for c, x in zip(cls, (q, k, v))]


def locality_sweep(temperatures: Sequence[float] = (0.8, 1.0, 1.2, 1.6, 2.0, 3.0, 5.0), seeds: Sequence[int] = (0, 1, 2),
                   features: int = 64, dilation: Sequence[int] = (1,), window: int = 3,
                   grid: Tuple[int, int] = (14, 14), heads: int = 6, head_dim: int = 64) -> List[Dict[str, float]]:
    """Per temperature, means over seeds: window mass, and the relative errors of local-only,
    Performer (m = `features`) and atrous_linear (same projection) against exact softmax."""
    mask = exact_key_mask(heads, grid, 1, dilation, window)
    rows = []
    for t in temperatures:
        acc = {"temperature": t, "window_mass": 0.0, "local_only": 0.0, "performer": 0.0, "atrous_linear": 0.0}
        for s in seeds:
            q, k, v = local_qkv(s, t, grid=grid, heads=heads, head_dim=head_dim)
            exact = softmax_attention(q, k, v, fused=False)
            W = orthogonal_random_features(features, head_dim, torch.Generator().manual_seed(100 + s))
            acc["window_mass"] += masked_mass(q, k, mask, 1) / len(seeds)
            acc["local_only"] += rel_err(local_only_attention(q, k, v, mask), exact) / len(seeds)
            acc["performer"] += rel_err(performer_attention(q, k, v, W), exact) / len(seeds)
            hybrid = atrous_linear_attention(q, k, v, W, grid, 1, tuple(dilation), window)
            acc["atrous_linear"] += rel_err(hybrid, exact) / len(seeds)
        rows.append(acc)
    return rows


# ----------------------------------------------------------------------------- a model's own q, k, v
def attention_modules(model: torch.nn.Module) -> List[AttentionBase]:
    return [m for m in model.modules() if isinstance(m, AttentionBase)]


@torch.no_grad()
def capture_qkv(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> List[Tuple[torch.Tensor, ...]]:
    """Per attention block, (q, k, v) [B_total, H, N, D] in fp32 on the CPU, over all `batches`."""
    modules = attention_modules(model)
    store: List[List[Tuple[torch.Tensor, ...]]] = [[] for _ in modules]

    def hook(index: int):
        def pre(module: AttentionBase, args) -> None:
            x = args[0]  # (B, N, C)
            B, N, _ = x.shape
            qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
            q, k, v = qkv.unbind(0)
            store[index].append((module.q_norm(q).float().cpu(), module.k_norm(k).float().cpu(), v.float().cpu()))
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        model.eval()
        for images in batches:
            model(images)
    finally:
        for h in handles:
            h.remove()
    return [tuple(torch.cat([part[j] for part in parts]) for j in range(3)) for parts in store]


def variant_module(config: VariantConfig, block: AttentionBase, seed: int) -> AttentionBase:
    """`config`'s attention for `block`'s geometry: the block itself when it is that configuration,
    else a fresh module (randomness from `seed`), in eval mode on the CPU."""
    cls = get_attention_class(config.variant)
    if type(block).variant_id() == cls.variant_id() and block.hparam_values() == cls.resolve_hparams(config.hparams):
        return block
    layer = attention_layer(config.variant, grid_size=block.grid_size, num_prefix_tokens=block.num_prefix_tokens,
                            **config.hparams)
    torch.manual_seed(seed)
    module = layer(block.qkv.in_features, num_heads=block.num_heads, attn_head_dim=block.head_dim,
                   qkv_bias=block.qkv.bias is not None)
    return module.eval()


def coverage(config: VariantConfig, module: AttentionBase, q: torch.Tensor, k: torch.Tensor) -> Optional[float]:
    """The softmax mass `config` computes exactly (see the module docstring); None where it computes none."""
    if config.variant == "softmax":
        return 1.0
    if config.variant == "atrous_linear" and module.grid_size is not None:
        mask = exact_key_mask(module.num_heads, module.grid_size, module.num_prefix_tokens, module.dilation, module.window)
        return masked_mass(q, k, mask, module.num_prefix_tokens)
    return None


@torch.no_grad()
def fidelity_rows(model: torch.nn.Module, captured: Sequence[Tuple[torch.Tensor, ...]],
                  configs: Sequence[VariantConfig], seed: int = 0) -> List[Dict[str, Any]]:
    """One row per (block, configuration): block, variant, label, rel_err, coverage, logit_std."""
    rows = []
    for b, (block, (q, k, v)) in enumerate(zip(attention_modules(model), captured)):
        block = block.cpu()
        exact = softmax_attention(q, k, v, fused=False)  # (B, H, N, D)
        spread = float(logits(q, k).std())
        for config in configs:
            module = variant_module(config, block, seed + b)
            out = module.attend(q, k, v)  # (B, H, N, D)
            rows.append({"block": b, "variant": config.variant, "label": config.label, "rel_err": rel_err(out, exact),
                         "coverage": coverage(config, module, q, k), "logit_std": spread})
    return rows


@torch.no_grad()
def implied_attention(module: AttentionBase, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention matrix a variant applies: attend(q, k, I_N) (every variant is linear in v).
    q, k: [B, H, N, D] -> [B, H, N, N]."""
    B, H, N, _ = q.shape
    eye = torch.eye(N, dtype=q.dtype).expand(B, H, N, N).contiguous()  # (B, H, N, N): v = I
    return module.attend(q, k, eye)


def map_queries(grid: Tuple[int, int], num_prefix: int) -> List[Tuple[str, int]]:
    """(name, token index) of the query rows drawn: CLS (if any), the centre patch, a corner-side patch."""
    hp, wp = grid
    rows = [("CLS", 0)] if num_prefix else []
    rows.append(("centre patch", num_prefix + (hp // 2) * wp + wp // 2))
    rows.append(("edge patch", num_prefix + (hp // 4) * wp + wp // 4))
    return rows


def attention_map_figure(label: str, maps: Sequence[Tuple[int, torch.Tensor, torch.Tensor]],
                         grid: Tuple[int, int], num_prefix: int):
    """Figure: per (block, query row), softmax's attention over the patch grid beside the variant's
    implied one (head mean, first image). `maps`: (block, softmax [H, N, N], variant [H, N, N])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = map_queries(grid, num_prefix)
    n_rows = len(maps) * len(queries)
    fig, axes = plt.subplots(n_rows, 2, figsize=(5.2, 2.4 * n_rows), squeeze=False)
    r = 0
    for block, exact, approx in maps:
        for name, token in queries:
            for c, (title, a) in enumerate((("softmax", exact), (label, approx))):
                row = a.mean(dim=0)[token]  # (N,): head mean
                ax = axes[r][c]
                im = ax.imshow(row[num_prefix:].reshape(grid).numpy(), cmap="viridis")
                cls = f", CLS {float(row[:num_prefix].sum()):.2f}" if num_prefix else ""
                ax.set_title(f"block {block}, {name}\n{title}{cls}", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            r += 1
    fig.tight_layout()
    return fig


def markdown_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """The fidelity table, one line per (configuration, block), then a mean over blocks per configuration."""
    lines = ["| variant | block | rel. error vs softmax | softmax mass computed exactly | logit std |", "|---|---|---|---|---|"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        for r in mine:
            lines.append(f"| {label} | {r['block']} | {fmt(r['rel_err'])} | {fmt(r['coverage'])} | {r['logit_std']:.2f} |")
        covs = [r["coverage"] for r in mine if r["coverage"] is not None]
        mean_cov = sum(covs) / len(covs) if covs else None
        mean_err = sum(r["rel_err"] for r in mine) / len(mine)
        mean_std = sum(r["logit_std"] for r in mine) / len(mine)
        lines.append(f"| **{label}** | mean | **{fmt(mean_err)}** | {fmt(mean_cov)} | {mean_std:.2f} |")
    return "\n".join(lines)


def _main() -> None:
    rows = locality_sweep()
    print("| temperature | window mass | local-only | performer | atrous_linear |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['temperature']:g} | {r['window_mass']:.3f} | {r['local_only']:.3f} | {r['performer']:.3f} | "
              f"{r['atrous_linear']:.3f} |")


if __name__ == "__main__":
    _main()
