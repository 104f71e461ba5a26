"""Attention variants for timm ViTs. Each built-in module declares one variant and registers it by
name on import; any other `AttentionBase` subclass is used by its import path (``pkg.mod:Class``)."""

from .base import AttentionBase, AttentionConfigError
from .hparams import HParam
from .registry import (
    ATTENTION_VARIANTS,
    attention_layer,
    builtin_variants,
    check_attention,
    declared_hparams,
    get_attention_class,
    register_attention,
    variant_hparams,
    variant_label,
    variant_path,
)

# Built-in variants, in the order they are listed everywhere (each module registers itself).
from .softmax import SoftmaxAttention, softmax_attention  # isort: skip
from .linformer import LinformerAttention, linformer_attention  # isort: skip
from .performer import PerformerAttention, performer_attention  # isort: skip
from .nystrom import NystromAttention, nystrom_attention  # isort: skip
from .atrous_linear import AtrousLinearAttention, atrous_linear_attention  # isort: skip

__all__ = [
    "ATTENTION_VARIANTS",
    "AtrousLinearAttention",
    "AttentionBase",
    "AttentionConfigError",
    "HParam",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "SoftmaxAttention",
    "atrous_linear_attention",
    "attention_layer",
    "builtin_variants",
    "check_attention",
    "declared_hparams",
    "get_attention_class",
    "linformer_attention",
    "nystrom_attention",
    "performer_attention",
    "register_attention",
    "softmax_attention",
    "variant_hparams",
    "variant_label",
    "variant_path",
]
