"""`save_weight_dict` / `load_weight_dict`: weights as safetensors plus a JSON sidecar that says how to
rebuild the model (timm name, variant, hyperparameters, geometry, preprocessing, metrics), so a trained
model is never trained twice and never unpickled. The sidecar also records the variant class's import
path (``variant_path``), so a plug-in variant, or one registered by a module that is not imported,
is rebuilt from it.

Integrity: the pair is checked as one. The safetensors header (``__metadata__``) holds the sha256 of
the sidecar's content (every key but ``sha256``, as canonical JSON) and the architecture; the sidecar
holds the sha256 of the safetensors file. Editing either file, deleting the checksum, or pairing
files of two saves is refused on load. Files written before this scheme (format_version 1) are refused
too, unless loaded with ``verify=False``; saving them again gives a verifiable pair.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .io_utils import atomic_path, json_safe, read_tagged_json, sha256_file, write_json
from .models import WeightsError, build_vit
from .models.attention import ATTENTION_VARIANTS, variant_path
from .safe_files import check_regular

FORMAT = "vitsweep-weights"
FORMAT_VERSION = 2
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
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": {k: config[k] for k in ARCH_KEYS},
        "variant_path": variant_path(config["variant"]),
        "config": dict(config),
        "preprocessing": dict(preprocessing or {}),
        "metrics": dict(metrics or {}),
        "class_names": list(class_names or []),
        "num_tensors": len(state),
    }
    header = {"format": FORMAT, "model": str(config["model"]), "sidecar_sha256": _digest(body), "arch": _canonical(body["arch"])}
    with atomic_path(weights_path) as tmp:
        save_file(state, tmp, metadata=header)
    write_json(sidecar_path, {**body, "sha256": sha256_file(weights_path)})
    return weights_path


def _canonical(obj: Any) -> str:
    """`obj` as the JSON that `write_json` would store, compact and key-sorted (one text per value)."""
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def read_sidecar(path: str | Path) -> Dict[str, Any]:
    """The sidecar of `path`, with a complete ``arch`` entry; both files must be regular files (a FIFO
    or device is refused by name instead of blocking the read)."""
    weights_path, sidecar_path = _paths(path)
    check_regular(weights_path, "weights file", WeightsError)
    if not os.path.lexists(sidecar_path):
        raise WeightsError(f"sidecar {str(sidecar_path)!r} is missing: it says how to rebuild the model")
    check_regular(sidecar_path, "sidecar", WeightsError)
    sidecar = read_tagged_json(sidecar_path, FORMAT, "vitsweep weights sidecar", WeightsError)
    arch = sidecar.get("arch")
    if not isinstance(arch, dict) or any(k not in arch for k in ARCH_KEYS):
        raise WeightsError(f"sidecar {str(sidecar_path)!r} has no complete 'arch' entry ({', '.join(ARCH_KEYS)})")
    return sidecar


def check_expected_keys(expected: Mapping[str, Any]) -> None:
    """`load_weight_dict(expected=...)` compares architecture keys only: any other key (a typo such as
    ``variatn``) would silently check nothing, so it is refused by name."""
    unknown = [k for k in expected if k not in ARCH_KEYS]
    if unknown:
        raise WeightsError(
            f"expected= has key(s) {unknown} that a weights sidecar does not record; allowed: {', '.join(ARCH_KEYS)}"
        )


def load_weight_dict(
    path: str | Path,
    expected: Optional[Mapping[str, Any]] = None,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model described by the sidecar and load its weights (strict).

    `expected`: architecture values the caller requires (any of ARCH_KEYS; another key is refused by
    name); a difference is an error that names each mismatched key. `verify` (default): the pair must pass `verify_weights`; False
    skips it (files from before the checksum scheme), which trusts both files as they are.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, sidecar_path = _paths(path)
    if expected:
        check_expected_keys(expected)
    sidecar = read_sidecar(path)
    arch = sidecar["arch"]
    if verify:
        verify_weights(path, sidecar)
    if expected:
        diffs = [
            f"{k}: file has {arch.get(k)!r}, expected {expected[k]!r}"
            for k in ARCH_KEYS
            if k in expected and _norm(expected[k]) != _norm(arch.get(k))
        ]
        if diffs:
            raise WeightsError(f"weights {str(weights_path)!r} do not match the requested model: " + "; ".join(diffs))
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


def verify_weights(path: str | Path, sidecar: Optional[Mapping[str, Any]] = None) -> None:
    """Raise WeightsError unless the safetensors file matches the sidecar's sha256 and the sidecar's
    content matches the digest in the safetensors header (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    weights_path, sidecar_path = _paths(path)
    sidecar = dict(sidecar if sidecar is not None else read_sidecar(path))
    resave = ("if you trust both files, load them with load_weight_dict(path, verify=False) and save them again "
              "with save_weight_dict to get a verifiable pair")
    checksum = sidecar.pop("sha256", None)
    if not isinstance(checksum, str):
        raise WeightsError(f"sidecar {str(sidecar_path)!r} has no checksum (sha256) of its weights, so they cannot be verified; {resave}")
    if sha256_file(weights_path) != checksum:
        raise WeightsError(f"weights file {str(weights_path)!r} is corrupt or truncated (checksum differs from its sidecar)")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"weights file {str(weights_path)!r} is not a readable safetensors file: {err}") from err
    if "sidecar_sha256" not in header:
        raise WeightsError(
            f"weights {str(weights_path)!r} were written by an older vitsweep (format_version "
            f"{sidecar.get('format_version')!r}) whose sidecar is not covered by a checksum; {resave}"
        )
    if header["sidecar_sha256"] != _digest(sidecar):
        raise WeightsError(
            f"sidecar {str(sidecar_path)!r} was altered after it was saved: its content no longer matches "
            f"the digest stored in {str(weights_path)!r}; restore it or save the model again"
        )
    check_shapes(weights_path, sidecar)


def check_shapes(path: str | Path, sidecar: Mapping[str, Any]) -> None:
    """The sidecar must describe the weights beside it: the model its ``arch`` builds (on the meta
    device, nothing allocated) has exactly the tensors of the safetensors header, with the same shapes.
    Raises WeightsError naming the first differences."""
    from safetensors import SafetensorError, safe_open

    weights_path, sidecar_path = _paths(path)
    arch = sidecar["arch"]
    variant = arch["variant"]
    if variant not in ATTENTION_VARIANTS and sidecar.get("variant_path"):
        variant = sidecar["variant_path"]
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"weights file {str(weights_path)!r} is not a readable safetensors file: {err}") from err
    try:
        with torch.device("meta"):
            model = build_vit(arch["model"], arch["num_classes"], variant=variant,
                              attn_hparams=arch.get("attn_hparams") or {}, img_size=arch.get("img_size"),
                              patch_size=arch.get("patch_size"), depth=arch.get("depth"))
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise WeightsError(f"sidecar {str(sidecar_path)!r} describes a model that cannot be built: {err}") from err
    built = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = [f"{k}: file {stored[k]} vs sidecar's model {built[k]}" for k in built if k in stored and stored[k] != built[k]]
    problems += [f"{k}: only in the file" for k in stored if k not in built]
    problems += [f"{k}: missing from the file" for k in built if k not in stored]
    if problems:
        raise WeightsError(
            f"sidecar {str(sidecar_path)!r} does not describe the weights beside it ({arch['model']}, "
            f"{arch['variant']}): {'; '.join(problems[:4])}" + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        )


def verify_pair(path: str | Path) -> Dict[str, Any]:
    """`read_sidecar` + `verify_weights` (checksums and shapes), remembered per file state: `eval`,
    `fidelity` and `train --weights` check the same pair more than once. Returns the sidecar."""
    weights_path, sidecar_path = _paths(path)
    sidecar = read_sidecar(path)
    stamp = tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, (weights_path, sidecar_path)))
    key = (str(weights_path.resolve()), stamp)
    if key not in _VERIFIED:
        verify_weights(path, sidecar)
        _VERIFIED[key] = True
    return sidecar


_VERIFIED: Dict[Any, bool] = {}


def vitsweep_sidecar(path: str | Path) -> Optional[Dict[str, Any]]:
    """For a checkpoint given to ``train --weights`` or ``eval --weights``: the verified sidecar when
    `path` is a vitsweep weights file (a ``.json`` vitsweep sidecar beside it, or ``format`` in its
    safetensors header), else None (a timm/hub checkpoint). A vitsweep file whose sidecar is missing,
    altered or from another model is refused."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return None
    check_regular(p, "weights file", WeightsError)
    sidecar_path = p.with_suffix(".json")
    if os.path.lexists(sidecar_path):
        check_regular(sidecar_path, "sidecar", WeightsError)
        try:
            tagged = json.loads(sidecar_path.read_text()).get("format") == FORMAT
        except (ValueError, AttributeError):
            tagged = False
        if tagged:
            return verify_pair(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"weights file {str(p)!r} is not a readable safetensors file: {err}") from err
    if header.get("format") == FORMAT:
        raise WeightsError(f"weights {str(p)!r} were saved by vitsweep but their sidecar {str(sidecar_path)!r} is missing "
                           "or is not a vitsweep sidecar, so they cannot be verified; put the sidecar back beside them")
    return None


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    return value
