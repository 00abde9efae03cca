"""RMSNorm, computed in float32 whatever the input dtype (as the paper's models do).

The forward goes through `gsa.layers.fused.rms_norm`, which saves only the input and the float32 1/rms for
backward (the plain composition, `fused.plain_rms_norm`, also keeps float32 copies of the input and output).
"""

from __future__ import annotations

import torch
from torch import nn

from .fused import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
