"""The GSA operator: `gated_slot_attention` (whole sequences), `gated_slot_attention_step` (decoding), and
`gated_slot_attention_decode` (a layer's decoding step from its raw projections, fused on the GPU)."""

from .dispatch import (
    BACKENDS,
    gated_slot_attention,
    gated_slot_attention_decode,
    gated_slot_attention_step,
    resolve_backend,
    triton_available,
)
from .projections import FEATURE_MAPS, slot_gates

__all__ = [
    "BACKENDS",
    "FEATURE_MAPS",
    "gated_slot_attention",
    "gated_slot_attention_decode",
    "gated_slot_attention_step",
    "resolve_backend",
    "slot_gates",
    "triton_available",
]
