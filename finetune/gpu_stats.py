"""What the GPU itself says: NVML memory sampled over a block, and each GPU model's datasheet peak.

NVML memory. `torch.cuda.max_memory_reserved` sees only the caching allocator; the driver also holds
the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers. NVML reports those, but only as a current
value, so a `PeakSampler` thread reads it every `interval_s` (50 ms) while the epoch runs and keeps
the maximum. The process's own figure is found by PID; inside a container NVML lists host PIDs and
this process is not among them, so the device-level used memory (every process on the GPU) is kept
as well, and `nvml_peak` picks the process figure where there is one and labels the source.

Peaks. `peak_tflops(name, precision)` looks a GPU up by the name CUDA reports
(`torch.cuda.get_device_name`): dense (no 2:4 sparsity) tensor-core TFLOP/s from the vendor's data
sheets. An unknown GPU gets None, and MFU is then reported as null with a note, never guessed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- datasheet peaks
# Dense TFLOP/s per precision: bf16 / fp16 tensor cores with fp32 accumulation, tf32 tensor cores, fp32
# CUDA cores. Data sheets quote bf16/fp16/tf32 "with sparsity" (marked *): the dense figure is half.
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 1979* / 1513* / 1671*,
#       TF32 989* / 756* / 835*, FP32 67 / 51 / 60.
#   H200 SXM / NVL: NVIDIA H200 datasheet (2024): BF16 1979* / 1671*, TF32 989* / 835*, FP32 67 / 60.
#   GH200: the H100 SXM's tensor cores (NVIDIA GH200 Grace Hopper datasheet: FP32 67, BF16 1979*).
#   A100 40 GB and 80 GB, SXM and PCIe: NVIDIA A100 datasheet: BF16 312, TF32 156, FP32 19.5 (dense).
#   L40S: NVIDIA L40S datasheet: BF16 362.05 (733*), TF32 183 (366*), FP32 91.6.
#   L40: NVIDIA L40 datasheet: BF16 181.05 (362.1*), TF32 90.5 (181*), FP32 90.5.
#   L4: NVIDIA L4 datasheet: BF16 242*, TF32 120*, FP32 30.3.
#   A10: NVIDIA A10 datasheet: BF16 125 (250*), TF32 62.5 (125*), FP32 31.2. (A10G is another chip.)
#   V100 SXM2 / PCIe / V100S: NVIDIA V100 datasheet: tensor (fp16) 125 / 112 / 130, FP32 15.7 / 14 /
#       16.4; no bf16, no tf32.
#   RTX 4090: NVIDIA Ada GPU architecture whitepaper, appendix: FP16/BF16 tensor with FP32 accumulate
#       165.2 (330.3*), TF32 82.6, FP32 82.6.
#   RTX 3090: NVIDIA Ampere GA102 whitepaper: FP16/BF16 tensor with FP32 accumulate 71, TF32 35.6,
#       FP32 35.6.
#   RTX A6000: NVIDIA RTX A6000 datasheet: tensor 309.7* (154.8 dense), FP32 38.7.
# (name pattern, label, {precision: dense TFLOP/s}); the first pattern that matches wins, so the
# specific forms (H100 PCIe, H100 NVL) come before the general one (H100 = SXM).
_HOPPER_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
_HOPPER_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
GPU_PEAKS: Tuple[Tuple[str, str, Dict[str, float]], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", _HOPPER_NVL),
    (r"\bH100\b", "H100 SXM", _HOPPER_SXM),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", _HOPPER_NVL),
    (r"\bH200\b", "H200 SXM", _HOPPER_SXM),
    (r"\bGH200\b", "GH200", _HOPPER_SXM),
    (r"\bA100\b.*80\s*GB", "A100 80GB", _A100),
    (r"\bA100\b", "A100 40GB", _A100),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bV100S\b", "V100S", {"fp16": 130.0, "fp32": 16.4}),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bRTX 4090\b", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX 3090\b", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bRTX A6000\b", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
)
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def gpu_model(name: str) -> Optional[str]:
    """The table's label for a CUDA device name (``"NVIDIA H100 PCIe"`` -> ``"H100 PCIe"``), or None."""
    for pattern, label, _ in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return None


def peak_tflops(name: str, precision: str) -> Optional[float]:
    """Dense datasheet TFLOP/s of the GPU called `name` at `precision` (bf16, fp16, tf32, fp32), or
    None for an unknown GPU or a precision it has no tensor cores for (V100 bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    for pattern, _, peaks in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks.get(precision)
    return None


def matmul_precision(precision: str, tf32: bool) -> str:
    """The precision the model's matmuls run at: autocast's dtype, else tf32 where TF32 is on."""
    return "tf32" if precision == "fp32" and tf32 else precision


# ----------------------------------------------------------------------------- NVML sampling
@dataclass(frozen=True)
class NvmlReading:
    """One NVML read in MiB: this process's memory (None where NVML does not list its PID) and the
    whole device's used memory (None where NVML cannot read the device)."""

    process_mb: Optional[float]
    device_mb: Optional[float]


class PeakSampler:
    """Runs `read()` every `interval_s` seconds on a daemon thread between `start()` and `stop()`
    (once more at each end, so a block shorter than one interval still gets two readings) and keeps
    the maximum of each field. A `read` that raises stops the sampling; the peaks so far stay."""

    def __init__(self, read: Callable[[], NvmlReading], interval_s: float = 0.05):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r}; allowed: > 0")
        self.read, self.interval_s = read, interval_s
        self.process_peak_mb: Optional[float] = None
        self.device_peak_mb: Optional[float] = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failed = False

    def _sample(self) -> None:
        if self._failed:
            return
        try:
            reading = self.read()
        except Exception as err:  # NVML gone mid-run (driver reset): keep what was read
            _logger.debug("NVML sampling stopped: %s", err)
            self._failed = True
            return
        self.samples += 1
        if reading.process_mb is not None:
            self.process_peak_mb = max(self.process_peak_mb or 0.0, reading.process_mb)
        if reading.device_mb is not None:
            self.device_peak_mb = max(self.device_peak_mb or 0.0, reading.device_mb)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "PeakSampler":
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="vitsweep-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "PeakSampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        return self

    def __enter__(self) -> "PeakSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def nvml_peak(process_mb: Optional[float], device_mb: Optional[float]) -> Tuple[Optional[float], Optional[str]]:
    """(peak MiB, source): this process's figure (``"process"``) where NVML lists it, else the
    device-level used memory (``"device"``: every process on the GPU, as inside a container), else
    (None, None)."""
    if process_mb is not None:
        return process_mb, "process"
    if device_mb is not None:
        return device_mb, "device"
    return None, None


def nvml_reader(device_index: int, uuid: str) -> Optional[Callable[[], NvmlReading]]:
    """A function reading NVML for the GPU with this CUDA `uuid`, or None where NVML (pynvml) is not
    installed or cannot open the device."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except pynvml.NVMLError as err:
        _logger.debug("NVML unavailable for cuda:%d: %s", device_index, err)
        return None
    pid = os.getpid()

    def read() -> NvmlReading:
        process = None
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    process = proc.usedGpuMemory / 2**20
        except pynvml.NVMLError:  # some drivers / vGPUs refuse the process list: the device figure stays
            pass
        return NvmlReading(process, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)

    return read
