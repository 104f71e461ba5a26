"""No host sync in the training step (CUDA only; part of the device script next to `vitsweep bench
gpu`): every built-in variant's bf16 step runs under `torch.cuda.set_sync_debug_mode("error")`, and the
loop's epoch syncs a fixed number of times whatever its length (once per log interval and at the end,
never per step)."""

import argparse
import warnings

import pytest
import torch

from benchmarks.gpu import VARIANTS, _setup, sync_check
from finetune.config import TrainConfig
from finetune.loop import train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs CUDA")
TINY = argparse.Namespace(device="cuda", tiny=True, model="vit_tiny_patch16_224")


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_makes_no_host_sync(variant):
    assert sync_check(TINY, variant) == "ok"


def _epoch_syncs(batches: int) -> int:
    model, state, images, target = _setup(TINY, "softmax", 32, 8)
    loader = [(images.cpu().pin_memory(), target.cpu().pin_memory())] * batches
    cfg = TrainConfig.from_dict({"model": "vit_tiny_patch16_224", "epochs": 1, "log_interval": 1000, "clip_grad": 1.0})
    criterion = torch.nn.CrossEntropyLoss()
    train_one_epoch(state, model, loader[:1], criterion, cfg, device=images.device, num_batches=1, num_classes=100,
                    autocast_dtype=torch.bfloat16, progress=False)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(state, model, loader, criterion, cfg, device=images.device, num_batches=batches,
                            num_classes=100, autocast_dtype=torch.bfloat16, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_an_epoch_syncs_per_log_interval_not_per_step():
    short, long = _epoch_syncs(2), _epoch_syncs(8)
    assert short == long, (short, long)
