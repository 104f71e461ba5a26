"""Every built-in variant under CPU bf16 and fp16 autocast: output and input gradient close to its own
fp32 result (within a small multiple of softmax's error under the same autocast), and finite at a hot
logit scale (logit std ~3e4, where fp16 products overflow unless a variant keeps an fp32 island).

The measured errors are recorded in BENCHMARKS.md ("GPU-true kernels: compile and precision").
"""

import pytest
import torch

from finetune.models.attention.registry import get_attention_class

VARIANTS = {
    "softmax": {},
    "linformer": {"rank": 16},
    "performer": {"features": 64},
    "nystrom": {"landmarks": 8},
    "atrous_linear": {"dilation": (1, 2, 3), "window": 3, "features": 16},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A variant's autocast error may be this many times softmax's own (measured: at most 1.4x).
ERROR_FACTOR = 3.0
HOT_SCALE = 300.0  # q and k projection weights times this: logit std ~3e4 on N(0, 1) tokens


def _layer(variant: str, qk_scale: float = 1.0) -> torch.nn.Module:
    """One attention layer: dim 64, 4 heads, a 8 x 8 grid + CLS (N = 65)."""
    torch.manual_seed(0)
    cls = get_attention_class(variant)
    layer = cls(64, num_heads=4, qkv_bias=True, grid_size=(8, 8), num_prefix_tokens=1, **VARIANTS[variant])
    with torch.no_grad():
        layer.qkv.weight[:128] *= qk_scale  # rows of q and k
    return layer


def _run(layer, x, grad_out, dtype):
    """(output, d loss / d input) in fp32, under CPU autocast to `dtype` (None: plain fp32)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = layer(x)  # (B, N, C)
    (out.float() * grad_out).sum().backward()
    return out.detach().float(), x.grad


def autocast_errors(variant: str, dtype: torch.dtype, qk_scale: float = 1.0):
    """Relative L2 errors (output, input gradient) of `variant` under autocast against its fp32 result,
    and whether both are finite."""
    layer = _layer(variant, qk_scale)
    gen = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(2, 65, 64, generator=gen), torch.randn(2, 65, 64, generator=gen)
    out32, grad32 = _run(layer, x, grad_out, None)
    out, grad = _run(layer, x, grad_out, dtype)
    finite = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(out, out32), rel(grad, grad32), finite


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_autocast_error_is_within_a_small_multiple_of_softmax(variant, dtype):
    ref_out, ref_grad, _ = autocast_errors("softmax", DTYPES[dtype])
    out_err, grad_err, finite = autocast_errors(variant, DTYPES[dtype])
    assert finite
    assert out_err <= ERROR_FACTOR * ref_out, (out_err, ref_out)
    assert grad_err <= ERROR_FACTOR * ref_grad, (grad_err, ref_grad)
    assert out_err > 0  # autocast really ran in the narrow dtype (a test that cannot fail is none)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_and_gradient_stay_finite_at_a_hot_logit_scale(variant, dtype):
    *_, finite = autocast_errors(variant, DTYPES[dtype], qk_scale=HOT_SCALE)
    assert finite
