"""The fine-tuning loop: determinism, exact resume from a checkpoint, divergence as a status."""

import math

import pytest
import torch

from finetune.callbacks import Callback
from finetune.checkpoint import CheckpointError, read_checkpoint
from finetune.config import TrainConfig
from finetune.train import run_training

VOLATILE = ("time/", "throughput/", "infer/")  # infer/: the timed inference profile


def _stable(history):
    return [{k: v for k, v in h.items() if not k.startswith(VOLATILE)} for h in history]


class StopAfter(Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, state, metrics):
        if state.epoch >= self.epochs:
            state.should_stop, state.stop_reason = True, "interrupted"


def test_same_config_twice_gives_identical_metrics(tiny_config):
    cfg = TrainConfig.from_dict(dict(tiny_config, augment="timm"))
    a = run_training(cfg, progress=False)
    b = run_training(cfg, progress=False)
    assert a["status"] == "finished"
    assert _stable(a["history"]) == _stable(b["history"])
    assert set(a["metrics"]) >= {"train/loss", "val/loss", "val/acc1", "val/acc2", "cost/params", "cost/gflops",
                                 "memory/peak_allocated_mb", "throughput/train_img_s", "throughput/eval_img_s",
                                 "time/epoch_s", "epoch", "lr"}


def test_resume_from_checkpoint_continues_exactly(tiny_config, tmp_path):
    cfg = TrainConfig.from_dict(dict(tiny_config, epochs=3, augment="timm"))
    full = run_training(cfg, progress=False)
    partial = run_training(cfg, tmp_path / "run", [StopAfter(1)], progress=False)
    assert partial["status"] == "interrupted" and len(partial["history"]) == 1
    resumed = run_training(cfg, tmp_path / "run", resume_from=tmp_path / "run" / "checkpoint", progress=False)
    assert resumed["status"] == "finished"
    assert _stable(resumed["history"]) == _stable(full["history"])


def test_corrupt_checkpoint_is_refused(tiny_config, tmp_path):
    cfg = TrainConfig.from_dict(dict(tiny_config, epochs=1))
    run_training(cfg, tmp_path / "run", progress=False)
    state_file = next((tmp_path / "run" / "checkpoint").glob("training_state.*.pt"))
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "run" / "checkpoint")
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        read_checkpoint(tmp_path)


class PoisonWeights(Callback):
    """Turns a weight into NaN mid-epoch, as an exploding update would."""

    def on_train_batch_end(self, state, batch_idx):
        if state.global_step == 2:
            with torch.no_grad():
                state.model.head.weight.fill_(float("nan"))


def test_non_finite_loss_stops_with_status_diverged(tiny_config):
    cfg = TrainConfig.from_dict(dict(tiny_config, epochs=3))
    result = run_training(cfg, callbacks=[PoisonWeights()], progress=False)
    assert result["status"] == "diverged"
    assert len(result["history"]) == 1
    last = result["metrics"]
    assert last["status"] == "diverged" and math.isnan(last["train/loss"]) and last["val/acc1"] == 0.0


class SimulatedOOM(Callback):
    def on_train_batch_end(self, state, batch_idx):
        if state.global_step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_reported_with_the_reason_and_memory_released(tiny_config, tmp_path):
    import gc
    import weakref

    from finetune.train import TrainingOOMError

    cfg = TrainConfig.from_dict(tiny_config)
    refs = []

    class Track(Callback):
        def on_fit_start(self, state):
            refs.append(weakref.ref(state.model))

    with pytest.raises(TrainingOOMError, match=r"out of device memory with batch_size=16.*Tried to allocate 20.00 GiB"):
        run_training(cfg, tmp_path / "run", callbacks=[Track(), SimulatedOOM()], progress=False)
    gc.collect()
    assert refs and refs[0]() is None  # the model (and its activations) were freed
