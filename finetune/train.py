"""One complete fine-tuning run from a `TrainConfig`: validate, build data and model, `fit`, write outputs.

`check_config` runs every check that needs neither data nor training (the sweep driver calls it for
each configuration before Ray starts); `run_training` is what `vitsweep train` and the Ray trainable
call. Outputs under ``out_dir``: result.json, weights.safetensors + weights.json, tb/,
preprocessing.json, and checkpoint/ (latest epoch, for ``vitsweep train --resume``).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import timm
import torch

from .callbacks import Callback, TrainState
from .distributed import DistContext
from .config import TrainConfig
from .errors import AttentionConfigError, ConfigError, TrainingOOMError
from .inference_profile import InferenceProfileCallback, analytic_memory_metrics
from .io_utils import write_json
from .loop import fit, resolve_device, resolve_precision, seed_everything
from .metrics import MetricError, check_topk, cost_metrics
from .models import build_vit, vit_geometry
from .models.attention import check_attention

_logger = logging.getLogger(__name__)


def check_config(cfg: TrainConfig) -> Dict[str, Any]:
    """Validate model, geometry, attention hyperparameters, data spec, device and weights path.

    Returns the geometry: grid, num_prefix_tokens, num_tokens, embed_dim, num_heads.
    """
    from .data import check_data_spec

    cfg.validate()
    grid, prefix, dim, heads = vit_geometry(cfg.model, cfg.img_size, cfg.patch_size, cfg.depth)
    if cfg.depth is not None and cfg.depth > model_depth(cfg.model):
        raise ConfigError(f"depth={cfg.depth} but {cfg.model} has {model_depth(cfg.model)} blocks; allowed: 1..{model_depth(cfg.model)}")
    try:
        check_attention(cfg.variant, dim=dim, num_heads=heads, grid_size=grid, num_prefix_tokens=prefix, **cfg.attention_hparams())
    except AttentionConfigError as err:
        raise ConfigError(f"{err} (model {cfg.model}, grid {grid[0]}x{grid[1]}, {prefix + grid[0] * grid[1]} tokens)") from err
    check_data_spec(cfg.data)
    check_device(cfg.device)
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    if cfg.weights is not None:
        check_weights_file(cfg.weights)
    return {
        "grid": list(grid),
        "num_prefix_tokens": prefix,
        "num_tokens": prefix + grid[0] * grid[1],
        "embed_dim": dim,
        "num_heads": heads,
    }


def check_weights_file(path: str) -> None:
    """``--weights`` must be a regular file; a vitsweep weights file must pass its checksums and its
    sidecar must describe it (`finetune.weights.vitsweep_sidecar`), as `eval` and `load_weight_dict`
    require, before it initialises a model."""
    from .errors import WeightsError
    from .safe_files import check_regular
    from .weights import vitsweep_sidecar

    if not os.path.lexists(path):
        raise ConfigError(f"weights={path!r} does not exist")
    try:
        check_regular(path, "weights file", WeightsError)
        vitsweep_sidecar(path)
    except WeightsError as err:
        raise ConfigError(f"weights={path!r}: {err}") from None


@functools.lru_cache(maxsize=None)
def model_depth(name: str) -> int:
    """The number of blocks of timm model `name` as the architecture defines it (built on `meta`)."""
    with torch.device("meta"):
        return len(timm.create_model(name, pretrained=False, num_classes=0).blocks)


def check_device(device: str) -> None:
    """The device must exist on this machine: a `cuda:N` index below the CUDA device count, `mps` only
    where MPS is available (the syntax is checked by TrainConfig)."""
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match and torch.cuda.is_available() and int(match.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device={device!r} but this machine has {count} CUDA device(s); allowed: cuda:0..cuda:{count - 1}, cpu, auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} but MPS is not available here; allowed: auto, cpu" + (", cuda" if torch.cuda.is_available() else ""))


def _preprocessing_model(cfg: TrainConfig) -> torch.nn.Module:
    """A weightless (meta) model whose pretrained_cfg carries the checkpoint's preprocessing."""
    name = f"{cfg.model}.{cfg.pretrained_tag}" if cfg.pretrained_tag else cfg.model
    kwargs = {k: v for k, v in (("img_size", cfg.img_size), ("patch_size", cfg.patch_size)) if v is not None}
    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as err:  # unknown tag
            raise ConfigError(f"pretrained_tag={cfg.pretrained_tag!r} is not a tag of {cfg.model}: {err}") from err


class TensorBoardCallback(Callback):
    """The run's HParams session (its hyperparameters at the start, its status at the end) and its
    scalars every epoch; the session's metric values are those scalars (`finetune.tb_writer`)."""

    def __init__(self, writer):
        self.writer = writer

    def on_fit_start(self, state: TrainState) -> None:
        self.writer.session_start(_flat_hparams(state.config))

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        self.writer.scalars(metrics, step=state.epoch)

    def on_fit_end(self, state: TrainState, result: Dict[str, Any]) -> None:
        self.writer.session_end(result["status"])


class LocalCheckpointCallback(Callback):
    """Keep the latest epoch's checkpoint in ``out_dir/checkpoint`` (atomic per file)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(state, self.directory)


def _flat_hparams(config: Dict[str, Any]) -> Dict[str, Any]:
    """The run's HParams values: every TrainConfig key that describes the training (not how it runs)
    and every hyperparameter the variant declares (defaults filled in), flat (`tb_writer.flat_hparams`)."""
    from .tb_writer import flat_hparams

    return flat_hparams(config)


def run_training(
    cfg: TrainConfig,
    out_dir: Optional[str | Path] = None,
    callbacks: Sequence[Callback] = (),
    *,
    resume_from: Optional[str | Path] = None,
    progress: bool = True,
    local_checkpoints: bool = True,
    before_write: Optional[Callable[[], None]] = None,
    extra_result: Optional[Mapping[str, Any]] = None,
    dist: Optional[DistContext] = None,
) -> Dict[str, Any]:
    """Validate everything, then train; nothing is written under `out_dir` before validation passes.

    `resume_from`: a checkpoint directory; its config must equal `cfg` but for `RESUMABLE_CHANGES`
    (`finetune.checkpoint.check_resume_config`). `before_write` runs once, after the config, the
    checkpoint, the data and the model have been checked and built and before anything is written
    under `out_dir` (`vitsweep train --overwrite` moves the previous run aside there). `extra_result`:
    fields added to the result (and result.json), e.g. the nodes a sweep trial ran on. `dist`
    (`finetune.distributed.DistContext`): one worker of a data-parallel run; every worker trains,
    rank 0 alone writes under `out_dir` (the others return the same result without writing).

    Returns ``{"status", "metrics", "history", "config", ...}`` (also written to result.json).
    """
    from .checkpoint import check_resume_config, read_checkpoint
    from .data import build_data, build_loaders, plot_grid, resolve_preprocessing

    geometry = check_config(cfg)
    resume = read_checkpoint(resume_from) if resume_from else None
    if resume is not None:
        check_resume_config(resume["meta"], cfg, resume_from)
    device = _run_device(cfg, dist)
    seed_everything(cfg.seed)
    preprocessing = resolve_preprocessing(
        _preprocessing_model(cfg), cfg.img_size, augment=cfg.augment, scale=cfg.scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter
    )
    bundle = build_data(cfg.data, preprocessing, skip_bad_images=cfg.skip_bad_images, seed=cfg.seed)
    _check_topk(cfg.topk, bundle.num_classes)
    attn_hparams = cfg.attention_hparams()
    model = _build_model(cfg, bundle.num_classes, attn_hparams, fresh=resume is None)
    static = cost_metrics(model, preprocessing.input_size[1:], cache=True)  # once per architecture
    static.update(analytic_memory_metrics(model, cfg.batch_size, resolve_precision(cfg.precision, device)[0]))
    train_loader, val_loader = build_loaders(bundle, cfg.batch_size, cfg.num_workers, device, cfg.seed, dist=dist)
    if dist is not None and not dist.is_main:
        out_dir, before_write = None, None  # rank 0 writes

    callbacks: List[Callback] = list(callbacks)
    writer = None
    if before_write is not None:
        before_write()
    if out_dir is not None:
        writer, output_callbacks = _open_outputs(Path(out_dir), local_checkpoints, preprocessing, val_loader, bundle,
                                                 plot_grid)
        callbacks[:0] = output_callbacks
    # First: the final epoch's metrics gain infer/* before TensorBoard, checkpoints and Ray's report see them.
    callbacks.insert(0, InferenceProfileCallback(preprocessing.input_size, device, resolve_precision(cfg.precision, device)[0]))
    oom_message = None
    try:
        result = fit(
            model, train_loader, val_loader, cfg, callbacks,
            num_classes=bundle.num_classes, device=device, resume=resume, static_metrics=static, progress=progress,
            train_batch_transform=bundle.train_batch_transform, eval_batch_transform=bundle.eval_batch_transform,
            dist=dist,
        )
    except torch.cuda.OutOfMemoryError as err:
        # Leave the except block first: its traceback pins every activation of the failed step.
        oom_message = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
    finally:
        if writer is not None:
            writer.close()
    if oom_message is not None:
        del model, train_loader, val_loader
        release_device_memory()
        raise _oom_error(cfg, device, oom_message)

    result.update(_describe_run(cfg, attn_hparams, geometry, bundle, device, dist))
    result.update(extra_result or {})
    if out_dir is not None:
        _write_outputs(Path(out_dir), model, cfg, result, preprocessing, bundle.class_names)
    return result


def _run_device(cfg: TrainConfig, dist: Optional[DistContext]) -> torch.device:
    device = dist.device if dist is not None else resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # cuda:N: kernels, NCCL and libraries that use the current device agree
    return device


def _check_topk(topk, num_classes: int) -> None:
    try:
        check_topk(topk, num_classes)
    except MetricError as err:
        raise ConfigError(str(err)) from err


def _oom_error(cfg: TrainConfig, device: torch.device, message: str) -> TrainingOOMError:
    return TrainingOOMError(
        f"out of device memory with batch_size={cfg.batch_size}, variant={cfg.variant}, "
        f"precision={cfg.precision} on {device}: {message}. Lower --batch-size, use --precision bf16, "
        "or give the trial a whole GPU (--gpus-per-trial 1)"
    )


def _build_model(cfg: TrainConfig, num_classes: int, attn_hparams: Dict[str, Any], *, fresh: bool):
    """The run's ViT; `fresh`: not resumed, so the pretrained or `--weights` initialisation applies."""
    return build_vit(
        cfg.model,
        num_classes,
        variant=cfg.variant,
        attn_hparams=attn_hparams,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        depth=cfg.depth,
        pretrained=cfg.pretrained and fresh,
        pretrained_tag=cfg.pretrained_tag,
        weights=cfg.weights if fresh else None,
        drop_path=cfg.drop_path,
    )


def _open_outputs(out: Path, local_checkpoints: bool, preprocessing, val_loader, bundle, plot_grid):
    """Create `out` with preprocessing.json, TensorBoard (with a sample grid) and the local
    checkpoint; returns (writer, the callbacks that write there, first to run first)."""
    from .tb_writer import TBWriter

    out.mkdir(parents=True, exist_ok=True)
    preprocessing.save(out / "preprocessing.json")
    writer = TBWriter(str(out / "tb"))
    _write_sample_grid(writer, val_loader, bundle, preprocessing, plot_grid)
    callbacks: List[Callback] = [TensorBoardCallback(writer)]
    if local_checkpoints:
        callbacks.insert(0, LocalCheckpointCallback(out / "checkpoint"))
    return writer, callbacks


def _describe_run(cfg: TrainConfig, attn_hparams, geometry, bundle, device: torch.device,
                  dist: Optional[DistContext]) -> Dict[str, Any]:
    """What result.json records beside the metrics: config, arch, geometry, data and environment."""
    return {
        "config": cfg.to_dict(),
        "arch": _arch(cfg, attn_hparams, bundle.num_classes),
        "geometry": geometry,
        "data": {
            "spec": cfg.data,
            "num_classes": bundle.num_classes,
            "train_size": len(bundle.train),
            "val_size": len(bundle.val),
            "skipped_images": bundle.skipped_images,
        },
        "environment": {
            "device": str(device),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            **(dist.describe() if dist is not None else {"world_size": 1}),
        },
    }


def _arch(cfg: TrainConfig, attn_hparams, num_classes: int) -> Dict[str, Any]:
    return {
        "model": cfg.model,
        "variant": cfg.variant,
        "attn_hparams": attn_hparams,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "depth": cfg.depth,
        "num_classes": num_classes,
    }


def _write_outputs(out: Path, model, cfg: TrainConfig, result: Dict[str, Any], preprocessing, class_names) -> None:
    """The weights with their sidecar, then result.json (last: it says the run's outputs are complete)."""
    from .weights import save_weight_dict

    save_weight_dict(
        model, out / "weights.safetensors", {**cfg.to_dict(), **result["arch"]},
        metrics=result["metrics"], preprocessing=preprocessing.to_dict(), class_names=class_names,
    )
    result["weights"] = str(out / "weights.safetensors")
    write_json(out / "result.json", result)


def release_device_memory() -> None:
    """Return the device memory a finished (or failed) run held to the driver: collect the cycles that
    still pin tensors, then empty torch's CUDA cache. Only a process that used CUDA pays for it: a full
    ``gc.collect`` walks every object of a process that imported torch, timm and matplotlib (0.3-0.6 s
    on a 2-core VM, at the end of every trial), and on the CPU Python's own collector frees the rest."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def _write_sample_grid(writer, loader, bundle, preprocessing, plot_grid, n: int = 16) -> None:
    """A denormalised grid of validation images with class names, for a visual sanity check."""
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.extend(int(v) for v in y)
        if len(labels) >= n:
            break
    if not images:
        return
    batch = torch.cat(images)[:n]
    if bundle.eval_batch_transform is not None:  # cache path: uint8 on disk, normalised on the device
        batch = bundle.eval_batch_transform(batch)
    fig = plot_grid(batch, labels[:n], bundle.class_names, None, preprocessing.mean, preprocessing.std)
    writer.figure("samples/val", fig, step=0)
