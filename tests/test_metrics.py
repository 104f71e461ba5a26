import pytest
import torch

from finetune.metrics import MemoryTracker, MetricError, count_flops, count_macs_fvcore, cost_metrics, topk_accuracy
from finetune.models import build_vit, readable_attention


def test_topk_accuracy_known_values():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 2, 1, 1])
    acc = topk_accuracy(logits, target, (1, 2, 3))
    assert acc == {1: 0.25, 2: 0.75, 3: 1.0}


def test_topk_larger_than_classes_is_an_error():
    with pytest.raises(MetricError, match=r"k=5 is larger than the 3 classes; allowed: 1..3"):
        topk_accuracy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), (1, 5))


def analytic_vit_macs(depth=12, dim=192, tokens=197, patches=196, patch=16, classes=1000, mlp_ratio=4):
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * mlp_ratio * dim
    return depth * block + patches * 3 * patch * patch * dim + dim * classes


def test_vit_ti_flops_agree_with_analytic_count():
    model = build_vit("vit_tiny_patch16_224", 1000)
    analytic = analytic_vit_macs()
    assert abs(analytic / 1e9 - 1.254) < 1e-3  # the reference figure
    flops = count_flops(model, (224, 224))
    assert flops / 2 == pytest.approx(analytic, rel=0.01)
    macs = count_macs_fvcore(model, (224, 224))
    assert macs == pytest.approx(analytic, rel=0.01)
    assert model.blocks[0].attn.fused_attn  # counting restored the fast path


def test_cost_metrics_names():
    model = build_vit("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=2)
    m = cost_metrics(model, (32, 32))
    assert m["cost/params"] == sum(p.numel() for p in model.parameters())
    assert m["cost/gflops"] > 0 and m["cost/gmacs"] == pytest.approx(m["cost/gflops"] / 2, rel=0.02)


def test_memory_on_cpu_is_not_available_never_zero():
    with MemoryTracker(torch.device("cpu")) as mem:
        torch.randn(100, 100) @ torch.randn(100, 100)
    assert set(mem.metrics().values()) == {None}


def test_atrous_window_products_are_added_to_the_counted_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.metrics import uncounted_attention_flops
    from finetune.models.attention.cost import uncounted_flops

    model = build_vit("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=2, variant="atrous_linear",
                      attn_hparams={"dilation": (1, 2, 3), "window": 3, "features": 16}).eval()
    extra = uncounted_attention_flops(model)
    assert extra == 2 * uncounted_flops("atrous_linear", 65, 64, 3, num_prefix_tokens=1, window=3, features=16) > 0
    with readable_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert count_flops(model, (32, 32)) == counter.get_total_flops() + extra
