"""Where an epoch's training time goes: waiting for the next batch, or the model step.

Two figures per epoch, next to the end-to-end ``throughput/train_img_s`` (images over the epoch's
training wall time, `finetune.metrics.Throughput`):

- ``time/data_wait_frac``: the fraction of that wall time spent waiting for the next batch: the
  loader's ``next()`` (decoding and augmenting in the main process, or waiting for workers) and the
  copy to the device. timm's ``data_time / batch_time``, summed over the epoch.
- ``throughput/compute_img_s``: images per second of the model step alone (Mixup, forward, backward,
  optimiser step).

The decode-once cache path's batch transform (crop, flip, jitter, normalise; `finetune.data.gpu_transforms`)
runs on the training device after the copy and counts in neither figure: it is device work, not a
wait, and on a GPU a few elementwise kernels. On a CPU it competes with the model for the same cores,
which shows as ``train_img_s`` below what the two figures explain. On CPU it is timed with `time.perf_counter`; on CUDA with a pair of CUDA events
  around each step, read after the epoch's final synchronisation (`Throughput` synchronises at both
  ends), so no step adds a host sync. Host-side waits need no event: without a per-step sync the host
  runs ahead of the GPU and blocks only in ``next()`` (data-bound) or in a kernel launch once the
  launch queue is full (compute-bound), so the time in ``next()`` is the time the GPU may starve.

A run is *data-bound* when its data wait is at least `DATA_BOUND_THRESHOLD`: its img/s then measures
the input pipeline, not the attention variant, and comparing variants by it would compare JPEG decoders.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

# A run waiting for data at least this fraction of its training wall time is data-bound: 30 % of the
# time (and more) the model had nothing to do, so its throughput is the pipeline's, not the model's.
DATA_BOUND_THRESHOLD = 0.3
DATA_WAIT = "time/data_wait_frac"
COMPUTE_IMG_S = "throughput/compute_img_s"
DATA_BOUND_FIX = ("train from the decode-once cache (`vitsweep data cache --data SPEC --out DIR`, then "
                  "--data cache:DIR) or give the loader more workers (--num-workers)")


class EpochTiming:
    """Accumulates one epoch's data wait and model-step time (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.data_s = 0.0
        self._step_s = 0.0
        self._events: List[Tuple[Any, Any]] = []

    def timed(self, iterable: Iterable) -> Iterator:
        """The items of `iterable`, the time spent in each ``next()`` added to the data wait."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.data_s += time.perf_counter() - start
                return
            self.data_s += time.perf_counter() - start
            yield item

    @contextmanager
    def data(self):
        """A block that readies a batch (copy to the device, batch transform): data wait."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_s += time.perf_counter() - start

    @contextmanager
    def step(self):
        """A block that runs the model step: CUDA events on CUDA (no sync), else wall time."""
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((begin, end))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._step_s += time.perf_counter() - start

    def step_seconds(self) -> float:
        """The model steps' total time; call after the epoch's final synchronisation on CUDA."""
        if self.cuda:
            return sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3
        return self._step_s

    def metrics(self, images: int, wall_seconds: float) -> dict:
        """``time/data_wait_frac`` (0..1) and ``throughput/compute_img_s`` for `images` over `wall_seconds`."""
        step = self.step_seconds()
        frac = min(1.0, self.data_s / wall_seconds) if wall_seconds > 0 else 0.0
        return {DATA_WAIT: frac, COMPUTE_IMG_S: images / step if step > 0 else 0.0}


def is_data_bound(metrics: Mapping[str, Any]) -> bool:
    """The epoch's metrics say it waited for data at least `DATA_BOUND_THRESHOLD` of its time."""
    value = metrics.get(DATA_WAIT)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= DATA_BOUND_THRESHOLD


def data_bound_line(metrics: Mapping[str, Any]) -> Optional[str]:
    """The line `vitsweep train` prints at the end of a data-bound run (None when it is not)."""
    if not is_data_bound(metrics):
        return None
    return (f"data-bound: {100 * metrics[DATA_WAIT]:.0f}% of the training time went to waiting for the next batch "
            f"(threshold {100 * DATA_BOUND_THRESHOLD:.0f}%): {metrics.get('throughput/train_img_s', 0):.0f} img/s end to "
            f"end vs {metrics.get(COMPUTE_IMG_S, 0):.0f} img/s for the model step alone; {DATA_BOUND_FIX}")
