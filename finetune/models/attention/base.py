"""The shared shell of every attention variant.

`AttentionBase` owns exactly the submodules of `timm.layers.Attention` (``qkv``, ``q_norm``,
``k_norm``, ``attn_drop``, ``norm``, ``proj``, ``proj_drop``) with the same names and shapes, so a
pretrained softmax ViT's weights load by key. A variant only overrides `attend(q, k, v)`, which maps
``q, k, v: [B, H, N, D]`` to ``[B, H, N, D]`` by calling the variant's pure function.

A variant is one class that declares everything about itself:
- ``hparams``: its constructor hyperparameters as `HParam`s (type, default, range, help, label, sweep
  values). `AttentionBase.__init__` validates them and sets each as an attribute (``self.rank``).
- `check_geometry`: checks against the patch grid and heads, run before any parameter is allocated.
- `flops`, `uncounted_flops`, `activation_bytes`: its analytic cost (optional; None = not declared).

Geometry: the first ``num_prefix_tokens`` tokens are CLS/register tokens; the rest form the patch grid
``grid_size = (Hp, Wp)``. `build_vit` passes both at construction, so variants that need the grid can
validate their hyperparameters against it (rank vs. token count, dilation vs. grid).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import nn

from ...errors import AttentionConfigError
from .hparams import HParam

# AttentionBase's own constructor keywords and instance attributes: no variant may declare a
# hyperparameter with these names (hyperparameters become attributes of the module).
RESERVED = (
    "dim", "num_heads", "attn_head_dim", "dim_out", "qkv_bias", "qk_norm", "scale_norm", "proj_bias", "attn_drop",
    "proj_drop", "norm_layer", "grid_size", "num_prefix_tokens", "device", "dtype",
    "head_dim", "attn_dim", "scale", "qkv", "q_norm", "k_norm", "norm", "proj", "fused_attn",
)


def fp32_core_bytes(elems: int, N: int, D: int, H: int, dtype_bytes: int) -> int:
    """Activation bytes of a core computed in fp32 whatever the input dtype: `elems` fp32 values per
    head, plus the fp32 copies of q, k, v it keeps when the inputs are narrower."""
    upcast = 3 * N * D if dtype_bytes < 4 else 0
    return int(H * (elems + upcast) * 4)


class _SplitHeads(torch.autograd.Function):
    """[B, N, 3 H D] (the fused qkv projection) -> contiguous q, k, v: [B, H, N, D] each.

    Autograd's own path (view, permute, ``contiguous``, ``unbind``) copies the gradient twice on the
    way back (``stack`` of the three, then a permuting ``reshape``); this writes the three gradients
    straight into one [B, N, 3 H D] buffer."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, heads: int, head_dim: int):
        B, N, _ = y.shape
        ctx.shape = (B, N, 3, heads, head_dim)
        parts = y.reshape(ctx.shape).unbind(2)  # 3 x (B, N, H, D), strided views
        return tuple(t.transpose(1, 2).contiguous() for t in parts)  # 3 x (B, H, N, D), contiguous

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        given = next(g for g in grads if g is not None)
        out = given.new_empty(ctx.shape)  # (B, N, 3, H, D)
        for i, g in enumerate(grads):
            if g is None:
                out[:, :, i].zero_()
            else:
                out[:, :, i].copy_(g.transpose(1, 2))  # (B, N, H, D)
        return out.view(ctx.shape[0], ctx.shape[1], -1), None, None


def split_heads(y: torch.Tensor, heads: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused qkv projection [B, N, 3 H D] as contiguous q, k, v: [B, H, N, D] each (one copy each
    way)."""
    return _SplitHeads.apply(y, heads, head_dim)


class AttentionBase(nn.Module, metaclass=abc.ABCMeta):
    """Multi-head self-attention with timm's `Attention` parameters and a pluggable `attend`.

    Args:
        dim: token embedding width C.
        num_heads: number of heads H; head width D = C // H unless `attn_head_dim` is given.
        attn_head_dim: explicit head width D.
        dim_out: output width (default C).
        qkv_bias: bias in the fused qkv projection.
        qk_norm: normalise q and k per head with `norm_layer`.
        scale_norm: normalise the attention output before `proj`.
        proj_bias: bias in the output projection.
        attn_drop: dropout on attention weights (variants apply it where weights exist).
        proj_drop: dropout after `proj`.
        norm_layer: constructor for qk/scale norms.
        grid_size: (Hp, Wp) patch grid; required by variants with `needs_grid`.
        num_prefix_tokens: CLS + register tokens in front of the patch tokens.
        **hparams: the variant's own hyperparameters (keys of `hparams`); unset ones take their default.
    """

    # The variant's own constructor hyperparameters: {name: HParam}, in label order.
    hparams: ClassVar[Mapping[str, HParam]] = {}
    # Variants that read the patch geometry refuse to build without `grid_size`.
    needs_grid: ClassVar[bool] = False
    # The registered name (set by `register_attention`); unregistered plug-ins are named by import path.
    variant_name: ClassVar[str] = ""
    # True: `attend` gets contiguous q, k, v (`split_heads`: one copy forward, one backward) instead of
    # timm's strided views of the qkv projection, which the core's matmuls and elementwise ops would
    # otherwise copy (several times, forward and backward) or walk with a stride.
    contiguous_qkv: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        *,
        grid_size: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: int = 1,
        device=None,
        dtype=None,
        **hparams: Any,
    ) -> None:
        super().__init__()
        values = self.resolve_hparams(hparams)
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise AttentionConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise AttentionConfigError("norm_layer must be given when qk_norm or scale_norm is set")
        if self.needs_grid and grid_size is None:
            raise AttentionConfigError(
                f"{type(self).__name__} needs the patch grid: build it through finetune.models.build_vit "
                "or pass grid_size=(Hp, Wp)"
            )
        if num_prefix_tokens < 0:
            raise AttentionConfigError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.num_prefix_tokens = num_prefix_tokens
        for name, value in values.items():
            setattr(self, name, value)
        self.check_geometry()

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    # ---------------------------------------------------------------- declaration
    @classmethod
    def variant_id(cls) -> str:
        """The registered name, or ``module:Class`` for an unregistered plug-in."""
        return cls.__dict__.get("variant_name") or f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def check_hparams(cls, values: Mapping[str, Any]) -> Dict[str, Any]:
        """The given hyperparameters, each coerced by its `HParam`; unknown keys are refused.

        Only the given keys are returned (defaults stay with the class)."""
        variant = cls.variant_id()
        unknown = [k for k in values if k not in cls.hparams]
        if unknown:
            allowed = ", ".join(cls.hparams) or "none"
            raise AttentionConfigError(
                f"unknown hyperparameter(s) {unknown} for attention variant {variant!r}; allowed: {allowed}"
            )
        return {k: cls.hparams[k].coerce(variant, k, v) for k, v in values.items()}

    @classmethod
    def resolve_hparams(cls, values: Mapping[str, Any]) -> Dict[str, Any]:
        """Every declared hyperparameter: the given ones checked, the rest at their defaults."""
        given = cls.check_hparams(values)
        return {k: given[k] if k in given else hp.default for k, hp in cls.hparams.items()}

    def hparam_values(self) -> Dict[str, Any]:
        """This module's hyperparameters as it was built with them."""
        return {k: getattr(self, k) for k in self.hparams}

    def check_geometry(self) -> None:
        """Refuse hyperparameters that do not fit the geometry (``self.grid_size``, ``self.num_tokens``,
        ``self.num_heads``, ``self.head_dim`` and the hyperparameter attributes are set). Runs before
        any parameter is allocated; raise AttentionConfigError naming the value and what is allowed."""

    # ---------------------------------------------------------------- analytic cost (optional)
    @classmethod
    def flops(cls, N: int, D: int, H: int, *, num_prefix_tokens: int, **hparams: Any) -> Optional[int]:
        """Forward FLOPs (2 per multiply-add) of `attend` for one image, all heads; None: not declared.
        `hparams` holds every declared hyperparameter (defaults filled in)."""
        return None

    @classmethod
    def uncounted_flops(cls, N: int, D: int, H: int, *, num_prefix_tokens: int, **hparams: Any) -> int:
        """The part of `flops` torch's FlopCounterMode cannot see (multiply-adds done elementwise)."""
        return 0

    @classmethod
    def activation_bytes(
        cls, N: int, D: int, H: int, *, dtype_bytes: int, fused: bool, num_prefix_tokens: int, **hparams: Any
    ) -> Optional[int]:
        """Bytes autograd saves inside `attend` for one image (q, k, v excluded); None: not declared."""
        return None

    @property
    def num_tokens(self) -> Optional[int]:
        """N = prefix tokens + Hp * Wp, when the grid is known."""
        if self.grid_size is None:
            return None
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, N, D] -> [B, H, N, D]. Every variant implements it with its pure function."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} does not support attn_mask / is_causal (ViT encoders use none)")
        B, N, C = x.shape
        if self.contiguous_qkv and torch.is_grad_enabled():
            q, k, v = split_heads(self.qkv(x), self.num_heads, self.head_dim)  # each (B, H, N, D), contiguous
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
            if self.contiguous_qkv:  # no autograd (eval, the jit-traced cost counter): plain tensor ops
                qkv = qkv.contiguous()
            q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v)  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, H*D)
        x = self.norm(x)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        parts = [f"heads={self.num_heads}", f"head_dim={self.head_dim}"]
        if self.grid_size is not None:
            parts.append(f"grid={self.grid_size[0]}x{self.grid_size[1]}+{self.num_prefix_tokens}")
        parts += [f"{name}={value!r}" for name, value in self.hparam_values().items()]
        return ", ".join(parts)
