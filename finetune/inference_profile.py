"""Inference profile of a model on one device: latency at batch 1, throughput at a large batch, and peak
inference memory at batch 1, 32, 64 and 128 (``infer/*`` metrics).

Measured once per run, after its last epoch (`InferenceProfileCallback`, which adds the metrics to the
final epoch's, so Ray, TensorBoard, result.json and the report get them), and by
``vitsweep eval --profile`` for any weights. Every forward pass runs in eval mode under
`torch.inference_mode`, eager (not `torch.compile`d), in the run's autocast precision, on a random
input of the model's size from a private generator (the run's RNG streams are not touched).

- ``infer/latency_b1_ms``: the median of `LatencySettings.repeats` timed batch-1 forwards after
  `warmup` untimed ones (CUDA events on a GPU, ``perf_counter`` elsewhere).
- ``infer/img_s`` at ``infer/img_s_batch``: on CUDA the largest power of two up to `MAX_CUDA_BATCH`
  that fits. The probe doubles the batch from 1; it stops before a batch whose predicted peak (twice the
  previous batch's activation memory) would exceed what the device has free, and a
  `torch.cuda.OutOfMemoryError` that still happens backs off to the previous batch after the memory is
  released, so a neighbour sharing the GPU is not pushed over and the run never fails here. Elsewhere a
  fixed `CPU_THROUGHPUT_BATCH` (32: small enough for a CI machine).
- ``infer/peak_mem_b{1,32,64,128}_mb``: on CUDA measured, ``max_memory_allocated`` during one forward
  minus what was allocated before it, plus the model's own parameters and buffers (so the figure does
  not include a training run's optimiser state); a batch that does not fit is None. Elsewhere the
  analytic model `analytic_inference_bytes`. ``infer/mem_source`` says which: ``cuda`` or ``analytic``.
- ``infer/profile_s``: the wall time of the whole profile (what it added to the run).

Why by hand: timm's ``benchmark.py`` measures one batch size per process and exits on OOM; torch's
benchmark utilities time statements but neither probe a batch that fits nor hold the memory contract.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from .callbacks import Callback, TrainState
from .models.attention import AttentionBase

MEMORY_BATCHES = (1, 32, 64, 128)
CPU_THROUGHPUT_BATCH = 32
MAX_CUDA_BATCH = 4096
CUDA_HEADROOM = 0.9  # of the free memory a probed batch may be predicted to use
METRIC_KEYS = ("infer/latency_b1_ms", "infer/img_s", "infer/img_s_batch",
               *(f"infer/peak_mem_b{b}_mb" for b in MEMORY_BATCHES), "infer/mem_source", "infer/profile_s")


@dataclass(frozen=True)
class LatencySettings:
    """Untimed warm-up forwards, then timed ones (the median is reported)."""

    warmup: int
    repeats: int
    throughput_warmup: int
    throughput_repeats: int


CPU_SETTINGS = LatencySettings(warmup=2, repeats=5, throughput_warmup=1, throughput_repeats=2)
CUDA_SETTINGS = LatencySettings(warmup=10, repeats=50, throughput_warmup=3, throughput_repeats=10)


def _mb(n_bytes: Optional[float]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / 2**20


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


class _Runner:
    """Forward passes of `model` on random `[B, 3, H, W]` inputs on `device`, timed and memory-measured."""

    def __init__(self, model: torch.nn.Module, input_size: Sequence[int], device: torch.device,
                 autocast_dtype: Optional[torch.dtype]):
        self.model = model
        self.input_size = tuple(int(s) for s in input_size)  # (3, H, W)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.generator = torch.Generator(device=device).manual_seed(0)

    def input(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, *self.input_size, device=self.device, generator=self.generator)  # (B, 3, H, W)

    def forward(self, x: torch.Tensor) -> None:
        cast = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None else contextlib.nullcontext())
        with cast:
            self.model(x)

    def timed(self, x: torch.Tensor, warmup: int, repeats: int) -> List[float]:
        """Seconds per forward of `x`, `repeats` times after `warmup` untimed forwards."""
        for _ in range(warmup):
            self.forward(x)
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.forward(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times
        for _ in range(repeats):
            start = time.perf_counter()
            self.forward(x)
            times.append(time.perf_counter() - start)
        return times

    def cuda_peak_bytes(self, batch: int) -> Optional[int]:
        """Activation bytes of one forward at `batch` (peak allocated minus what was allocated before,
        the input included); None when it does not fit (the memory is released first)."""
        failed = False
        try:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            x = self.input(batch)
            self.forward(x)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
            del x
        except torch.cuda.OutOfMemoryError:
            failed = True  # leave the except block first: its traceback pins the failed forward's tensors
        if failed:
            _release(self.device)
            return None
        return int(peak)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def analytic_inference_bytes(model: torch.nn.Module, input_size: Sequence[int], batch: int,
                             dtype_bytes: int = 4) -> Optional[int]:
    """Peak memory of one inference forward at `batch`, from the architecture (no measurement).

    The model's parameters and buffers, the fp32 input batch, plus `batch` times the largest set of
    activations live at once in one block, per image (N tokens, C width, M MLP hidden width; ``b``
    bytes per activation element, 2 under bf16/fp16 autocast):
    attention ``(N C [residual] + 3 N C [qkv] + N C [output]) b`` plus the attention core's working
    memory (the variant's `activation_bytes` model, SDPA's fused kernels for softmax), or MLP
    ``(N C + 2 N M) b`` (fc1's output and its activation coexist). Allocator rounding and the CUDA
    context are not included. None when the model has no attention variant with a memory model (a
    plug-in may declare none).
    """
    attentions = [m for m in model.modules() if isinstance(m, AttentionBase) and m.num_tokens is not None]
    if not attentions:
        return None
    peak_per_image = 0
    for attn in attentions:
        N, C, H, D = attn.num_tokens, attn.num_heads * attn.head_dim, attn.num_heads, attn.head_dim
        core = type(attn).activation_bytes(N, D, H, dtype_bytes=dtype_bytes, fused=True,
                                           num_prefix_tokens=attn.num_prefix_tokens, **attn.hparam_values())
        if core is None:
            return None
        peak_per_image = max(peak_per_image, 5 * N * C * dtype_bytes + int(core))
    hidden = [m.fc1.out_features for m in model.modules() if hasattr(m, "fc1") and hasattr(m.fc1, "out_features")]
    N, C = attentions[0].num_tokens, attentions[0].num_heads * attentions[0].head_dim
    for m in hidden:
        peak_per_image = max(peak_per_image, (N * C + 2 * N * m) * dtype_bytes)
    image_bytes = 4 * int(torch.Size(input_size).numel())
    return model_bytes(model) + batch * (image_bytes + peak_per_image)


def analytic_attention_training_bytes(model: torch.nn.Module, batch: int, dtype_bytes: int = 4) -> Optional[int]:
    """Bytes the attention cores of all blocks save for the backward pass at `batch` (the variants'
    `activation_bytes` models, checked against the tensors autograd saves in tests/test_attention_cost.py):
    the part of training memory that depends on the attention variant. None when a variant declares no
    model."""
    total = 0
    for attn in model.modules():
        if isinstance(attn, AttentionBase) and attn.num_tokens is not None:
            core = type(attn).activation_bytes(
                attn.num_tokens, attn.head_dim, attn.num_heads, dtype_bytes=dtype_bytes,
                fused=bool(getattr(attn, "fused_attn", True)), num_prefix_tokens=attn.num_prefix_tokens,
                **attn.hparam_values())
            if core is None:
                return None
            total += int(core)
    return batch * total if total else None


def analytic_memory_metrics(model: torch.nn.Module, batch_size: int, autocast_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """``memory/attn_train_analytic_mb``: `analytic_attention_training_bytes` at the run's batch size and
    precision, in MB (a figure on every device; the measured peak is CUDA-only)."""
    dtype_bytes = 2 if autocast_dtype in (torch.bfloat16, torch.float16) else 4
    return {"memory/attn_train_analytic_mb": _mb(analytic_attention_training_bytes(model, batch_size, dtype_bytes))}


def _median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


def _cuda_throughput(runner: _Runner, settings: LatencySettings) -> Dict[str, Any]:
    """The largest power-of-two batch that fits (at most MAX_CUDA_BATCH) and its images per second."""
    device = runner.device
    fits, batch, last_peak = 0, 1, None
    while batch <= MAX_CUDA_BATCH:
        if last_peak is not None:
            free, _ = torch.cuda.mem_get_info(device)
            spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if 2 * last_peak > CUDA_HEADROOM * (free + spare):
                break  # predicted not to fit: never push the device (or a neighbour on it) into OOM
        peak = runner.cuda_peak_bytes(batch)
        if peak is None:
            break
        fits, last_peak, batch = batch, peak, batch * 2
    while fits >= 1:
        oom = False
        try:
            x = runner.input(fits)
            times = runner.timed(x, settings.throughput_warmup, settings.throughput_repeats)
            del x
        except torch.cuda.OutOfMemoryError:
            oom = True
        if not oom:
            return {"infer/img_s": fits / statistics.median(times), "infer/img_s_batch": fits}
        _release(device)
        fits //= 2
    return {"infer/img_s": None, "infer/img_s_batch": None}


def _memory(runner: _Runner, dtype_bytes: int) -> Dict[str, Any]:
    if runner.device.type == "cuda":
        weights = model_bytes(runner.model)
        out = {}
        for b in MEMORY_BATCHES:
            peak = runner.cuda_peak_bytes(b)
            out[f"infer/peak_mem_b{b}_mb"] = _mb(None if peak is None else weights + peak)
        return {**out, "infer/mem_source": "cuda"}
    return {**{f"infer/peak_mem_b{b}_mb": _mb(analytic_inference_bytes(runner.model, runner.input_size, b, dtype_bytes))
               for b in MEMORY_BATCHES}, "infer/mem_source": "analytic"}


def inference_profile(model: torch.nn.Module, input_size: Sequence[int], device: torch.device | str,
                      autocast_dtype: Optional[torch.dtype] = None,
                      settings: Optional[LatencySettings] = None) -> Dict[str, Any]:
    """The ``infer/*`` metrics of `model` (already on `device`) for inputs of `input_size` (3, H, W).

    The model is put in eval mode for the measurement and back in its previous mode after. On CUDA an
    out-of-memory error at any batch is caught (that figure is None); no exception of the measured
    forward passes is swallowed otherwise.
    """
    start = time.perf_counter()
    device = torch.device(device)
    settings = settings or (CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS)
    dtype_bytes = 2 if autocast_dtype in (torch.bfloat16, torch.float16) else 4
    runner = _Runner(model, input_size, device, autocast_dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            latency = {"infer/latency_b1_ms": _median_ms(runner.timed(runner.input(1), settings.warmup, settings.repeats))}
            if device.type == "cuda":
                throughput = _cuda_throughput(runner, settings)
            else:
                times = runner.timed(runner.input(CPU_THROUGHPUT_BATCH), settings.throughput_warmup,
                                     settings.throughput_repeats)
                throughput = {"infer/img_s": CPU_THROUGHPUT_BATCH / statistics.median(times),
                              "infer/img_s_batch": CPU_THROUGHPUT_BATCH}
            memory = _memory(runner, dtype_bytes)
    finally:
        model.train(was_training)
        _release(device)
    return {**latency, **throughput, **memory, "infer/profile_s": time.perf_counter() - start}


class InferenceProfileCallback(Callback):
    """Adds `inference_profile`'s metrics to the last epoch's metrics (status ``finished``), before the
    callbacks after it (TensorBoard, checkpoints, Ray's report) see them; it must come first. A diverged
    or stopped run has no profile. The gradients are set to None first (the loop does so at every step
    anyway), so that their memory is free for the throughput probe."""

    def __init__(self, input_size: Sequence[int], device: torch.device, autocast_dtype: Optional[torch.dtype]):
        self.input_size = tuple(input_size)
        self.device = device
        self.autocast_dtype = autocast_dtype

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        if metrics.get("status") != "finished":
            return
        state.optimizer.zero_grad(set_to_none=True)
        metrics.update(inference_profile(state.model, self.input_size, self.device, self.autocast_dtype))


__all__ = ["InferenceProfileCallback", "analytic_attention_training_bytes", "analytic_memory_metrics", "LatencySettings", "METRIC_KEYS", "MEMORY_BATCHES", "CPU_THROUGHPUT_BATCH",
           "analytic_inference_bytes", "inference_profile", "model_bytes"]
