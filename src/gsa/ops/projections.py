"""From a GSA layer's raw projections to the operator's inputs (spec §2): q, k through the feature map φ, v
through swish, and the slot gates from the forget-gate logits f: α = sigmoid(f)^(1/τ), g = log α, s = 1 − α.

The layer uses these for whole sequences; the fused decode step (`gated_slot_attention_decode`) does the same
inside its kernels on the GPU, and through these functions elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "identity": lambda x: x}


def slot_gates(
    f: torch.Tensor, gate_logit_normalizer: float, clamp_min: float | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, g) in float32 (float64 stays) from gate logits f [..., M]: g = logsigmoid(f) / τ, clamped below at
    clamp_min; mask (broadcast to g, 1 = token, 0 = padding) zeroes g, so padding neither decays nor writes."""
    g = F.logsigmoid(f.to(torch.promote_types(f.dtype, torch.float32))) / gate_logit_normalizer
    if clamp_min is not None:
        g = g.clamp(min=clamp_min)
    if mask is not None:
        g = g * mask.to(g.dtype)
    return 1 - torch.exp(g), g
