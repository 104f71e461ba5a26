"""`vitsweep bench kernels`: each built-in variant's autocast error and `torch.compile(fullgraph=True)`
result on this machine (the tables in BENCHMARKS.md; `tests/test_precision.py` and
`tests/test_compile.py` assert the same figures).

Precision: one attention layer (dim 64, 4 heads, an 8 x 8 grid + CLS: N = 65) runs in fp32 and under
CPU autocast (bf16, fp16); the table gives the relative L2 error of the output and of the input
gradient against the layer's own fp32 result, the ratio to softmax's error under the same autocast,
and whether output and gradient stay finite with the q and k projections scaled by 300 (logit std ~3e4).

Compile: a one-block ViT (32 px, patch 4: 65 tokens) through `torch.compile(fullgraph=True)` with the
`aot_eager` backend (dynamo capture and AOT autograd, eager kernels: inductor's C++ build takes minutes
on a small CPU); forward and backward compared with eager.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional

import torch

VARIANTS = {
    "softmax": {},
    "linformer": {"rank": 16},
    "performer": {"features": 64},
    "nystrom": {"landmarks": 8},
    "atrous_linear": {"dilation": (1, 2, 3), "window": 3, "features": 16},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HOT_SCALE = 300.0  # q and k projection weights times this: logit std ~3e4 on N(0, 1) tokens


def attention_layer(variant: str, qk_scale: float = 1.0) -> torch.nn.Module:
    """One attention layer: dim 64, 4 heads, a 8 x 8 grid + CLS (N = 65), q and k rows scaled."""
    from finetune.models.attention.registry import get_attention_class

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
    layer = attention_layer(variant, qk_scale)
    gen = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(2, 65, 64, generator=gen), torch.randn(2, 65, 64, generator=gen)
    out32, grad32 = _run(layer, x, grad_out, None)
    out, grad = _run(layer, x, grad_out, dtype)
    finite = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
    return float((out - out32).norm() / out32.norm()), float((grad - grad32).norm() / grad32.norm()), finite


def compile_check(variant: str) -> Dict[str, Any]:
    """fullgraph compile of a one-block ViT: ok or the error's first line, compile seconds, and the
    largest absolute differences to eager (output, input gradient, parameter gradients)."""
    from finetune.models import build_vit

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=4, depth=1, variant=variant,
                      attn_hparams=VARIANTS[variant]).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    eager = model(x)
    eager.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    x_grad, x.grad = x.grad.clone(), None
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    try:
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        out.square().mean().backward()
    except Exception as err:  # the table records the failure
        return {"variant": variant, "fullgraph": False, "error": str(err).strip().splitlines()[0][:160]}
    return {
        "variant": variant, "fullgraph": True, "compile_s": time.perf_counter() - start,
        "max_abs_diff_out": float((out - eager).detach().abs().max()), "max_abs_diff_x_grad": float((x.grad - x_grad).abs().max()),
        "max_abs_diff_param_grad": max(float((p.grad - ref[n]).abs().max()) for n, p in model.named_parameters() if n in ref),
    }


def precision_rows() -> List[Dict[str, Any]]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        ref_out, ref_grad, _ = autocast_errors("softmax", dtype)
        for variant in VARIANTS:
            out, grad, finite = autocast_errors(variant, dtype)
            *_, hot_finite = autocast_errors(variant, dtype, HOT_SCALE)
            rows.append({"variant": variant, "dtype": dtype_name, "out_err": out, "grad_err": grad,
                         "out_x_softmax": out / ref_out, "grad_x_softmax": grad / ref_grad, "finite": finite,
                         "hot_finite": hot_finite})
    return rows


def markdown(precision: List[Dict[str, Any]], compiled: List[Dict[str, Any]]) -> str:
    lines = ["| variant | autocast | output rel. error | x softmax's | input-grad rel. error | x softmax's | finite at logit std ~3e4 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['dtype']} | {r['out_err']:.2e} | {r['out_x_softmax']:.2f} | {r['grad_err']:.2e} | "
              f"{r['grad_x_softmax']:.2f} | {'yes' if r['hot_finite'] else 'NO'} |" for r in precision]
    lines += ["", "| variant | fullgraph compile | compile s (aot_eager) | max abs diff: output | input grad | param grads |",
              "|---|---|---|---|---|---|"]
    for r in compiled:
        if not r["fullgraph"]:
            lines.append(f"| {r['variant']} | fails: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['variant']} | yes | {r['compile_s']:.1f} | {r['max_abs_diff_out']:.1e} | "
                         f"{r['max_abs_diff_x_grad']:.1e} | {r['max_abs_diff_param_grad']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="vitsweep bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the figures as JSON to this file")
    p.add_argument("--skip-compile", action="store_true", help="precision table only")
    args = p.parse_args(argv)
    precision = precision_rows()
    compiled = [] if args.skip_compile else [compile_check(v) for v in VARIANTS]
    print(markdown(precision, compiled))
    if args.out:
        from finetune.io_utils import write_json

        write_json(args.out, {"benchmark": "kernels", "torch": torch.__version__, "precision": precision, "compile": compiled})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
