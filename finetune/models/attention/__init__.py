"""Attention variants for timm ViTs; every module here registers itself by name on import."""

from .base import AttentionBase, AttentionConfigError
from .registry import (
    ATTENTION_VARIANTS,
    attention_layer,
    check_attention,
    get_attention_class,
    register_attention,
    variant_hparams,
)
from .softmax import SoftmaxAttention, softmax_attention

register_attention("softmax")(SoftmaxAttention)

# Efficient variants (each module calls register_attention on import).
# attention-zoo: import linformer, performer, nystrom, atrous_linear here.
from .atrous_linear import AtrousLinearAttention, atrous_linear_attention
from .linformer import LinformerAttention, linformer_attention
from .nystrom import NystromAttention, nystrom_attention
from .performer import PerformerAttention, performer_attention

__all__ = [
    "ATTENTION_VARIANTS",
    "AtrousLinearAttention",
    "AttentionBase",
    "AttentionConfigError",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "SoftmaxAttention",
    "atrous_linear_attention",
    "attention_layer",
    "check_attention",
    "get_attention_class",
    "linformer_attention",
    "nystrom_attention",
    "performer_attention",
    "register_attention",
    "softmax_attention",
    "variant_hparams",
]
