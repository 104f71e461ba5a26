"""Evaluate saved or swapped weights without training: the metrics of `vitsweep train`'s epochs.

`load_model` builds the model a `ModelSource` describes:
- saved weights with their sidecar (``weights.safetensors`` or a run/trial directory holding one),
  rebuilt as they were trained (`finetune.weights.load_weight_dict`);
- the same weights *swapped* into another variant (``variant`` set): the architecture comes from
  the sidecar, the attention from the variant, and the weights load by key as a pretrained
  checkpoint does (only the variant's own new parameters start fresh) -- the accuracy at the swap,
  before any fine-tuning;
- any other checkpoint (timm ``.pth``, JAX ``.npz``, a safetensors file without sidecar), the hub's
  pretrained weights, or a random init, built from ``model``/``img_size``/``patch_size``/``depth``.

`evaluate_source` runs `finetune.loop.evaluate` on the validation split and adds `cost_metrics` and
the peak memory: ``val/loss``, ``val/acc{k}``, ``throughput/eval_img_s``, ``cost/*``, ``memory/*``; with
``profile=True`` also the inference profile ``infer/*`` (latency, throughput, memory by batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch

from .errors import ConfigError, WeightsError
from .safe_files import check_regular
from .loop import evaluate, resolve_device, resolve_precision
from .metrics import MemoryTracker, MetricError, check_topk, cost_metrics
from .models import build_vit, load_pretrained_weights, vit_geometry
from .models.attention import check_attention, get_attention_class

WEIGHTS_FILE = "weights.safetensors"


@dataclass
class ModelSource:
    """Where a model comes from. `weights`: a file, or a directory holding ``weights.safetensors``
    (also under ``run/``, a trial's layout). `variant`/`attn`: swap the attention (None: keep the
    weights' own). `model` and the sizes are needed only for weights without a sidecar."""

    weights: Optional[str] = None
    variant: Optional[str] = None
    attn: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    depth: Optional[int] = None
    pretrained: bool = False
    pretrained_tag: Optional[str] = None


def resolve_weights_path(path: str | Path) -> Path:
    """A weights file, or the ``weights.safetensors`` a run or trial directory holds."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / WEIGHTS_FILE, p / "run" / WEIGHTS_FILE):
            if candidate.is_file():
                return candidate
        raise WeightsError(f"directory {str(p)!r} holds no {WEIGHTS_FILE} (nor run/{WEIGHTS_FILE})")
    check_regular(p, "weights file", WeightsError)
    return p


def _sidecar(path: Path) -> Optional[Dict[str, Any]]:
    """The vitsweep sidecar of a weights file, verified against the weights (checksums and tensor
    shapes: `finetune.weights.verify_pair`) whichever way they are then loaded, swapped into another
    variant included; None for a plain checkpoint."""
    from .weights import verify_pair, vitsweep_sidecar

    if path.suffix != ".safetensors":
        return None
    if os.path.lexists(path.with_suffix(".json")):
        return verify_pair(path)
    return vitsweep_sidecar(path)  # None, or refused: a vitsweep file whose sidecar is gone


def describe_source(source: ModelSource) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """(architecture: model, variant, attn_hparams, img_size, patch_size, depth, num_classes or None;
    the sidecar or None), checked before any data or weights are read."""
    sidecar = None
    if source.weights is not None:
        path = resolve_weights_path(source.weights)
        sidecar = _sidecar(path)
    if sidecar is not None:
        arch = dict(sidecar["arch"])
        if source.model is not None and source.model != arch["model"]:
            raise ConfigError(f"model={source.model!r} but the weights' sidecar says {arch['model']!r}; drop --model")
    else:
        if source.model is None:
            raise ConfigError("--model is needed for weights without a vitsweep sidecar (or for hub/random weights)")
        arch = {"model": source.model, "variant": "softmax", "attn_hparams": {}, "img_size": source.img_size,
                "patch_size": source.patch_size, "depth": source.depth, "num_classes": None}
    if source.variant is not None:
        cls = get_attention_class(source.variant)
        arch["variant"] = source.variant
        arch["attn_hparams"] = cls.check_hparams(source.attn)
    elif source.attn:
        raise ConfigError("--attn needs --variant (the variant whose hyperparameters they are)")
    return arch, sidecar


def load_model(source: ModelSource, num_classes: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(model, architecture) for `source`; `num_classes` is the data's (checked against the weights)."""
    from .weights import load_weight_dict

    arch, sidecar = describe_source(source)
    if sidecar is not None and arch["num_classes"] != num_classes:
        raise ConfigError(
            f"the weights classify {arch['num_classes']} classes but the data has {num_classes}; "
            "evaluate on the data set they were trained on"
        )
    arch["num_classes"] = num_classes
    if ":" in arch["variant"]:  # a plug-in: import, construction and a dry forward, each one line
        grid, prefix, dim, heads = vit_geometry(arch["model"], arch["img_size"], arch["patch_size"], arch["depth"])
        check_attention(arch["variant"], dim=dim, num_heads=heads, grid_size=grid, num_prefix_tokens=prefix,
                        **(arch["attn_hparams"] or {}))
    if sidecar is not None:
        own = sidecar["arch"]
        same = arch["variant"] == own["variant"] and dict(arch["attn_hparams"]) == dict(own.get("attn_hparams") or {})
        if same:
            model, _ = load_weight_dict(resolve_weights_path(source.weights))
            return model.eval(), arch
    try:
        model = build_vit(
            arch["model"], num_classes, variant=arch["variant"], attn_hparams=arch["attn_hparams"],
            img_size=arch["img_size"], patch_size=arch["patch_size"], depth=arch["depth"],
            pretrained=source.pretrained and source.weights is None, pretrained_tag=source.pretrained_tag,
        )
    except (TypeError, AssertionError) as err:
        raise ConfigError(f"model={arch['model']!r} cannot be built with these sizes: {err}") from err
    if source.weights is not None:
        load_pretrained_weights(model, str(resolve_weights_path(source.weights)))
    return model.eval(), arch


def preprocessing_for(source: ModelSource, sidecar: Optional[Dict[str, Any]], arch: Dict[str, Any]):
    """The eval preprocessing: the sidecar's (as trained), else the model's pretrained config."""
    from .data import Preprocessing, resolve_preprocessing

    if sidecar is not None and sidecar.get("preprocessing"):
        return Preprocessing.from_dict({**sidecar["preprocessing"], "augment": "none"})
    name = f"{arch['model']}.{source.pretrained_tag}" if source.pretrained_tag else arch["model"]
    sizes = {k: arch[k] for k in ("img_size", "patch_size") if arch.get(k) is not None}
    with torch.device("meta"):
        try:
            meta = timm.create_model(name, pretrained=False, num_classes=0, **sizes)
        except RuntimeError as err:  # unknown tag
            raise ConfigError(f"pretrained_tag={source.pretrained_tag!r} is not a tag of {arch['model']}: {err}") from err
    return resolve_preprocessing(meta, arch.get("img_size"), augment="none")


def evaluate_source(
    source: ModelSource,
    data: str,
    *,
    batch_size: int = 64,
    max_batches: Optional[int] = None,
    topk: Sequence[int] = (1, 5),
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    seed: int = 0,
    profile: bool = False,
) -> Dict[str, Any]:
    """Evaluate `source` on the validation split of `data`: ``{"metrics": {...}, "arch": {...}}``.
    `profile`: also the inference profile (``infer/*``, `finetune.inference_profile`) on `device`."""
    from .data import build_data, build_loaders

    if batch_size < 1 or (max_batches is not None and max_batches < 1) or num_workers < 0:
        raise ConfigError(f"batch_size={batch_size}, max_batches={max_batches}, num_workers={num_workers}: "
                          "batch_size and max_batches must be >= 1, num_workers >= 0")
    arch, sidecar = describe_source(source)
    dev = resolve_device(device)
    autocast_dtype, _ = resolve_precision(precision, dev)
    preprocessing = preprocessing_for(source, sidecar, arch)
    bundle = build_data(data, preprocessing, seed=seed)
    try:
        check_topk(topk, bundle.num_classes)
    except MetricError as err:
        raise ConfigError(str(err)) from err
    torch.manual_seed(seed)  # random features / fresh projections of a swapped variant
    model, arch = load_model(source, bundle.num_classes)
    model.to(dev)
    static = cost_metrics(model, preprocessing.input_size[1:])
    _, val_loader = build_loaders(bundle, batch_size, num_workers, dev, seed)
    with MemoryTracker(dev) as memory:
        val = evaluate(model, val_loader, dev, topk, autocast_dtype, max_batches, bundle.eval_batch_transform)
    metrics = {**val, **memory.metrics(), **static}
    if profile:
        from .inference_profile import inference_profile

        metrics.update(inference_profile(model, preprocessing.input_size, dev, autocast_dtype))
    return {"metrics": metrics, "arch": arch, "data": {"spec": data, "num_classes": bundle.num_classes,
                                                       "val_size": len(bundle.val)},
            "weights": str(resolve_weights_path(source.weights)) if source.weights else None}


__all__ = ["ModelSource", "describe_source", "evaluate_source", "load_model", "preprocessing_for",
           "resolve_weights_path", "WEIGHTS_FILE"]
