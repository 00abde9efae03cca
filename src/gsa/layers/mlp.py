"""The SwiGLU feed-forward block of Llama-style models: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from .fused import keeps_normed, must_call, pre_norm_linear, swiglu_linear


def swiglu_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """2/3 of hidden_ratio * hidden_size, rounded up to a multiple of 256 (the paper's models)."""
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, recompute_features: bool = True,
                 recompute_norms: bool | None = None):
        super().__init__()
        # with a norm given: its output is rebuilt in backward when True (less memory), kept when False (one pass
        # over the rows fewer); recompute_norms, when not None, decides instead (as in GatedSlotAttention)
        self.recompute_features = recompute_features
        self.recompute_norms = recompute_norms
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None):
        """down(silu(gate(x')) * up(x')), x' = norm(x) when a norm (RMSNorm) is given: the pre-norm block's
        norm, fused with the projections so that x is saved for backward, not x' (unless recompute_features is
        off). Saves gate and up. residual (with norm): the input is h = residual + x (the block's residual
        addition, formed in the norm's pass); returns (output, h) then."""
        if norm is not None:
            h, (gate, up) = pre_norm_linear(x, norm, (self.gate_proj, self.up_proj), residual,
                                            keep_normed=keeps_normed(self))
        elif residual is not None:
            raise ValueError("a residual is added in the pre-norm's pass: pass norm with it")
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        if down.bias is not None or must_call(down):
            out = down(torch.nn.functional.silu(gate) * up)
        else:
            out = swiglu_linear(gate, up, down.weight)
        return out if residual is None else (out, h)
