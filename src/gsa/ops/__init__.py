"""The GSA operator: `gated_slot_attention` (whole sequences) and `gated_slot_attention_step` (decoding)."""

from .dispatch import BACKENDS, gated_slot_attention, gated_slot_attention_step, triton_available

__all__ = ["BACKENDS", "gated_slot_attention", "gated_slot_attention_step", "triton_available"]
