"""Build a timm ViT whose attention is a registered variant, and load pretrained weights into it.

Every variant keeps the names and shapes of timm's ``qkv`` / ``proj``, so pretrained softmax weights
load by key; only a variant's own new parameters (and the replaced head) start fresh. Loading goes
through timm's `checkpoint_filter_fn`, which resamples position and patch embeddings when
`img_size` / `patch_size` differ from the checkpoint's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError, WeightsError
from ..safe_files import check_regular
from .attention import AttentionBase, attention_layer

_logger = logging.getLogger(__name__)

# Keys that belong to the classifier head: replaced for the dataset's classes, never transferred
# when the class count differs.
HEAD_PREFIXES = ("head.",)



@functools.lru_cache(maxsize=256)
def vit_geometry(
    model_name: str, img_size: Optional[int], patch_size: Optional[int], depth: Optional[int] = None
) -> Tuple[Tuple[int, int], int, int, int]:
    """(grid (Hp, Wp), num_prefix_tokens, embed_dim, num_heads) of a timm ViT, built on `meta` (no memory).
    Cached: sweep validation asks for the same geometry once per configuration."""
    if model_name not in timm.list_models():
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8] if "_" in model_name else []
        raise ConfigError(f"model={model_name!r} is not a timm model name" + (f"; e.g. {', '.join(close)}" if close else ""))
    kwargs = _size_kwargs(img_size, patch_size, depth)
    try:
        with torch.device("meta"):
            probe = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, AssertionError) as err:
        raise ConfigError(f"model={model_name!r} cannot be built with {kwargs}: {err}") from err
    if not isinstance(probe, VisionTransformer):
        raise ConfigError(f"model={model_name!r} is a {type(probe).__name__}; vitsweep needs a timm VisionTransformer")
    grid = tuple(int(g) for g in probe.patch_embed.grid_size)
    num_heads = probe.blocks[0].attn.num_heads
    return grid, int(probe.num_prefix_tokens), int(probe.embed_dim), int(num_heads)


def _size_kwargs(img_size: Optional[int], patch_size: Optional[int], depth: Optional[int] = None) -> Dict[str, int]:
    kwargs: Dict[str, int] = {}
    if depth is not None:
        kwargs["depth"] = depth
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return kwargs


def build_vit(
    model_name: str,
    num_classes: int,
    *,
    variant: str = "softmax",
    attn_hparams: Optional[Dict[str, Any]] = None,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    depth: Optional[int] = None,
    pretrained: bool = False,
    pretrained_tag: Optional[str] = None,
    weights: Optional[str] = None,
    drop_path: float = 0.0,
) -> VisionTransformer:
    """A timm ViT with `variant` attention in every block, its head sized for `num_classes`.

    Args:
        model_name: timm architecture, e.g. ``vit_small_patch16_224``.
        num_classes: classes of the fine-tuning dataset (the head is replaced).
        variant: registered attention variant name, or a plug-in's import path ``pkg.mod:Class``.
        attn_hparams: the variant's own hyperparameters (e.g. ``{"rank": 64}``).
        img_size, patch_size: override the architecture's defaults (weights are resampled).
        depth: keep only this many blocks (small test models; pretrained weights then do not fit).
        pretrained: download ``timm/<model_name>.<pretrained_tag>`` from the Hugging Face hub.
        weights: a local safetensors / timm .pth / JAX .npz checkpoint instead of the hub.
        drop_path: stochastic depth rate.
    """
    grid, num_prefix, _, _ = vit_geometry(model_name, img_size, patch_size, depth)
    layer = attention_layer(variant, grid_size=grid, num_prefix_tokens=num_prefix, **(attn_hparams or {}))
    model = timm.create_model(
        model_name,
        pretrained=False,
        num_classes=num_classes,
        attn_layer=layer,
        drop_path_rate=drop_path,
        **_size_kwargs(img_size, patch_size, depth),
    )
    if weights:
        load_pretrained_weights(model, weights)
    elif pretrained:
        load_pretrained_weights(model, hub_weights_path(model_name, pretrained_tag))
    return model


def hub_weights_path(model_name: str, tag: Optional[str]) -> str:
    """Download (or find in the HF cache) ``timm/<model>.<tag>``'s safetensors file; never a pickle."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = f"timm/{model_name}" + (f".{tag}" if tag else "")
    try:
        return hf_hub_download(repo_id=repo, filename="model.safetensors")
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "HF_HUB_OFFLINE is set" if offline else "no network?"
        raise WeightsError(
            f"pretrained weights {repo!r} are not in the local Hugging Face cache and cannot be downloaded "
            f"({hint}); pass --weights PATH to a local file or --no-pretrained"
        ) from err


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a timm/PyTorch checkpoint (``weights_only=True``: no code runs)."""
    p = Path(path)
    check_regular(p, "weights file", WeightsError)  # a FIFO or device would block the read
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"weights file {path!r} is not a readable safetensors file: {err}") from err
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        import pickle

        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise WeightsError(
                f"weights file {path!r} is not a plain tensor checkpoint (refused to unpickle arbitrary objects "
                f"with weights_only=True): {str(err).splitlines()[0]}"
            ) from err
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"weights file {path!r} does not hold a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise WeightsError(f"weights file {path!r} has suffix {suffix!r}; allowed: .safetensors, .pth, .pt, .bin, .ckpt, .npz")


def load_pretrained_weights(model: VisionTransformer, path: str) -> Dict[str, Any]:
    """Load a softmax ViT checkpoint into `model` (any variant) by key.

    The head is dropped when its class count differs; missing keys may only be the variant's own new
    parameters. Anything else (unexpected keys, shape mismatches) means a different architecture.
    Returns ``{"missing": [...], "dropped": [...]}``.
    """
    if str(path).lower().endswith(".npz"):
        return _load_npz(model, path)
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except (KeyError, RuntimeError, ValueError) as err:
        raise WeightsError(f"weights {path!r} do not fit {type(model).__name__}: {err}") from err
    own = model.state_dict()
    dropped = []
    for key in list(state):
        if key.startswith(HEAD_PREFIXES) and key in own and state[key].shape != own[key].shape:
            dropped.append(key)
            del state[key]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise WeightsError(f"weights {path!r} have a different architecture; shape mismatches: {mismatched[:5]}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise WeightsError(
            f"weights {path!r} have a different architecture; unexpected keys: {result.unexpected_keys[:8]}"
        )
    allowed_missing = variant_own_parameters(model) | {k for k in own if k.startswith(HEAD_PREFIXES)}
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing:
        raise WeightsError(f"weights {path!r} lack keys this model needs: {missing[:8]}")
    _logger.info("loaded %s (%d tensors; fresh: %s)", path, len(state), result.missing_keys)
    return {"missing": list(result.missing_keys), "dropped": dropped}


def variant_own_parameters(model: torch.nn.Module) -> set:
    """State-dict keys that exist only because of the attention variant (absent from a softmax ViT)."""
    stock = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"}
    own = set()
    for name, module in model.named_modules():
        if isinstance(module, AttentionBase):
            for key in module.state_dict():
                if key.split(".")[0] not in stock:
                    own.add(f"{name}.{key}")
    return own


def _load_npz(model: VisionTransformer, path: str) -> Dict[str, Any]:
    """Original JAX/big_vision checkpoints (the in21k augreg releases): timm's own loader."""
    from timm.models.vision_transformer import _load_weights

    if not Path(path).is_file():
        raise WeightsError(f"weights file {path!r} does not exist")
    try:
        _load_weights(model, path)
    except (KeyError, ValueError, OSError) as err:
        raise WeightsError(f"weights {path!r} are not a ViT .npz checkpoint that fits this model: {err}") from err
    return {"missing": sorted(variant_own_parameters(model)), "dropped": []}


@contextlib.contextmanager
def readable_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every module with timm's `fused_attn` flag runs its readable path (the same
    math as SDPA, visible to FLOP counters); the flags are restored after."""
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in flags:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, old in flags:
            m.fused_attn = old
