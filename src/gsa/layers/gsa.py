"""The Gated Slot Attention token mixer (paper §3, spec §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gated_slot_attention, gated_slot_attention_step
from .conv import ShortConvolution
from .norm import RMSNorm

FEATURE_MAPS = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "identity": lambda x: x}


@dataclass
class SlotState:
    """What one GSA layer carries between calls: slot keys Hk [B, H, K, M], slot values Hv [B, H, M, V]
    (float32), and the short-conv windows when the layer has them. Its size does not depend on T."""

    hk: torch.Tensor
    hv: torch.Tensor
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reordering), in place."""
        self.hk = self.hk.index_select(0, index)
        self.hv = self.hv.index_select(0, index)
        if self.conv is not None:
            self.conv = tuple(c.index_select(0, index) for c in self.conv)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[1, T] step index of each token within its packed sequence."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    return (torch.arange(T, device=cu_seqlens.device) - starts).unsqueeze(0)


class GatedSlotAttention(nn.Module):
    """x -> W_o RMSNorm(swish(GSA(φ(W_q x), φ(W_k x), swish(W_v x), 1 - α, log α))), α = sigmoid(W_f x)^(1/τ).

    Parameter names follow the authors' release (q_proj, k_proj, v_proj, f_proj, g_norm, o_proj,
    q_conv1d/k_conv1d/v_conv1d), so their checkpoints load unchanged.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int | None = 64,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        gate_logit_normalizer: float = 8.0,
        clamp_min: float | None = None,
        feature_map: str = "swish",
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_norm: bool = True,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-6,
        scale: float = 1.0,
        layer_idx: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        key_dim, value_dim = round(hidden_size * expand_k), round(hidden_size * expand_v)
        if num_heads < 1 or key_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"hidden_size * expand_k = {key_dim} and hidden_size * expand_v = {value_dim} must be divisible "
                f"by num_heads = {num_heads}"
            )
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)}")
        self.head_k_dim = key_dim // num_heads
        self.head_v_dim = value_dim // num_heads
        if num_slots is None:
            num_slots = self.head_k_dim
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer (τ) must be > 0, got {gate_logit_normalizer}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_slots = num_slots
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        self.feature_map_name = feature_map
        self.feature_map = FEATURE_MAPS[feature_map]
        self.scale = scale
        self.layer_idx = layer_idx
        self.backend = backend

        kv_key_dim = num_kv_heads * self.head_k_dim
        kv_value_dim = num_kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_value_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, num_kv_heads * num_slots, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size, conv_bias)
            self.k_conv1d = ShortConvolution(kv_key_dim, conv_size, conv_bias)
            self.v_conv1d = ShortConvolution(kv_value_dim, conv_size, conv_bias)
        self.g_norm = RMSNorm(value_dim, norm_eps, elementwise_affine) if use_norm else None
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def _project(self, x, mask, positions, state: SlotState | None, use_cache: bool):
        """q, k, v before the feature maps, through the short convs when present; returns new conv windows."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if not self.use_short_conv:
            return q, k, v, None
        if mask is not None:
            q, k, v = (t * mask.unsqueeze(-1).to(t.dtype) for t in (q, k, v))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        if state is not None and state.conv is not None and x.shape[1] == 1:
            return (*(conv.step(t[:, 0], c).unsqueeze(1) for conv, t, c in zip(convs, (q, k, v), state.conv)), state.conv)
        windows = (None,) * 3 if state is None or state.conv is None else state.conv
        results = [conv(t, positions, w, use_cache) for conv, t, w in zip(convs, (q, k, v), windows)]
        return results[0][0], results[1][0], results[2][0], tuple(r[1] for r in results) if use_cache else None

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: SlotState | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, SlotState | None]:
        """x [B, T, D]. attention_mask [B, T'] (1 = token, 0 = padding; its last T columns are used): padding
        neither writes to nor decays the slots. cu_seqlens: packed sequences (B = 1). state: from the previous
        call (decoding); returns (y [B, T, D], the new state when use_cache or state is given)."""
        B, T, _ = x.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"expected attention_mask of shape [B, >= T] = [{B}, >= {T}] (1 = token, 0 = padding), "
                    f"got {list(attention_mask.shape)}"
                )
            mask = attention_mask[:, -T:]
        if cu_seqlens is not None and (state is not None or use_cache):
            raise ValueError("packed sequences (cu_seqlens) cannot be combined with a decoding cache")
        positions = positions_from_cu_seqlens(cu_seqlens, T) if cu_seqlens is not None else None
        q, k, v, conv_windows = self._project(x, mask, positions, state, use_cache)
        f = self.f_proj(x)

        q = self.feature_map(q.view(B, T, self.num_heads, self.head_k_dim))
        k = self.feature_map(k.view(B, T, self.num_kv_heads, self.head_k_dim))
        v = F.silu(v.view(B, T, self.num_kv_heads, self.head_v_dim))
        f = f.view(B, T, self.num_kv_heads, self.num_slots)
        g = F.logsigmoid(f.to(torch.promote_types(f.dtype, torch.float32))) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp(min=self.clamp_min)
        if mask is not None:
            g = g * mask[:, :, None, None].to(g.dtype)
        s = 1 - torch.exp(g)
        g, s = g.to(q.dtype), s.to(q.dtype)

        new_state = None
        if state is not None and T == 1:
            o, _ = gated_slot_attention_step(
                q[:, 0], k[:, 0], v[:, 0], s[:, 0], g[:, 0], (state.hk, state.hv), self.scale, inplace=True,
                backend=self.backend,
            )
            o = o.unsqueeze(1)
            new_state = state
            if conv_windows is not None:
                state.conv = conv_windows
        else:
            initial = (state.hk, state.hv) if state is not None else None
            o, final = gated_slot_attention(
                q, k, v, s, g, self.scale, initial, use_cache or state is not None, cu_seqlens,
                backend=self.backend, check_gate_values=False,
            )
            if final is not None:
                new_state = SlotState(final[0], final[1], conv_windows)
        o = F.silu(o.reshape(B, T, -1))
        if self.g_norm is not None:
            o = self.g_norm(o)
        return self.o_proj(o), new_state
