"""Shared test setup: offline hub, deterministic CPU threads, tiny model/data settings."""

import os
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# One intra-op thread: Ray trials and pytest share 2 cores, and OpenMP spinning under
# oversubscription makes a step several times slower.
torch.set_num_threads(1)

# A ViT small enough to train in seconds on 2 cores, with an 8x8 patch grid (65 tokens).
TINY_MODEL = dict(model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2)
TINY_DATA = "synthetic:classes=4,size=32,n=96,n_val=48"
# A sweep's fixed values for a tiny ViT at 32 px (8x8 grid + CLS = 65 tokens) on 5 synthetic classes.
TINY_SWEEP_FIXED = {
    "model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32, "patch_size": 4,
    "data": "synthetic:classes=5,size=32,n=40,n_val=20",
}


def write_sweep_yaml(directory, body: str = "", **fixed) -> str:
    """``directory/sweep.yaml``: a ``fixed:`` block (TINY_SWEEP_FIXED updated with `fixed`), then `body`."""
    path = Path(directory) / "sweep.yaml"
    path.write_text(yaml.safe_dump({"fixed": {**TINY_SWEEP_FIXED, **fixed}}, sort_keys=False) + textwrap.dedent(body))
    return str(path)


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


@pytest.fixture
def validation_calls(monkeypatch):
    """Spies that count the sweep checks: ``check_options`` (`SweepSpec.check_options`, the sweep-level
    options) and ``check_config`` (`finetune.train.check_config`, one configuration's geometry)."""
    import finetune.train
    from search_spaces import SweepSpec

    calls = {"check_options": 0, "check_config": 0}
    check_options, check_config = SweepSpec.check_options, finetune.train.check_config

    def options_spy(spec):
        calls["check_options"] += 1
        return check_options(spec)

    def config_spy(cfg):
        calls["check_config"] += 1
        return check_config(cfg)

    monkeypatch.setattr(SweepSpec, "check_options", options_spy)
    monkeypatch.setattr(finetune.train, "check_config", config_spy)
    return calls
