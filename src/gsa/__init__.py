"""gsa: Gated Slot Attention (NeurIPS 2024) — operator, layer, language model, training and evaluation."""

__version__ = "0.1.0"

from .ops import gated_slot_attention, gated_slot_attention_step

__all__ = ["__version__", "gated_slot_attention", "gated_slot_attention_step"]
