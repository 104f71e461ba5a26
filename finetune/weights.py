"""`save_weight_dict` / `load_weight_dict`: weights as safetensors plus a JSON sidecar that says how to
rebuild the model (timm name, variant, hyperparameters, geometry, preprocessing, metrics), so a trained
model is never trained twice and never unpickled. The sidecar also records the variant class's import
path (``variant_path``), so a plug-in variant, or one registered by a module that is not imported,
is rebuilt from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .io_utils import atomic_path, read_tagged_json, sha256_file, write_json
from .models import WeightsError, build_vit
from .models.attention import ATTENTION_VARIANTS, variant_path

FORMAT = "vitsweep-weights"
FORMAT_VERSION = 1
# Sidecar keys that define the architecture: a mismatch here means the weights cannot be used.
ARCH_KEYS = ("model", "variant", "attn_hparams", "img_size", "patch_size", "depth", "num_classes")


def _paths(path: str | Path) -> Tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_weight_dict(
    model: torch.nn.Module,
    path: str | Path,
    config: Mapping[str, Any],
    *,
    metrics: Optional[Mapping[str, Any]] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    class_names: Optional[list] = None,
) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically; returns the safetensors path.

    `config` needs the architecture keys: model, variant, attn_hparams, img_size, patch_size,
    depth, num_classes (a `TrainConfig.to_dict()` plus those is what `run_training` passes).
    """
    from safetensors.torch import save_file

    missing = [k for k in ARCH_KEYS if k not in config]
    if missing:
        raise ValueError(f"save_weight_dict: config lacks architecture keys {missing}")
    weights_path, sidecar_path = _paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, tmp, metadata={"format": FORMAT, "model": str(config["model"])})
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": {k: config[k] for k in ARCH_KEYS},
        "variant_path": variant_path(config["variant"]),
        "config": dict(config),
        "preprocessing": dict(preprocessing or {}),
        "metrics": dict(metrics or {}),
        "class_names": list(class_names or []),
        "num_tensors": len(state),
        "sha256": sha256_file(weights_path),
    }
    write_json(sidecar_path, sidecar)
    return weights_path


def read_sidecar(path: str | Path) -> Dict[str, Any]:
    weights_path, sidecar_path = _paths(path)
    if not weights_path.is_file():
        raise WeightsError(f"weights file {str(weights_path)!r} does not exist")
    if not sidecar_path.is_file():
        raise WeightsError(f"sidecar {str(sidecar_path)!r} is missing: it says how to rebuild the model")
    return read_tagged_json(sidecar_path, FORMAT, "vitsweep weights sidecar", WeightsError)


def load_weight_dict(
    path: str | Path,
    expected: Optional[Mapping[str, Any]] = None,
    *,
    device: str | torch.device = "cpu",
    verify_checksum: bool = True,
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model described by the sidecar and load its weights (strict).

    `expected`: architecture values the caller requires (any of ARCH_KEYS); a difference is an error
    that names each mismatched key. A truncated or altered file fails the checksum or safetensors'
    own header check.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, _ = _paths(path)
    sidecar = read_sidecar(path)
    arch = sidecar["arch"]
    if expected:
        diffs = [
            f"{k}: file has {arch.get(k)!r}, expected {expected[k]!r}"
            for k in ARCH_KEYS
            if k in expected and _norm(expected[k]) != _norm(arch.get(k))
        ]
        if diffs:
            raise WeightsError(f"weights {str(weights_path)!r} do not match the requested model: " + "; ".join(diffs))
    if verify_checksum and sidecar.get("sha256") and sha256_file(weights_path) != sidecar["sha256"]:
        raise WeightsError(f"weights file {str(weights_path)!r} is corrupt or truncated (checksum differs from its sidecar)")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"weights file {str(weights_path)!r} is not a readable safetensors file: {err}") from err
    # A name registered in this process, else the recorded import path (plug-ins: the same string).
    variant = arch["variant"]
    if variant not in ATTENTION_VARIANTS and sidecar.get("variant_path"):
        variant = sidecar["variant_path"]
    model = build_vit(
        arch["model"],
        arch["num_classes"],
        variant=variant,
        attn_hparams=arch.get("attn_hparams") or {},
        img_size=arch.get("img_size"),
        patch_size=arch.get("patch_size"),
        depth=arch.get("depth"),
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"weights {str(weights_path)!r} do not fit the architecture in their sidecar: {err}") from err
    return model.to(device), sidecar


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    return value
