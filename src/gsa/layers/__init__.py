"""Model building blocks: the GSA token mixer, softmax attention, SwiGLU, RMSNorm, short convolution."""

from .attention import Attention, KVState
from .conv import ShortConvolution
from .gsa import GatedSlotAttention, SlotState
from .mlp import SwiGLU, swiglu_intermediate_size
from .norm import RMSNorm

__all__ = [
    "Attention",
    "GatedSlotAttention",
    "KVState",
    "RMSNorm",
    "ShortConvolution",
    "SlotState",
    "SwiGLU",
    "swiglu_intermediate_size",
]
