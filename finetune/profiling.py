"""Memory and FLOPs of any function, as decorators a notebook user puts on it; the loop uses the same.

    import vitsweep

    @vitsweep.track_memory
    def step(x):
        return model(x).sum().backward()

    out, memory = step(x)               # Tracked(result, memory): the function's result, then the figures
    memory.peak_allocated_mb            # torch's peak over the call (None on a CPU: not available)

    @vitsweep.count_flops(display=True)  # with options; prints FlopCounterMode's per-module table
    def forward(x):
        return model(x)

    logits, flops = forward(x)          # Counted(result, flops)
    flops.total, flops.gflops, flops.by_operator

Both work bare (``@track_memory``), with options (``@track_memory(device="cuda:1")``) and as
plain calls (``track_memory(fn, device=...)``). Figures: `MemoryStats` (torch's allocator peaks and
NVML's sampled peak, `finetune.gpu_stats`) and `FlopStats` (`torch.utils.flop_counter`, 2 FLOPs per
multiply-add; forward and backward alike: a backward inside the function is counted too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

import torch

from .gpu_stats import PeakSampler, nvml_peak, nvml_reader

NOT_AVAILABLE = None  # memory figures on a CPU: reported as "not available", never 0


# ----------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryStats:
    """Peak memory of one call, in MiB; None where the device has no such counter (CPU)."""

    device: str
    peak_allocated_mb: Optional[float]  # torch.cuda.max_memory_allocated: live tensors
    peak_reserved_mb: Optional[float]  # torch.cuda.max_memory_reserved: the caching allocator's pool
    peak_nvml_mb: Optional[float]  # NVML, sampled while the call ran: the driver's view (context, workspaces)
    nvml_source: Optional[str]  # "process" (this PID) or "device" (whole GPU: NVML cannot see this PID)

    def metrics(self) -> Dict[str, Optional[Union[float, str]]]:
        """The figures under the names result.json, Ray, TensorBoard and the report share."""
        return {
            "memory/peak_allocated_mb": self.peak_allocated_mb,
            "memory/peak_reserved_mb": self.peak_reserved_mb,
            "memory/peak_nvml_mb": self.peak_nvml_mb,
            "memory/peak_nvml_source": self.nvml_source,
        }


class MemoryTracker:
    """Peak device memory over a block: ``with MemoryTracker(device) as mem: ...; mem.metrics()``.

    torch's ``max_memory_allocated`` / ``max_memory_reserved`` after ``reset_peak_memory_stats``, and
    NVML's peak, sampled every `nvml_interval_s` by a background thread while the block runs
    (`finetune.gpu_stats.PeakSampler`): this process's figure where NVML lists its PID, else the
    device-level used memory, with ``memory/peak_nvml_source`` saying which (``process``/``device``).
    On a device without these counters every value is None ("not available").
    """

    def __init__(self, device: Union[str, torch.device], nvml_interval_s: float = 0.05):
        self.device = torch.device(device)
        self.nvml_interval_s = nvml_interval_s
        self.stats = MemoryStats(str(self.device), NOT_AVAILABLE, NOT_AVAILABLE, NOT_AVAILABLE, None)
        self._sampler: Optional[PeakSampler] = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> "MemoryTracker":
        if self.available:
            torch.cuda.reset_peak_memory_stats(self.device)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            read = nvml_reader(index, str(torch.cuda.get_device_properties(index).uuid))
            self._sampler = PeakSampler(read, self.nvml_interval_s).start() if read is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if not self.available:
            return
        nvml_mb, source = None, None
        if self._sampler is not None:
            self._sampler.stop()
            nvml_mb, source = nvml_peak(self._sampler.process_peak_mb, self._sampler.device_peak_mb)
            self._sampler = None
        self.stats = MemoryStats(str(self.device), torch.cuda.max_memory_allocated(self.device) / 2**20,
                                 torch.cuda.max_memory_reserved(self.device) / 2**20, nvml_mb, source)

    def metrics(self) -> Dict[str, Optional[Union[float, str]]]:
        return self.stats.metrics()


class Tracked(NamedTuple):
    """What a `track_memory`-decorated function returns: its own result, then the figures."""

    result: Any
    memory: MemoryStats


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _TrackMemory:
    """`track_memory(...)` with options: a decorator, and also a context manager giving the
    `MemoryTracker` of its block (``with track_memory(device=d) as mem: ...; mem.stats``)."""

    def __init__(self, device: Union[str, torch.device, None], nvml_interval_s: float):
        self.device, self.nvml_interval_s = device, nvml_interval_s
        self._tracker: Optional[MemoryTracker] = None

    def _new_tracker(self) -> MemoryTracker:
        return MemoryTracker(self.device if self.device is not None else _default_device(), self.nvml_interval_s)

    def __call__(self, f: Callable) -> Callable[..., Tracked]:
        if not callable(f):
            raise TypeError(f"expected a function to decorate, got {type(f).__name__}: {f!r}")

        @functools.wraps(f)
        def wrapper(*args, **kwargs) -> Tracked:
            with self._new_tracker() as tracker:
                result = f(*args, **kwargs)
            return Tracked(result, tracker.stats)
        return wrapper

    def __enter__(self) -> MemoryTracker:
        self._tracker = self._new_tracker().__enter__()
        return self._tracker

    def __exit__(self, *exc) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.__exit__(*exc)


def track_memory(fn: Optional[Callable] = None, *, device: Union[str, torch.device, None] = None,
                 nvml_interval_s: float = 0.05):
    """Decorate `fn` so each call returns ``Tracked(result, memory)``: the peak memory on `device`
    (default: the current CUDA device, else the CPU, where every figure is None) over the call, NVML
    sampled every `nvml_interval_s` seconds. With options only it is also a context manager:
    ``with track_memory(device=d) as tracker:`` (a `MemoryTracker`; ``tracker.stats`` after the block)."""
    deco = _TrackMemory(device, nvml_interval_s)
    return deco if fn is None else deco(fn)


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopStats:
    """FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` over one call (2 per multiply-add;
    ops it has no formula for, such as elementwise products, count 0)."""

    total: int
    by_operator: Dict[str, int]  # e.g. {"aten.mm": ..., "aten.bmm": ...}

    @property
    def gflops(self) -> float:
        return self.total / 1e9


class Counted(NamedTuple):
    """What a `count_flops`-decorated function returns: its own result, then the figures."""

    result: Any
    flops: FlopStats


def count_flops(fn: Optional[Callable] = None, *, display: bool = False, depth: int = 2):
    """Decorate `fn` so each call returns ``Counted(result, flops)``: the FLOPs of every torch op the
    call ran (forward, and backward where it runs one). `display` prints FlopCounterMode's table,
    `depth` module levels deep."""
    from torch.utils.flop_counter import FlopCounterMode

    def make(f: Callable, display, depth) -> Callable[..., Counted]:
        @functools.wraps(f)
        def wrapper(*args, **kwargs) -> Counted:
            with FlopCounterMode(display=display, depth=depth) as counter:
                result = f(*args, **kwargs)
            ops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
            return Counted(result, FlopStats(int(counter.get_total_flops()), ops))
        return wrapper

    if fn is None:
        return lambda f: make(f, display, depth)
    if not callable(fn):
        raise TypeError(f"expected a function to decorate, got {type(fn).__name__}: {fn!r}")
    return make(fn, display, depth)
