"""Every built-in variant compiles as one graph (`torch.compile(fullgraph=True)`: no graph break, no
host sync inside the model) and matches eager in the forward, the parameter gradients and the input
gradient.

Inductor's C++ codegen takes minutes on 2 CPU cores, so the suite compiles with the `aot_eager`
backend: the same dynamo capture (where a graph break fails `fullgraph=True`) and joint
forward/backward tracing, run by eager kernels. Shapes are tiny (65 tokens, one block) to keep each
compile to a few seconds. Inductor itself runs in `vitsweep bench gpu` (BENCHMARKS.md).
"""

import pytest
import torch

from finetune.models import build_vit

VARIANTS = {
    "softmax": {},
    "linformer": {"rank": 16},
    "performer": {"features": 16},
    "nystrom": {"landmarks": 8},
    "atrous_linear": {"dilation": (1, 2, 3), "window": 3, "features": 16},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_compiles_fullgraph_with_same_outputs_and_grads(variant):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=4, depth=1, variant=variant,
                      attn_hparams=VARIANTS[variant]).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    eager = model(x)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    x_grad, x.grad = x.grad.clone(), None
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_grad, rtol=1e-3, atol=1e-6)
    assert grads and set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)
