"""The reusable fine-tuning loop, timm-style: `fit` runs `train_one_epoch` and `evaluate` per epoch.

`fit(model, train_loader, val_loader, cfg, callbacks)` builds the optimiser and schedule from timm,
then per epoch: train (data, forward, backward, step, schedule), evaluate, collect metrics and hand
them to the callbacks. Ray reporting, checkpointing, TensorBoard and fault injection are callbacks
(`finetune.callbacks`), not flags. Loss and accuracy accumulate on the device; the host syncs once
per log interval and once per epoch.

Non-finite numbers stay floats in memory (a diverged epoch's losses are NaN); every output (JSON
files, Ray reports) turns them into null with `finetune.io_utils.json_safe`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .callbacks import Callback, TrainState
from .checkpoint import restore_checkpoint, rng_state, set_rng_state
from .config import TrainConfig
from .distributed import DistContext
from .errors import ConfigError
from .gpu_stats import matmul_precision
from .metrics import Throughput, mfu_metrics, topk_correct
from .profiling import track_memory
from .timing import COMPUTE_IMG_S, DATA_WAIT, EpochTiming

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; allowed: auto, cpu")
    return device


def resolve_precision(precision: str, device: torch.device):
    """(autocast dtype or None, use GradScaler). bf16 needs hardware support; fp16 needs CUDA."""
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16; allowed: fp32, fp16")
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"precision='fp16' needs a CUDA device (device is {device}); allowed here: fp32, bf16")
        return torch.float16, True
    raise ConfigError(f"precision={precision!r}; allowed: fp32, bf16, fp16")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 matmuls and convolutions on CUDA as TF32 tensor-core ops (10-bit mantissa inputs, fp32
    accumulation) or full fp32: process-wide torch flags, set by every run for itself."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW through timm's factory: no weight decay on norms/biases/embeddings, optional layer decay."""
    extra = {"fused": True} if device.type == "cuda" else {}
    return create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, **extra
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup then cosine decay, stepped per update (timm's scheduler)."""
    total = max(1, cfg.epochs * updates_per_epoch)
    warmup = int(round(cfg.warmup_epochs * updates_per_epoch))
    return CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=cfg.min_lr,
        warmup_t=min(warmup, total - 1),
        warmup_lr_init=cfg.lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def build_mixup(cfg: TrainConfig, num_classes: int) -> Optional[Mixup]:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


# ----------------------------------------------------------------------------- one batch
def _to_device(
    images: torch.Tensor,
    target: torch.Tensor,
    device: torch.device,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)  # (B, 3, H, W)
    target = target.to(device, non_blocking=True)  # (B,)
    if batch_transform is not None:
        images = batch_transform(images)  # uint8 (B, 3, H, W) -> float (B, 3, h, w)
    return images, target


def _mix(images: torch.Tensor, target: torch.Tensor, mixup: Optional[Mixup], num_classes: int):
    """(images, target) for the criterion: Mixup/CutMix needs an even batch, so an odd (last) batch
    gets plain one-hot targets instead."""
    if mixup is None:
        return images, target
    if images.shape[0] % 2 == 0:
        return mixup(images, target)  # target: (B,) -> soft (B, classes)
    return images, nn.functional.one_hot(target, num_classes).float()  # (B, classes)


def train_step(
    state: TrainState,
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    criterion: nn.Module,
    autocast_dtype: Optional[torch.dtype] = None,
    clip_grad: Optional[float] = None,
) -> torch.Tensor:
    """Forward, backward (scaled when `state.scaler` is set), clip, optimiser step and schedule
    update for one batch; returns the loss. `model` runs the forward (it may be the compiled
    `state.model`)."""
    with _autocast(images.device, autocast_dtype):
        logits = model(images)  # (B, classes)
        loss = criterion(logits.float(), target)
    optimizer, scaler = state.optimizer, state.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    state.global_step += 1
    state.scheduler.step_update(num_updates=state.global_step)
    return loss


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(
    state: TrainState,
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    cfg: TrainConfig,
    *,
    device: torch.device,
    num_batches: int,
    num_classes: int,
    autocast_dtype: Optional[torch.dtype] = None,
    mixup: Optional[Mixup] = None,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    dist: Optional[DistContext] = None,
) -> Tuple[Dict[str, float], bool]:
    """Train on at most `num_batches` batches of `loader`.

    Returns (``{"train/loss", "throughput/train_img_s", "throughput/compute_img_s",
    "time/data_wait_frac"}``, diverged) (`finetune.timing`). The running loss is checked at every log
    interval; when it is not finite the epoch stops there and `diverged` is True. With
    `dist` the loss is the mean over all workers' samples (so every worker takes the same decision),
    the throughputs the sums of the workers' and the data wait the largest worker's.
    """
    state.model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    diverged = False
    bar = tqdm(total=num_batches, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    timing = EpochTiming(device)
    with Throughput(device) as timer:
        for i, (images, target) in enumerate(timing.timed(loader)):
            if i >= num_batches:
                break
            with timing.data():
                images, target = _to_device(images, target, device, None)
            if batch_transform is not None:  # the cache path's augmentation, on the device: in neither figure
                images = batch_transform(images)  # uint8 (B, 3, H, W) -> float (B, 3, h, w)
            with timing.step():
                images, target = _mix(images, target, mixup, num_classes)
                loss = train_step(state, model, images, target, criterion, autocast_dtype, cfg.clip_grad)
            loss_sum += loss.detach() * images.shape[0]
            seen += images.shape[0]
            for cb in callbacks:
                cb.on_train_batch_end(state, i)
            if (i + 1) % cfg.log_interval == 0 or i + 1 == num_batches:
                running = _global_mean(loss_sum, seen, dist)  # one host sync per log interval
                state.running_loss = running
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{_current_lr(state.optimizer):.2e}")
                if not math.isfinite(running):
                    diverged = True
                    break
            bar.update(1)
    timer.images = seen
    bar.close()
    train_loss = _global_mean(loss_sum, max(1, seen), dist)
    timing_metrics = timing.metrics(seen, timer.seconds)
    if dist is not None:
        timing_metrics = {COMPUTE_IMG_S: _summed(timing_metrics[COMPUTE_IMG_S], dist),
                          DATA_WAIT: dist.max_float(timing_metrics[DATA_WAIT])}
    metrics = {"train/loss": train_loss, "throughput/train_img_s": _summed(timer.images_per_second, dist),
               **timing_metrics}
    return metrics, diverged or not math.isfinite(train_loss)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    topk: Sequence[int],
    autocast_dtype: Optional[torch.dtype] = None,
    max_batches: Optional[int] = None,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    dist: Optional[DistContext] = None,
) -> Dict[str, float]:
    """``val/loss`` and ``val/acc{k}`` (fractions in [0, 1]) plus ``throughput/eval_img_s``; all NaN
    (null in every output) when any logit is not finite. With `dist` each worker evaluates its shard and
    the sums are all-reduced: the figures of the whole set."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(len(topk), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)  # every logit finite so far
    timer = Throughput(device)
    seen = 0
    with timer:
        for i, (images, target) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images, target = _to_device(images, target, device, batch_transform)
            with _autocast(device, autocast_dtype):
                logits = model(images)  # (B, classes)
            loss_sum += criterion(logits.float(), target)
            finite &= torch.isfinite(logits).all()
            correct += topk_correct(logits, target, topk)
            seen += target.shape[0]
    timer.images = seen
    if dist is not None:
        loss_sum, correct = dist.sum_(loss_sum.double()), dist.sum_(correct)
        finite = dist.sum_((~finite).to(torch.long)) == 0  # every worker agrees on divergence
        seen = int(dist.sum_floats([seen])[0])
    if seen == 0:
        raise ConfigError("the validation set produced no batches; check --data and --max-val-batches")
    out = {"val/loss": loss_sum.item() / seen}
    ok = bool(finite.item()) and math.isfinite(out["val/loss"])
    for k, c in zip(topk, correct.tolist()):
        out[f"val/acc{k}"] = c / seen if ok else float("nan")  # argmax of NaN logits is no accuracy
    if not ok:
        out["val/loss"] = float("nan")
    out["throughput/eval_img_s"] = _summed(timer.images_per_second, dist)
    return out


def _global_mean(total: torch.Tensor, count: int, dist: Optional[DistContext]) -> float:
    """``total / count`` on this worker, or over all workers with `dist`."""
    if dist is None:
        return total.item() / count
    total_all, count_all = dist.sum_floats([total.item(), count])
    return total_all / max(1.0, count_all)


def _summed(value: float, dist: Optional[DistContext]) -> float:
    return value if dist is None else dist.sum_floats([value])[0]


def _set_epoch(train_loader: Iterable, epoch: int) -> None:
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # the epoch's order depends on (seed, epoch) alone


def _reduced_epoch_metrics(state: TrainState, train, val, memory: Dict[str, Any], seconds: float,
                           device: torch.device, cfg: TrainConfig, dist: Optional[DistContext]) -> Dict[str, Any]:
    """`_epoch_metrics`, with `dist` over all workers: memory the maximum, time the slowest worker's,
    MFU the summed throughput over one device's peak each."""
    if dist is not None:
        memory, seconds = dist.reduce_memory(memory), dist.max_float(seconds)
    metrics = _epoch_metrics(state, train, val, memory, seconds, device, matmul_precision(cfg.precision, cfg.tf32))
    if dist is not None and metrics.get("throughput/mfu") is not None:
        metrics["throughput/mfu"] /= dist.world_size
    return metrics


def _end_fit(state: TrainState, status: str, callbacks: Sequence[Callback]) -> Dict[str, Any]:
    if state.should_stop and status == "running":
        status = state.stop_reason or "stopped"
    result = {"status": status, "metrics": state.history[-1] if state.history else {}, "history": state.history}
    for cb in callbacks:
        cb.on_fit_end(state, result)
    return result


def _forward_models(model: nn.Module, cfg: TrainConfig, dist: Optional[DistContext]) -> Tuple[nn.Module, nn.Module]:
    """(the model the training steps call, the one evaluation calls): DDP-wrapped and/or compiled."""
    train_model = dist.wrap(model) if dist is not None else model
    forward_model = torch.compile(train_model) if cfg.compile else train_model
    # DDP's forward may sync buffers: evaluation (shards of unequal length) runs the plain module.
    eval_model = forward_model if dist is None else (torch.compile(model) if cfg.compile else model)
    return forward_model, eval_model


def _num_batches(train_loader, cfg: TrainConfig) -> int:
    num_batches = len(train_loader) if cfg.max_train_batches is None else min(len(train_loader), cfg.max_train_batches)
    if num_batches == 0:
        raise ConfigError(f"the training set gives no batch of batch_size={cfg.batch_size}; lower --batch-size")
    return num_batches


def _validate(eval_model: nn.Module, val_loader: Iterable, device: torch.device, cfg: TrainConfig,
              autocast_dtype: Optional[torch.dtype], batch_transform, dist: Optional[DistContext],
              diverged: bool) -> Tuple[Dict[str, float], bool]:
    """(val metrics, diverged): a run that diverged in training, or whose eval outputs are not
    finite, gets `diverged_val_metrics`."""
    if diverged:
        return diverged_val_metrics(cfg.topk), True
    val = evaluate(eval_model, val_loader, device, cfg.topk, autocast_dtype, cfg.max_val_batches, batch_transform, dist)
    if not math.isfinite(val["val/loss"]):  # non-finite outputs in eval only
        return diverged_val_metrics(cfg.topk), True
    return val, False


def diverged_val_metrics(topk: Sequence[int]) -> Dict[str, float]:
    """Stand-ins for `evaluate` after a divergence: a diverged model's predictions are meaningless,
    so its accuracy is zero (no scheduler or report ranks it best) and its loss NaN."""
    return {"val/loss": float("nan"), **{f"val/acc{k}": 0.0 for k in topk}, "throughput/eval_img_s": 0.0}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _epoch_metrics(
    state: TrainState,
    train: Dict[str, float],
    val: Dict[str, float],
    memory: Dict[str, Optional[float]],
    seconds: float,
    device: torch.device,
    precision: str,
) -> Dict[str, Any]:
    """The metrics of the epoch just completed (`state.epoch` already counts it), without `status`."""
    metrics: Dict[str, Any] = {
        "epoch": state.epoch,
        "train/loss": train["train/loss"],
        **val,
        "lr": _current_lr(state.optimizer),
        "throughput/train_img_s": train["throughput/train_img_s"],
        COMPUTE_IMG_S: train[COMPUTE_IMG_S],
        DATA_WAIT: train[DATA_WAIT],
        "time/epoch_s": seconds,
        **memory,
        **state.static_metrics,
    }
    metrics.update(mfu_metrics(device, precision, state.static_metrics.get("cost/gflops", 0.0),
                               metrics["throughput/train_img_s"]))
    return metrics


def _swap_metrics(state: TrainState, resumed: bool, model: nn.Module, val_loader: Iterable, device: torch.device,
                  cfg: TrainConfig, autocast_dtype: Optional[torch.dtype],
                  batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
                  dist: Optional[DistContext] = None) -> Dict[str, float]:
    """``swap/loss`` and ``swap/acc{k}``: the model evaluated before its first training step (the
    accuracy of pretrained weights swapped into the variant). A resumed run keeps the ones its
    history holds (its weights are no longer the swapped ones). The evaluation runs between a
    snapshot and a restore of every RNG, so training draws exactly what it draws without it."""
    if resumed:
        return {k: v for row in state.history[:1] for k, v in row.items() if k.startswith("swap/")}
    saved = rng_state()
    try:
        val = evaluate(model, val_loader, device, cfg.topk, autocast_dtype, cfg.max_val_batches, batch_transform, dist)
    finally:
        set_rng_state(saved)
    return {"swap/" + k.split("/", 1)[1]: v for k, v in val.items() if k.startswith("val/")}


def epoch_summary(metrics: Dict[str, Any], epochs: int, topk: Sequence[int]) -> str:
    """One line per epoch, as timm prints it: ``epoch 2/3  train loss 1.2345  val acc@1 45.20%
    acc@5 90.00%  lr 1.00e-03  312 img/s  12.3 s  data wait 4%`` (``nan`` for a non-finite loss,
    ``diverged`` appended)."""
    accs = "  ".join(f"{'val ' if i == 0 else ''}acc@{k} {100 * metrics.get(f'val/acc{k}', float('nan')):.2f}%"
                     for i, k in enumerate(topk))
    line = (f"epoch {metrics['epoch']}/{epochs}  train loss {metrics['train/loss']:.4f}  {accs}  "
            f"lr {metrics['lr']:.2e}  {metrics['throughput/train_img_s']:.0f} img/s  {metrics['time/epoch_s']:.1f} s")
    if isinstance(metrics.get(DATA_WAIT), float):
        line += f"  data wait {100 * metrics[DATA_WAIT]:.0f}%"
    return line + ("  diverged" if metrics.get("status") == "diverged" else "")


# ----------------------------------------------------------------------------- the loop
def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    num_classes: int,
    device: Optional[torch.device] = None,
    resume: Optional[Dict[str, Any]] = None,
    static_metrics: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    train_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    eval_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    dist: Optional[DistContext] = None,
) -> Dict[str, Any]:
    """Fine-tune `model` for ``cfg.epochs`` epochs; returns ``{"status", "metrics", "history"}``.

    `resume` (`finetune.checkpoint.read_checkpoint`): training continues at the next epoch with every
    state restored. `static_metrics` (params, FLOPs) join every epoch's metrics. `train_batch_transform` /
    `eval_batch_transform` run on the device after the copy (the decode-once cache path does its
    crop, flip and normalisation there). A train loader whose sampler has `set_epoch` gets it at the
    start of every epoch. A non-finite training loss stops the run with status ``diverged``
    (reported as a metric, not raised). With ``cfg.eval_at_start`` the model is evaluated once
    before the first epoch and ``swap/loss``, ``swap/acc{k}`` join every epoch's metrics.

    `dist` (`finetune.distributed.DistContext`): this process is one of a data-parallel group; the
    model trains wrapped in DDP, evaluates unwrapped on its shard, and every metric the callbacks see
    is already reduced over the workers (memory: the maximum, plus ``memory_per_rank``).
    `state.model` stays the unwrapped model, so checkpoints and weights look the same at any scale.
    """
    device = device or resolve_device(cfg.device)
    autocast_dtype, use_scaler = resolve_precision(cfg.precision, device)
    set_tf32(device, cfg.tf32)
    model.to(device)
    forward_model, eval_model = _forward_models(model, cfg, dist)
    progress = progress and (dist is None or dist.is_main)
    num_batches = _num_batches(train_loader, cfg)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, num_batches)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    mixup = build_mixup(cfg, num_classes)
    criterion: nn.Module = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    state = TrainState(model, optimizer, scheduler, scaler, cfg.to_dict(), static_metrics=dict(static_metrics or {}))
    if resume is not None:
        restore_checkpoint(state, resume)
    else:
        seed_everything(cfg.seed)
    if cfg.eval_at_start:
        state.static_metrics.update(_swap_metrics(state, resume is not None, eval_model, val_loader, device, cfg,
                                                  autocast_dtype, eval_batch_transform, dist))
    for cb in callbacks:
        cb.on_fit_start(state)

    status = "finished" if state.epoch >= cfg.epochs else "running"
    while state.epoch < cfg.epochs and not state.should_stop:
        _set_epoch(train_loader, state.epoch)
        epoch_start = time.perf_counter()
        with track_memory(device=device) as memory:  # peak over training and evaluation
            train, diverged = train_one_epoch(
                state, forward_model, train_loader, criterion, cfg, device=device, num_batches=num_batches,
                num_classes=num_classes, autocast_dtype=autocast_dtype, mixup=mixup,
                batch_transform=train_batch_transform, callbacks=callbacks, progress=progress, dist=dist,
            )
            val, diverged = _validate(eval_model, val_loader, device, cfg, autocast_dtype, eval_batch_transform,
                                      dist, diverged)
        state.epoch += 1
        metrics = _reduced_epoch_metrics(state, train, val, memory.metrics(), time.perf_counter() - epoch_start,
                                         device, cfg, dist)
        if diverged:
            state.should_stop, state.stop_reason = True, "diverged"
        status = "diverged" if diverged else ("finished" if state.epoch >= cfg.epochs else "running")
        metrics["status"] = status
        state.history.append(metrics)
        for cb in callbacks:
            cb.on_epoch_end(state, metrics)
        if dist is None or dist.is_main:
            _logger.info("%s", epoch_summary(metrics, cfg.epochs, cfg.topk))
    return _end_fit(state, status, callbacks)
