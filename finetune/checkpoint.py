"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint directory holds ``model.<tag>.safetensors`` (weights), ``training_state.<tag>.pt``
(optimizer, scheduler, grad scaler, RNG states, counters, history; plain tensors and containers, read
back with ``torch.load(weights_only=True)`` so no code can run) and ``meta.json``, written last, naming
both files with their checksums. ``meta.json`` is the commit point: each save writes its files under a
fresh tag (atomically), then replaces ``meta.json`` atomically, then deletes the files of the previous
save. A crash at any moment of a save into an existing checkpoint directory therefore leaves the
previous checkpoint loadable. A directory without a valid ``meta.json`` is not a checkpoint. On CPU a
run resumed from epoch k gives the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import pickle
import random
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from .callbacks import TrainState
from .errors import CheckpointError
from .io_utils import atomic_path, read_tagged_json, sha256_file, write_json

FORMAT = "vitsweep-checkpoint"
MODEL_FILE = "model.safetensors"  # names before tagged files (still read)
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
# TrainConfig keys a resumed run may change: they do not change what the finished epochs computed.
# `epochs` may only grow; the learning-rate schedule stays the checkpoint's (timm's scheduler state is
# restored), so epochs beyond the original end run at min_lr.
RESUMABLE_CHANGES = (
    "epochs", "num_workers", "log_interval", "max_train_batches", "max_val_batches", "device", "compile",
    "eval_at_start", "tf32",
)
_TRAINING_KEYS = ("optimizer", "rng", "epoch", "global_step")


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_checkpoint(state: TrainState, directory: str | Path) -> Path:
    """Write `state` into `directory` (created if needed); returns the directory.

    Overwriting an existing checkpoint is crash-safe: the new files get a fresh tag, ``meta.json``
    switches to them atomically, and only then are the previous save's files removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"{state.global_step:08d}-{uuid.uuid4().hex[:8]}"
    model_name, state_name = f"model.{tag}.safetensors", f"training_state.{tag}.pt"
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.model.state_dict().items()}
    with atomic_path(directory / model_name) as tmp:
        safetensors.torch.save_file(weights, tmp)
    training = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng_state(),
        "epoch": state.epoch,
        "global_step": state.global_step,
    }
    with atomic_path(directory / state_name) as tmp:
        torch.save(training, tmp)
    write_json(
        directory / META_FILE,
        {
            "format": FORMAT,
            "epoch": state.epoch,
            "global_step": state.global_step,
            "config": state.config,
            "history": state.history,
            "static_metrics": state.static_metrics,
            "files": {"model": model_name, "state": state_name},
            "sha256": {model_name: sha256_file(directory / model_name), state_name: sha256_file(directory / state_name)},
        },
    )
    for stale in [*directory.glob("model*.safetensors"), *directory.glob("training_state*.pt")]:
        if stale.name not in (model_name, state_name):
            stale.unlink()
    return directory


def read_checkpoint(directory: str | Path) -> Dict[str, Any]:
    """Load and verify a checkpoint; returns {"model": state_dict, "training": {...}, "meta": {...}}."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a vitsweep checkpoint: {META_FILE} is missing")
    meta = read_tagged_json(meta_path, FORMAT, "vitsweep checkpoint", CheckpointError)
    files = meta.get("files") or {"model": MODEL_FILE, "state": STATE_FILE}
    sums = meta.get("sha256")
    if not isinstance(files, dict) or not all(_plain_name(files.get(k)) for k in ("model", "state")):
        raise CheckpointError(f"checkpoint {str(meta_path)!r}: 'files' must name the model and state files in its directory, not {files!r}")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(files[k]), str) for k in ("model", "state")):
        raise CheckpointError(f"checkpoint {str(meta_path)!r} has no checksums (sha256) of its files; it cannot be verified")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("epoch"), int):
        raise CheckpointError(f"checkpoint {str(meta_path)!r} lacks its config or epoch")
    model_path, state_path = directory / files["model"], directory / files["state"]
    for name in (files["model"], files["state"]):
        digest = sums[name]
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: {name} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated (checksum mismatch)")
    try:
        model_state = safetensors.torch.load_file(str(model_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint weights {str(model_path)!r} are unreadable: {err}") from err
    try:
        training = torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"checkpoint state {str(state_path)!r} is unreadable or holds non-tensor objects: "
            f"{str(err).splitlines()[0]}"
        ) from err
    if not isinstance(training, dict) or any(k not in training for k in _TRAINING_KEYS):
        raise CheckpointError(f"checkpoint state {str(state_path)!r} lacks {', '.join(_TRAINING_KEYS)}")
    return {"model": model_state, "training": training, "meta": meta}


def _plain_name(name: Any) -> bool:
    """A file name inside the checkpoint directory (no path separators, not '.' or '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def check_resume_config(meta: Mapping[str, Any], cfg, where: str | Path) -> None:
    """Refuse to resume the checkpoint whose `meta` was read from `where` with a `cfg` (a TrainConfig)
    that differs from the checkpoint's config in any key but `RESUMABLE_CHANGES`, or whose `epochs`
    is fewer than the checkpoint has done. The message lists every differing key, old and new."""
    from .config import TrainConfig

    saved = meta["config"]
    defaults = TrainConfig().to_dict()
    diffs = []
    for key, new in cfg.to_dict().items():
        old = saved.get(key, defaults.get(key))
        if key not in RESUMABLE_CHANGES and old != new:
            diffs.append(f"{key} (checkpoint {old!r}, now {new!r})")
    if diffs:
        raise CheckpointError(
            f"--resume: the config differs from the checkpoint's in {', '.join(diffs)}; a resumed run must use "
            f"the checkpoint's config (only {', '.join(RESUMABLE_CHANGES)} may change). Pass the checkpoint's "
            f"values, or start a new run in another directory (checkpoint: {str(where)!r})"
        )
    if cfg.epochs < meta["epoch"]:
        raise CheckpointError(
            f"--resume: epochs={cfg.epochs} is fewer than the {meta['epoch']} epochs the checkpoint "
            f"{str(where)!r} has done; use epochs >= {meta['epoch']}"
        )


def restore_checkpoint(state: TrainState, checkpoint: Dict[str, Any]) -> None:
    """Load a `read_checkpoint` result into a freshly built `state` (same config)."""
    training = checkpoint["training"]
    meta = checkpoint["meta"]
    try:
        state.model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit this model (was it written by another config?): {err}") from err
    try:
        state.optimizer.load_state_dict(training["optimizer"])
    except (ValueError, KeyError) as err:  # torch's message for a state of another parameter layout
        raise CheckpointError(f"checkpoint optimizer state does not fit this model: {err}") from err
    if state.scheduler is not None and training.get("scheduler") is not None:
        state.scheduler.load_state_dict(training["scheduler"])
    if state.scaler is not None and training.get("scaler") is not None:
        state.scaler.load_state_dict(training["scaler"])
    set_rng_state(training["rng"])
    state.epoch = int(training["epoch"])
    state.global_step = int(training["global_step"])
    state.history = list(meta.get("history", []))
