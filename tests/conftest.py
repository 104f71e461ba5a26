"""Shared test setup: offline hub, deterministic CPU threads, tiny model/data settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: Ray trials and pytest share 2 cores, and OpenMP spinning under
# oversubscription makes a step several times slower.
torch.set_num_threads(1)

# A ViT small enough to train in seconds on 2 cores, with an 8x8 patch grid (65 tokens).
TINY_MODEL = dict(model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2)
TINY_DATA = "synthetic:classes=4,size=32,n=96,n_val=48"


@pytest.fixture
def tiny_config():
    """A TrainConfig dict for a seconds-long CPU run (override keys per test)."""
    return dict(
        TINY_MODEL,
        data=TINY_DATA,
        epochs=2,
        batch_size=16,
        lr=1e-3,
        warmup_epochs=0.5,
        num_workers=0,
        augment="none",
        topk=[1, 2],
        log_interval=2,
    )
