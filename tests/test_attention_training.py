"""End to end: every attention variant trains a tiny ViT well above chance (slow: ~1 min on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from finetune.config import TrainConfig
from finetune.train import run_training

CLASSES = 4  # chance: 25 %
VARIANT_HPARAMS = {
    "softmax": {},
    "linformer": {"rank": 16},
    "performer": {"features": 32},
    "nystrom": {"landmarks": 16},
    "atrous_linear": {"features": 16, "dilation": [1, 2, 3], "window": 3},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANT_HPARAMS))
def test_variant_learns_synthetic_task(variant):
    cfg = TrainConfig.from_dict(
        dict(
            model="vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            depth=2,
            data=f"synthetic:classes={CLASSES},size=32,n=192,n_val=64",
            epochs=3,
            batch_size=32,
            lr=1e-3,
            warmup_epochs=0.5,
            num_workers=0,
            augment="none",
            topk=[1, 2],
            log_interval=100,
            variant=variant,
            **VARIANT_HPARAMS[variant],
        )
    )
    result = run_training(cfg, progress=False)
    assert result["status"] == "finished"
    assert result["metrics"]["val/acc1"] >= 0.6, (variant, [h["val/acc1"] for h in result["history"]])
