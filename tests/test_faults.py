"""Crashes during checkpoint and weight writes (the writer dies half-way through a file), and the fault
injection callbacks themselves, without Ray.

The fault matrix end to end (SIGKILLed trial workers, raising, NaN and OOM trials in a sweep) is in
test_faults_ray.py; the 50-trial load test in test_faults_load.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.callbacks import Callback
from finetune.checkpoint import read_checkpoint
from finetune.config import TrainConfig
from finetune.faults import KillOnce, NaNLossAt, OutOfMemoryAt, RaiseOnce
from finetune.io_utils import atomic_path
from finetune.models import build_vit
from finetune.train import run_training
from finetune.weights import load_weight_dict, save_weight_dict

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_workers=0,
            augment="none", topk=[1], data="synthetic:classes=4,size=32,n=32,n_val=16", batch_size=16,
            warmup_epochs=0.5)


class DiskDies(Exception):
    """What the half-way writer raises (stands in for ENOSPC, EIO, or the process dying)."""


def _half_then_die(write):
    """A writer that writes the full file through `write`, cuts it to half its bytes, then raises."""

    def dying(obj, path, *args, **kwargs):
        write(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise DiskDies(f"died half-way through writing {path}")

    return dying


def _dying_json(path, obj):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, default=str)[:100])
        raise DiskDies(f"died half-way through writing {path}")


def _install(monkeypatch, which):
    import safetensors.torch

    import finetune.checkpoint

    if which == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", _half_then_die(safetensors.torch.save_file))
    elif which == "training_state":
        monkeypatch.setattr(torch, "save", _half_then_die(torch.save))
    else:
        monkeypatch.setattr(finetune.checkpoint, "write_json", _dying_json)


@pytest.mark.parametrize("which", ["weights", "training_state", "meta"])
def test_crash_while_overwriting_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch, which):
    """`train --out` keeps one checkpoint directory and overwrites it each epoch: the second epoch's save
    dies half-way through one of its three files."""

    class BreakTheWriterAfterEpoch1(Callback):
        def on_epoch_end(self, state, metrics):  # runs after the epoch-1 checkpoint was written
            if state.epoch == 1:
                _install(monkeypatch, which)

    cfg = TrainConfig.from_dict(dict(TINY, epochs=2))
    with pytest.raises(DiskDies):
        run_training(cfg, tmp_path / "run", [BreakTheWriterAfterEpoch1()], progress=False)
    monkeypatch.undo()
    directory = tmp_path / "run" / "checkpoint"
    checkpoint = read_checkpoint(directory)  # verifies every checksum
    assert checkpoint["meta"]["epoch"] == 1 and checkpoint["training"]["epoch"] == 1
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")], "a partial temp file was left"
    # and training continues from it to the end
    resumed = run_training(cfg, tmp_path / "run", resume_from=directory, progress=False)
    assert resumed["status"] == "finished" and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert read_checkpoint(directory)["meta"]["epoch"] == 2
    assert sorted(p.suffix for p in directory.iterdir()) == [".json", ".pt", ".safetensors"], "stale files left"


ARCH = dict(model="vit_tiny_patch16_224", variant="softmax", attn_hparams={}, img_size=32, patch_size=4, depth=2,
            num_classes=4)


def test_crash_while_overwriting_weights_leaves_the_previous_weights_loadable(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(0)
    first = build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=4, depth=2).eval()
    path = save_weight_dict(first, tmp_path / "weights.safetensors", ARCH, metrics={"val/acc1": 0.5})
    before = path.read_bytes()
    torch.manual_seed(1)
    second = build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=4, depth=2)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_die(safetensors.torch.save_file))
    with pytest.raises(DiskDies):
        save_weight_dict(second, path, ARCH, metrics={"val/acc1": 0.9})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.json", "weights.safetensors"]
    loaded, sidecar = load_weight_dict(path)  # checksum verified against the sidecar
    assert sidecar["metrics"]["val/acc1"] == 0.5
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), first(x))


SLOW_WRITE = """
import sys, time
from pathlib import Path
import torch
from finetune.io_utils import atomic_path
target, ready = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_path(target) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"x" * 4096)
        fh.flush()
        ready.write_text(tmp)
        time.sleep(600)  # killed here, mid-write
"""


def test_sigkill_during_a_slow_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous checkpoint")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(target), str(ready)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        while not ready.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
    # the half-written temp file is a hidden sibling; the real name never held partial bytes
    partial = Path(ready.read_text())
    assert partial.name.startswith(".model.safetensors.") and partial.name.endswith(".tmp")


# ------------------------------------------------------------------------------- the callbacks


def test_kill_once_kills_its_own_process_once(tmp_path):
    """Without Ray: the first run dies by SIGKILL at the chosen step, the second (marker present) finishes."""
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from finetune.config import TrainConfig\nfrom finetune.faults import KillOnce\n"
        "from finetune.train import run_training\n"
        f"cfg = TrainConfig.from_dict({dict(TINY, epochs=1)!r})\n"
        "print(run_training(cfg, callbacks=[KillOnce(sys.argv[1], epoch=0, batch=0)], progress=False)['status'])\n"
    )
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    first = subprocess.run([sys.executable, "-c", script, str(marker)], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert "KillOnce" in marker.read_text()
    second = subprocess.run([sys.executable, "-c", script, str(marker)], cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip().splitlines()[-1] == "finished"


def test_faults_fire_only_at_their_step_and_only_for_matching_configs(tmp_path):
    from finetune.faults import InjectedFault
    from finetune.train import TrainingOOMError

    cfg = TrainConfig.from_dict(dict(TINY, epochs=2))
    # another config: nothing fires
    quiet = [RaiseOnce(0, 0, only_if={"lr": 0.5}), OutOfMemoryAt(0, 0, only_if={"seed": 7}),
             NaNLossAt(0, 0, only_if={"variant": "performer"})]
    assert run_training(cfg, callbacks=quiet, progress=False)["status"] == "finished"
    marker = tmp_path / "raised"
    with pytest.raises(InjectedFault, match=r"boom \(epoch 1, batch 1\)"):
        run_training(cfg, callbacks=[RaiseOnce(1, 1, marker_path=marker, message="boom")], progress=False)
    assert run_training(cfg, callbacks=[RaiseOnce(1, 1, marker_path=marker)], progress=False)["status"] == "finished"
    with pytest.raises(TrainingOOMError, match="Tried to allocate 20.00 GiB"):
        run_training(cfg, callbacks=[OutOfMemoryAt(0, 0)], progress=False)
    diverged = run_training(cfg, callbacks=[NaNLossAt(0, 0)], progress=False)
    assert diverged["status"] == "diverged" and len(diverged["history"]) == 1
    with pytest.raises(ValueError, match="epoch=-1"):
        KillOnce(marker, epoch=-1, batch=0)


def test_resume_of_a_sweep_whose_trainable_cannot_be_imported_is_refused_with_the_reason():
    """A sweep run with ``tune.with_parameters(train_vit, callbacks=[...])`` records a trainable that
    cannot be imported again; `vitsweep resume` must say so (exit 2), not fail with a traceback."""
    from ray import tune

    from finetune.config import ConfigError
    from orchestrator.sweep import load_trainable, trainable_path
    from trainables.finetune_trainable import train_vit

    assert load_trainable(trainable_path(train_vit)) is train_vit
    wrapped = trainable_path(tune.with_parameters(train_vit, callbacks=[RaiseOnce(0, 0)]))
    assert "<locals>" in wrapped
    with pytest.raises(ConfigError, match=r"trainable '.*<locals>.inner' cannot be imported.*allowed"):
        load_trainable(wrapped)
    with pytest.raises(ConfigError, match=r"trainable 'tests.nowhere:fn' cannot be imported"):
        load_trainable("tests.nowhere:fn")
