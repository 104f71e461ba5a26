"""timm ViTs built with an interchangeable attention variant."""

from .vit import (
    WeightsError,
    build_vit,
    load_pretrained_weights,
    read_state_dict,
    readable_attention,
    variant_own_parameters,
    vit_geometry,
)

__all__ = [
    "WeightsError",
    "build_vit",
    "load_pretrained_weights",
    "read_state_dict",
    "readable_attention",
    "variant_own_parameters",
    "vit_geometry",
]
