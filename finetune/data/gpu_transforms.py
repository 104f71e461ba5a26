"""Batched image transforms for the decode-once cache path: uint8 [B, 3, S, S] -> normalised float
[B, 3, h, w], run by the training loop on whatever device the batch is on (the GPU when there is one).

They reproduce timm's PIL pipeline on tensors:
- train (`BatchTrainTransform`): RandomResizedCrop (torchvision's sampling: 10 tries of scale/ratio,
  then the clamped centre crop; integer boxes), horizontal flip with probability `hflip`, ColorJitter
  brightness/contrast/saturation (one fixed order; torchvision shuffles it per image), normalisation.
- eval (`BatchEvalTransform`): resize to floor(input_size / crop_pct), centre crop, normalisation
  (timm's eval transform; on a square cache image shorter-side resize and 'squash' are the same).

Resampling: on CPU each crop is resized from uint8 with `F.interpolate(mode=<interpolation>,
antialias=True)` (torch's SIMD uint8 kernels; torchvision's tensor RandomResizedCrop does the same);
elsewhere one `torchvision.ops.roi_align` call resizes all crops (bilinear, averaging
ceil(crop / output) samples per output pixel so downscaling is antialiased), i.e. one kernel
instead of B. Either path can be forced with `resample=` ('loop' | 'roi').

Randomness comes from torch's global RNG of the batch's device (`torch.rand(..., device=x.device)`):
no private generator, so the RNG state a checkpoint saves (`finetune.checkpoint.rng_state`) fixes
the crops and flips of the epochs after a resume; on CPU a resumed run is identical.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..errors import DataError
from .preprocessing import Preprocessing

RATIO = (3 / 4, 4 / 3)
_TRIES = 10  # torchvision's RandomResizedCrop.get_params
_RESAMPLE = ("loop", "roi")
_GREY = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float] = RATIO,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for `batch` images at once, vectorised.

    Returns int64 [batch, 4] = (top, left, h, w), with 1 <= h <= height, 1 <= w <= width and the box
    inside the image. Draws from the global RNG of `device`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(batch, _TRIES, 2, device=device)  # (B, tries, [scale, log-ratio])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # (B, tries)
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(dim=1, keepdim=True)  # first valid try (0 when none is)
    w = w.gather(1, first).squeeze(1)  # (B,)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)
    # fallback: the whole image, with its aspect ratio clamped into `ratio`, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    pos = torch.rand(batch, 2, device=device)  # uniform top/left among the valid offsets
    top = (pos[:, 0] * (height - h + 1)).long().clamp_max(height - h)
    left = (pos[:, 1] * (width - w + 1)).long().clamp_max(width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


class _Normalize:
    """uint8 or float pixels in [0, 255] -> (x / 255 - mean) / std, as one multiply-add in fp32."""

    def __init__(self, mean, std) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache = {}

    def _constants(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            std = torch.tensor(self.std, device=device)
            self._cache[device] = ((1.0 / (255.0 * std)).view(1, 3, 1, 1), (-torch.tensor(self.mean, device=device) / std).view(1, 3, 1, 1))
        return self._cache[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_(x.float() if x.dtype != torch.float32 else x.clone())  # (B, 3, h, w) fp32

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """In place on float pixels in [0, 255]."""
        scale, bias = self._constants(x.device)
        return x.mul_(scale).add_(bias)

    def __getstate__(self):  # device constants are rebuilt where the transform runs
        return {"mean": self.mean, "std": self.std, "_cache": {}}


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise DataError(f"batch transforms take uint8 [B, 3, H, W] batches; got {x.dtype} {list(x.shape)}")


def _resize(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize; uint8 in and out on CPU (SIMD kernels), float in [0, 255] elsewhere."""
    if x.shape[-2:] == size:
        return x
    if x.device.type != "cpu" and x.dtype == torch.uint8:
        x = x.float()
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(x, size=size, mode=mode, antialias=smooth, align_corners=False if smooth else None)
    return out if out.dtype == torch.uint8 else out.clamp_(0, 255)  # bicubic overshoots


def _interp_mode(interpolation: str) -> str:
    modes = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "random": "bilinear"}
    if interpolation not in modes:
        raise DataError(f"interpolation={interpolation!r} has no tensor equivalent; allowed: {', '.join(modes)}")
    return modes[interpolation]


class BatchEvalTransform:
    """timm's eval transform on uint8 [B, 3, S, S]: resize to floor(size / crop_pct), centre crop
    `size`, normalise -> fp32 [B, 3, size, size]."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        if preprocessing.crop_mode not in ("center", "squash"):
            raise DataError(f"crop_mode={preprocessing.crop_mode!r} is not supported by the cache path; allowed: center, squash")
        self.out = tuple(preprocessing.input_size[1:])
        self.scale_size = tuple(math.floor(s / preprocessing.crop_pct) for s in self.out)
        self.mode = _interp_mode(preprocessing.interpolation)
        self.normalize = _Normalize(preprocessing.mean, preprocessing.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        x = _resize(x, self.scale_size, self.mode)  # (B, 3, H', W')
        top = int(round((x.shape[-2] - self.out[0]) / 2.0))  # torchvision's center_crop offsets
        left = int(round((x.shape[-1] - self.out[1]) / 2.0))
        x = x[..., top : top + self.out[0], left : left + self.out[1]]  # (B, 3, h, w)
        return self.normalize(x)


class BatchTrainTransform:
    """timm's training transform on uint8 [B, 3, S, S] -> fp32 [B, 3, h, w] (see the module doc).

    Args:
        preprocessing: input_size, interpolation, scale, hflip, color_jitter, mean, std.
        resample: 'loop' (per-crop `F.interpolate`), 'roi' (one `roi_align`), or None: 'loop' on
            CPU, 'roi' elsewhere.
        threads: CPU threads sharing the 'loop' resizes (torch kernels release the GIL); None:
            `torch.get_num_threads()` at call time. Crops and flips are drawn before the work is
            split, so the output does not depend on it.
    """

    def __init__(self, preprocessing: Preprocessing, resample: Optional[str] = None, threads: Optional[int] = None) -> None:
        if resample is not None and resample not in _RESAMPLE:
            raise DataError(f"resample={resample!r}; allowed: {', '.join(_RESAMPLE)}")
        if threads is not None and threads < 1:
            raise DataError(f"threads={threads} must be >= 1")
        self.threads = threads
        self._pool = None
        self.out = tuple(preprocessing.input_size[1:])
        self.mode = _interp_mode(preprocessing.interpolation)
        self.scale = tuple(preprocessing.scale)
        self.hflip = float(preprocessing.hflip)
        self.jitter = float(preprocessing.color_jitter or 0.0)
        self.resample = resample
        self.normalize = _Normalize(preprocessing.mean, preprocessing.std)
        self._grey = {}  # device -> (1, 3, 1, 1) grey weights, built once per device (no per-batch host copy)

    def __call__(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: uint8 (B, 3, S, S) -> fp32 (B, 3, h, w); `out`, if given, receives the result (e.g. a
        shared-memory buffer in a DataLoader worker, saving a copy)."""
        _check_batch(x)
        b, _, height, width = x.shape
        boxes = sample_crop_boxes(b, height, width, self.scale, RATIO, x.device)  # (B, 4)
        flip = torch.rand(b, device=x.device) < self.hflip  # (B,)
        resample = self.resample or ("loop" if x.device.type == "cpu" else "roi")
        if resample == "loop" and self.jitter == 0:
            return self._loop(x, boxes, flip, normalize=True, out=out)
        crops = self._loop(x, boxes, flip, normalize=False) if resample == "loop" else self._roi(x, boxes, flip)
        if self.jitter > 0:
            crops = self._color_jitter(crops.float())  # (B, 3, h, w) in [0, 255]
        result = self.normalize(crops)
        return result if out is None else out.copy_(result)

    def _loop(
        self, x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, normalize: bool, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Per-crop resize into a preallocated float batch; each image is flipped and (optionally)
        normalised while it is still in cache, instead of in extra passes over the whole batch."""
        shape = (x.shape[0], 3) + self.out  # (B, 3, h, w)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=x.device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32:
            raise DataError(f"out must be float32 {list(shape)}; got {out.dtype} {list(out.shape)}")
        jobs = list(zip(range(x.shape[0]), boxes.tolist(), flip.tolist()))

        def run(part) -> None:
            for i, (top, left, h, w), mirrored in part:
                crop = _resize(x[i : i + 1, :, top : top + h, left : left + w], self.out, self.mode)  # (1, 3, h, w)
                out[i : i + 1].copy_(crop.flip(-1) if mirrored else crop)
                if normalize:
                    self.normalize.apply_(out[i : i + 1])

        threads = min(len(jobs), self.threads or torch.get_num_threads()) if x.device.type == "cpu" else 1
        if threads <= 1:
            run(jobs)
        else:
            list(self._thread_pool(threads).map(run, [jobs[k::threads] for k in range(threads)]))
        return out

    def _thread_pool(self, threads: int):
        key = (os.getpid(), threads)  # a forked child inherits the pool object but not its threads
        if self._pool is None or self._pool[0] != key:
            self._pool = (key, ThreadPoolExecutor(threads, thread_name_prefix="batch-transform"))
        return self._pool[1]

    def __getstate__(self):  # a thread pool does not pickle; device constants are rebuilt where it runs
        return {**self.__dict__, "_pool": None, "_grey": {}}

    def _grey_weights(self, device: torch.device) -> torch.Tensor:
        """(1, 3, 1, 1) `_GREY` on `device`: a tensor from Python constants on a GPU is a host-to-device
        copy (and a sync), so it is made once per device, not once per batch."""
        weights = self._grey.get(device)
        if weights is None:
            weights = self._grey[device] = torch.tensor(_GREY, device=device).view(1, 3, 1, 1)
        return weights

    def _roi(self, x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        top, left, h, w = boxes.to(torch.float32).unbind(1)
        idx = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)
        rois = torch.stack([idx, left, top, left + w, top + h], dim=1)  # (B, 5): index, x1, y1, x2, y2
        # aligned=True: pixel k spans [k, k+1), so the box covers exactly the integer crop
        out = roi_align(x.float(), rois, self.out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)

    def _color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter(brightness=j, contrast=j, saturation=j) on float [B, 3, h, w] in [0, 255]."""
        b = x.shape[0]
        f = 1.0 + self.jitter * (2 * torch.rand(3, b, 1, 1, 1, device=x.device) - 1)  # factors in [1-j, 1+j]
        grey_w = self._grey_weights(x.device)  # (1, 3, 1, 1)
        x = (x * f[0]).clamp_(0, 255)  # brightness
        grey_mean = (x * grey_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (f[1] * x + (1 - f[1]) * grey_mean).clamp_(0, 255)  # contrast
        grey = (x * grey_w).sum(1, keepdim=True)  # (B, 1, h, w)
        return (f[2] * x + (1 - f[2]) * grey).clamp_(0, 255)  # saturation
