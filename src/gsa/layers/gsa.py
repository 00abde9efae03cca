"""The Gated Slot Attention token mixer (paper §3, spec §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import FEATURE_MAPS, gated_slot_attention, gated_slot_attention_decode
from ..ops.checks import check_cu_seqlens
from .conv import ShortConvolution
from .fused import (
    keeps_normed,
    norm_linear,
    pre_norm_linear,
    recompute_saved,
    slot_gate_recipes,
    slot_gates,
    swish_features,
    swish_recipes,
)
from .norm import RMSNorm


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
    """[1, T] step index of each token within its packed sequence. cu_seqlens is checked on the host copy of its
    offsets that the operator reads anyway (once per tensor: `host_offsets`); the positions themselves need no
    read back (the output size is given): a layer that waited for the GPU here would leave it idle while the host
    queued the next kernels."""
    check_cu_seqlens(cu_seqlens, 1, T, cu_seqlens.device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=T)
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
        recompute_features: bool = True,
        recompute_states: bool = True,
        recompute_norms: bool | None = None,
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
        # Training memory against speed: the operator's inputs φ(q), φ(k), swish(v) are recomputed in backward from
        # the projections (which swish keeps anyway), and the two norms' outputs from their inputs, when True; kept
        # when False, which saves backward five passes over [tokens, width] and keeps 5 x tokens x width more
        # values per layer.
        self.recompute_features = recompute_features
        # The norms' outputs alone: None follows recompute_features; False with recompute_features True keeps
        # 3 x tokens x width a layer and block (the norms' passes) but not the features (recomputed by swish's
        # cheaper pass), the setting that fits the chunk states too under FLA's memory at the 1.3B shape.
        self.recompute_norms = recompute_norms
        # The operator's chunk states are computed again in backward (the paper's choice) when True; kept from the
        # forward when False (Triton backend): one state pass a step fewer for [chunks + sequences, heads, K + V,
        # slots] more values kept a layer (135 MB for one 16K-token sequence of the 1.3B layer, 138 MB for 8 x 2K).
        self.recompute_states = recompute_states

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

    def _project(self, x, mask, positions, state: SlotState | None, use_cache: bool, norm: nn.Module | None,
                 residual: torch.Tensor | None):
        """(h, q, k, v before the feature maps and through the short convs when present, f, new conv windows):
        h = residual + x is the layer's input (x itself without a residual)."""
        projections = (self.q_proj, self.k_proj, self.v_proj, self.f_proj)
        if norm is not None:
            h, (q, k, v, f) = pre_norm_linear(x, norm, projections, residual,
                                            keep_normed=keeps_normed(self))
        else:
            h, (q, k, v, f) = x, (p(x) for p in projections)
        q, k, v, f, conv_windows = self._convolve(q, k, v, f, mask, positions, state, use_cache)
        return h, q, k, v, f, conv_windows

    def _convolve(self, q, k, v, f, mask, positions, state: SlotState | None, use_cache: bool):
        """q, k, v through the short convs when the layer has them (a decoding step from the kept windows); f as
        it is; the new conv windows when use_cache."""
        if not self.use_short_conv:
            return q, k, v, f, None
        if mask is not None:
            q, k, v = (t * mask.unsqueeze(-1).to(t.dtype) for t in (q, k, v))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        if state is not None and state.conv is not None and q.shape[1] == 1:
            steps = (conv.step(t[:, 0], c).unsqueeze(1) for conv, t, c in zip(convs, (q, k, v), state.conv))
            return (*steps, f, state.conv)
        windows = (None,) * 3 if state is None or state.conv is None else state.conv
        results = [conv(t, positions, w, use_cache) for conv, t, w in zip(convs, (q, k, v), windows)]
        return results[0][0], results[1][0], results[2][0], f, tuple(r[1] for r in results) if use_cache else None

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: SlotState | None = None,
        use_cache: bool = False,
        norm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SlotState | None] | tuple[torch.Tensor, SlotState | None, torch.Tensor]:
        """x [B, T, D]. attention_mask [B, T'] (1 = token, 0 = padding; its last T columns are used): padding
        neither writes to nor decays the slots. cu_seqlens: packed sequences (B = 1). state: from the previous
        call (decoding); returns (y [B, T, D], the new state when use_cache or state is given). norm: the
        block's pre-norm (an RMSNorm), applied to x here, fused with the projections so that backward keeps x
        (not norm(x) as well, unless recompute_features is off). residual (with norm): the layer's input is
        residual + x (a pre-norm block's residual addition, formed in the norm's pass over the rows); the sum is
        then returned third, (y, state, h)."""
        B, T, _ = x.shape
        if residual is not None and norm is None:
            raise ValueError("a residual is added in the pre-norm's pass: pass norm with it")
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
        # only the short convolutions need positions within the packed sequences
        positions = positions_from_cu_seqlens(cu_seqlens, T) if cu_seqlens is not None and self.use_short_conv else None
        h, q, k, v, f, conv_windows = self._project(x, mask, positions, state, use_cache, norm, residual)

        if state is not None and T == 1:
            o = self._decode_step(q, k, v, f, mask, state)
            new_state = state
            if conv_windows is not None:
                state.conv = conv_windows
        else:
            o, new_state = self._chunk(q, k, v, f, mask, state, use_cache, cu_seqlens, conv_windows)
        o = o.reshape(B, T, -1)
        if self.g_norm is not None:
            # o_proj(g_norm(swish(o))) in one Function: backward keeps o only (and the normed rows when they are kept)
            (y,) = norm_linear(o, self.g_norm, (self.o_proj,), pre_silu=True, keep_normed=keeps_normed(self))
        else:
            y = self.o_proj(F.silu(o))
        return (y, new_state) if residual is None else (y, new_state, h)

    def _decode_step(self, q, k, v, f, mask, state: SlotState) -> torch.Tensor:
        """One token per sequence, the slots updated in place: the operator's fused decode step takes the raw
        projections and gate logits (on the GPU the activations and gates are formed inside its two kernels)."""
        B = q.shape[0]
        if mask is not None:
            # a padding token neither decays nor writes: f = +inf gives g = logsigmoid(f) / τ = 0 and s = 0
            f = f.masked_fill(mask[:, -1:, None] == 0, float("inf"))
        o = gated_slot_attention_decode(
            q.view(B, self.num_heads, self.head_k_dim),
            k.view(B, self.num_kv_heads, self.head_k_dim),
            v.view(B, self.num_kv_heads, self.head_v_dim),
            f.view(B, self.num_kv_heads, self.num_slots),
            (state.hk, state.hv),
            self.scale,
            gate_logit_normalizer=self.gate_logit_normalizer,
            feature_map=self.feature_map_name,
            clamp_min=self.clamp_min,
            backend=self.backend,
        )
        return o.unsqueeze(1)

    def _chunk(self, q, k, v, f, mask, state: SlotState | None, use_cache, cu_seqlens, conv_windows):
        """The operator over whole sequences (training, prefill); returns (o, the new state or None)."""
        B, T = q.shape[:2]
        q_in = q.view(B, T, self.num_heads, self.head_k_dim)
        k_in = k.view(B, T, self.num_kv_heads, self.head_k_dim)
        v_in = v.view(B, T, self.num_kv_heads, self.head_v_dim)
        f = f.view(B, T, self.num_kv_heads, self.num_slots)
        # g = logsigmoid(f) / τ in float32, s = 1 - exp(g), in q's dtype; backward keeps f only
        gate_mask = None if mask is None else mask[:, :, None, None]
        gate_args = (self.gate_logit_normalizer, self.clamp_min, gate_mask, q_in.dtype)
        # swish saves its input for backward; the operator saves its output as well: let it recompute that instead
        # (unless recompute_features is off)
        features = swish_features(q_in, k_in, v_in, f, *gate_args) if self.feature_map is F.silu else None
        if features is not None:  # training on the GPU: one Function, its gradient one matrix (see fused.py)
            q, k, v, s, g = features
            recipes = swish_recipes([(q, q_in), (k, k_in), (v, v_in)]) if self.recompute_features else []
        else:
            q, k, v = self.feature_map(q_in), self.feature_map(k_in), F.silu(v_in)
            recipes = []
            if self.recompute_features:
                recipes.append((v, F.silu, v_in))
                if self.feature_map is F.silu:
                    recipes += [(q, F.silu, q_in), (k, F.silu, k_in)]
            s, g = slot_gates(f, *gate_args)
        recipes += slot_gate_recipes(f, s, g, *gate_args)

        new_state = None
        initial = (state.hk, state.hv) if state is not None else None
        with recompute_saved(recipes):
            o, final = gated_slot_attention(
                q, k, v, s, g, self.scale, initial, use_cache or state is not None, cu_seqlens,
                backend=self.backend, check_gate_values=False, keep_states=not self.recompute_states,
            )
        if final is not None:
            new_state = SlotState(final[0], final[1], conv_windows)
        return o, new_state
