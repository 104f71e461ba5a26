"""Metrics under the names Ray, TensorBoard, result.json and the report share: accuracy, parameter
counts, FLOPs, memory, throughput.

Cost counters: `torch.utils.flop_counter.FlopCounterMode` (FLOPs; a multiply-add counts 2) and fvcore
(MACs). Neither counts the CPU SDPA kernel, so counting switches timm's `fused_attn` off and runs the
readable path, which has the same math (`finetune.models.readable_attention`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional, Sequence

import torch

from .errors import MetricError
from .gpu_stats import peak_tflops
from .models import readable_attention
from .models.attention import AttentionBase
from .profiling import NOT_AVAILABLE, MemoryTracker, count_flops as flop_counted  # noqa: F401 (re-exported)

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- accuracy
def check_topk(topk: Sequence[int], num_classes: int) -> None:
    bad = [k for k in topk if k > num_classes]
    if bad:
        raise MetricError(f"topk={list(topk)}: k={bad[0]} is larger than the {num_classes} classes; allowed: 1..{num_classes}")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int]) -> torch.Tensor:
    """Correct predictions per k, on the logits' device (no host sync). logits: [B, K], target: [B]."""
    maxk = max(topk)
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target.unsqueeze(1))  # (B, maxk)
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in topk])  # (len(topk),)


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Top-k accuracy in [0, 1] for each k."""
    check_topk(topk, logits.shape[1])
    correct = topk_correct(logits, target, topk).tolist()
    return {k: c / max(1, target.numel()) for k, c in zip(topk, correct)}


# ----------------------------------------------------------------------------- cost
def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for _, p in model.named_parameters())
    trainable = sum(p.numel() for _, p in model.named_parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def _example_input(model: torch.nn.Module, img_size: Sequence[int]) -> torch.Tensor:
    param = next(model.parameters())
    return torch.zeros(1, 3, *img_size, device=param.device, dtype=param.dtype)


def uncounted_attention_flops(model: torch.nn.Module) -> int:
    """FLOPs the counters cannot see: attention variants that do multiply-adds elementwise
    (atrous_linear's shifted window products), from each variant's analytic `uncounted_flops`
    (0 for a variant that declares none)."""
    total = 0
    for module in model.modules():
        if isinstance(module, AttentionBase) and module.num_tokens is not None:
            total += type(module).uncounted_flops(
                module.num_tokens, module.head_dim, module.num_heads,
                num_prefix_tokens=module.num_prefix_tokens, **module.hparam_values(),
            )
    return int(total)


def count_flops(model: torch.nn.Module, img_size: Sequence[int]) -> int:
    """Forward FLOPs for one image (FlopCounterMode; 2 per multiply-add), plus the analytic count of
    what it cannot see (`uncounted_attention_flops`)."""
    @flop_counted
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    was_training = model.training
    model.eval()
    try:
        with readable_attention(model), torch.no_grad():
            counted = forward(_example_input(model, img_size))
    finally:
        model.train(was_training)
    return counted.flops.total + uncounted_attention_flops(model)


def count_macs_fvcore(model: torch.nn.Module, img_size: Sequence[int]) -> Optional[int]:
    """Forward MACs for one image by fvcore's jit-traced counter (plus the analytic uncounted part);
    None where fvcore is not installed."""
    import warnings

    try:
        with warnings.catch_warnings():
            # fvcore.nn scripts a loss with torch.jit.script at import (deprecated in torch >= 2.9)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")
            from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None

    was_training = model.training
    model.eval()
    try:
        with readable_attention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's jit tracer warns about deprecated torch.jit APIs
            analysis = FlopCountAnalysis(model, _example_input(model, img_size))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        model.train(was_training)
    return int(total) + uncounted_attention_flops(model) // 2


def cost_metrics(model: torch.nn.Module, img_size: Sequence[int], *, cache: bool = False) -> Dict[str, Optional[float]]:
    """``cost/params``, ``cost/gflops`` (torch counter) and ``cost/gmacs`` (fvcore, if installed).

    With `cache`, the two counts (a traced forward pass each, 0.3-0.5 s for a small ViT on a CPU, plus
    fvcore's import in a fresh process) are looked up by the model's architecture first
    (`architecture_key`): in this process, then on disk (`cost_cache_dir`), so a sweep counts each
    architecture once instead of once per trial. Parameter counts are always counted.
    """
    params = count_parameters(model)
    key = architecture_key(model, img_size) if cache else None
    counts = _cached_counts(key) if key else None
    if counts is None:
        counts = {"flops": count_flops(model, img_size), "macs": count_macs_fvcore(model, img_size)}
        if key:
            _store_counts(key, counts)
    flops, macs = counts["flops"], counts["macs"]
    return {
        "cost/params": params["total"],
        "cost/trainable_params": params["trainable"],
        "cost/gflops": flops / 1e9,
        "cost/gmacs": macs / 1e9 if macs is not None else flops / 2e9,
        "cost/gmacs_source": "fvcore" if macs is not None else "flop_counter/2",
    }


# FLOP/MAC counts by architecture key: this process's, and the on-disk cache's directory.
_COUNTS: Dict[str, Dict[str, Optional[int]]] = {}
COST_CACHE_ENV = "VITSWEEP_COST_CACHE"  # a directory, or "off" (no on-disk cache)
COST_CACHE_FORMAT = "vitsweep-cost-counts-v2"  # v2: each entry carries the sha256 of its content


def cost_cache_dir() -> Optional[str]:
    """``$VITSWEEP_COST_CACHE`` (``off``: none), else ``$XDG_CACHE_HOME/vitsweep/cost`` or
    ``~/.cache/vitsweep/cost``."""
    value = os.environ.get(COST_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitsweep", "cost")


def _file_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _source_stamp(cls: type) -> str:
    """Where a module class is defined, with the file's size and mtime: an edited variant (a plug-in
    under development) is a new architecture for the cache."""
    import inspect

    try:
        return _file_stamp(inspect.getsourcefile(cls) or "")
    except (TypeError, OSError):
        return f"{cls.__module__}.{cls.__qualname__}"


def architecture_key(model: torch.nn.Module, img_size: Sequence[int]) -> str:
    """A digest of everything the FLOP and MAC counts depend on: every submodule's class (and its
    source file's stamp), its ``extra_repr``, an attention variant's hyperparameters and token count,
    every parameter's and buffer's name, shape and dtype, the input size, and the torch, timm and fvcore
    versions. Weights' values are not part of it (they do not change a count)."""
    import hashlib
    import importlib.metadata as md
    import json

    parts = []
    stamps = {"counter": _file_stamp(__file__)}  # this module counts: an edit to it recounts too
    for name, module in model.named_modules():
        cls = type(module)
        if cls not in stamps:
            stamps[cls] = _source_stamp(cls)
        entry = [name, f"{cls.__module__}.{cls.__qualname__}", module.extra_repr()]
        if isinstance(module, AttentionBase):
            entry += [repr(sorted(module.hparam_values().items())), module.num_tokens, module.num_prefix_tokens]
        parts.append(entry)
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    versions = {}
    for dist in ("torch", "timm", "fvcore"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    blob = json.dumps([parts, tensors, sorted(stamps.values()), list(img_size), versions, COST_CACHE_FORMAT],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _counts_digest(key: str, counts: Dict[str, Optional[int]]) -> str:
    """The sha256 a cache entry carries of its own content (format, key, flops, macs)."""
    import hashlib
    import json

    body = {"format": COST_CACHE_FORMAT, "key": key, "flops": counts["flops"], "macs": counts["macs"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _valid_count(value, optional: bool) -> bool:
    """A FLOP/MAC count: an int >= 0 (JSON has no NaN in an int; bools are not counts)."""
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _cached_counts(key: str) -> Optional[Dict[str, Optional[int]]]:
    """The counts of `key` from this process or the on-disk cache. An entry on disk is used only when it
    is a regular file (a FIFO would block the open), of this format and key, with counts >= 0 and the
    sha256 of its own content; anything else is counted again (and rewritten), with a warning that
    names the file when it was not merely absent."""
    import json

    from .errors import VitsweepError
    from .safe_files import open_regular

    if key in _COUNTS:
        return dict(_COUNTS[key])
    directory = cost_cache_dir()
    if directory is None:
        return None
    path = os.path.join(directory, f"{key}.json")
    if not os.path.lexists(path):
        return None
    problem = None
    try:
        with open_regular(path, "cost cache entry", VitsweepError, mode="r") as fh:
            data = json.loads(fh.read(1 << 16))
        flops, macs = data["flops"], data["macs"]
        if data.get("format") != COST_CACHE_FORMAT or data.get("key") != key:
            problem = "another format or key"
        elif not (_valid_count(flops, False) and _valid_count(macs, True)):
            problem = f"counts that are not integers >= 0 (flops={flops!r}, macs={macs!r})"
        elif data.get("sha256") != _counts_digest(key, {"flops": flops, "macs": macs}):
            problem = "content that does not match its own sha256"
    except VitsweepError as err:
        problem = str(err)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problem = f"an unreadable entry ({type(err).__name__}: {err})"
    if problem is not None:
        _logger.warning("cost cache entry %s ignored and counted again: %s", path, problem)
        return None
    _COUNTS[key] = {"flops": flops, "macs": macs}
    return dict(_COUNTS[key])


def _store_counts(key: str, counts: Dict[str, Optional[int]]) -> None:
    from .io_utils import write_json

    _COUNTS[key] = dict(counts)
    directory = cost_cache_dir()
    if directory is None:
        return
    entry = {"format": COST_CACHE_FORMAT, "key": key, **counts, "sha256": _counts_digest(key, counts)}
    try:
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, f"{key}.json"), entry)
    except OSError as err:  # a read-only home: the per-process cache still works
        _logger.debug("cost cache %s not writable: %s", directory, err)


# ----------------------------------------------------------------------------- throughput
class Throughput:
    """Images per second over a block; synchronises CUDA at both ends so the time is real."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Throughput":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """Datasheet dense peak for this GPU and precision (bf16, fp16, tf32, fp32;
    `finetune.gpu_stats.GPU_PEAKS`), or None where unknown (CPUs, unlisted GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name(device), precision)


def mfu_metrics(device: torch.device, precision: str, forward_gflops: float, train_img_s: float) -> Dict[str, object]:
    """``throughput/mfu`` on a CUDA device (nothing on a CPU), and where the GPU is not in the peak
    table ``throughput/mfu`` None with ``throughput/mfu_note`` naming the device."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return {}
    peak = device_peak_tflops(device, precision)
    if peak is None:
        name = torch.cuda.get_device_name(device)
        return {"throughput/mfu": None,
                "throughput/mfu_note": f"no datasheet {precision} peak for {name!r} (finetune.gpu_stats.GPU_PEAKS)"}
    return {"throughput/mfu": model_flops_utilization(forward_gflops, train_img_s, peak)}


def model_flops_utilization(forward_gflops: float, train_img_s: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Training MFU: 3 x forward FLOPs per image (forward + backward) x images/s over the device peak."""
    if peak_tflops is None or not forward_gflops:
        return None
    return 3.0 * forward_gflops * 1e9 * train_img_s / (peak_tflops * 1e12)
