"""Short causal depthwise convolution over time, with a state for decoding and sequence boundaries for packing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """y_t = silu(Σ_i w_i ⊙ x_{t-i}), i < kernel_size, never reaching before its sequence's start.

    Parameter layout matches nn.Conv1d(groups=D): weight [D, 1, W], so checkpoints that use it load as they are.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"unknown short-conv activation {activation!r}; expected 'silu' or None")
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return F.silu(y) if self.activation else y

    def _taps(self, x: torch.Tensor) -> torch.Tensor:
        """[D, W] in x's dtype: under autocast the projections give bf16 while the weight stays float32, and a
        float32 product here would hand the operator float32 q, k, v (its slow exact-float32 kernels), as a
        convolution layer under autocast would not."""
        return self.weight[:, 0, :].to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D]; positions [B, T] (step index within its sequence) limits taps to the sequence;
        state [B, D, W - 1]: the previous inputs, oldest first. Returns (y, new state or None)."""
        B, T, D = x.shape
        W = self.kernel_size
        w = self._taps(x)  # [D, W], tap W-1 is the current step
        if state is not None:
            history = torch.cat([state.transpose(1, 2).to(x.dtype), x], 1)  # [B, W-1+T, D]
        else:
            history = F.pad(x, (0, 0, W - 1, 0))
        y = x * w[:, W - 1]
        for lag in range(1, W):
            shifted = history[:, W - 1 - lag : W - 1 - lag + T]
            if positions is not None and state is None:
                shifted = shifted * (positions >= lag).unsqueeze(-1).to(x.dtype)
            y = y + shifted * w[:, W - 1 - lag]
        new_state = history[:, -(W - 1) :].transpose(1, 2).contiguous() if output_final_state else None
        return self._activate(y), new_state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token x [B, D]; updates state [B, D, W - 1] in place."""
        w = self._taps(x)
        window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], -1)  # [B, D, W]
        y = (window * w).sum(-1)
        state.copy_(window[:, :, 1:])
        return self._activate(y)
