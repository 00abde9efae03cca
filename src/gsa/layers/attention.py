"""Softmax attention with rotary positions: the Transformer++ token mixer, for hybrids and baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import host_offsets


@dataclass
class KVState:
    """Keys and values seen so far, [B, H_kv, T_seen, D], and which of them are real tokens [B, T_seen]."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor

    def select(self, index: torch.Tensor) -> None:
        self.k, self.v, self.valid = (t.index_select(0, index) for t in (self.k, self.v, self.valid))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, D] at integer positions [B, T] (half-split layout, as Llama)."""
    D = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=dtype) / D))
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)
    x1, x2 = x.to(dtype).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Causal attention within each of the sequences packed along T: q, k, v [1, H, T, D] -> [1, H, T, D].

    No [T, T] mask: sequences of similar length (same power-of-two bucket) are gathered into one right-padded
    batch and run with is_causal=True, which needs no mask (a real query never sees the padding after it) and
    keeps SDPA's flash kernels eligible. At most log2(T) calls; padding at most doubles a bucket's work.
    """
    offsets = host_offsets(cu_seqlens)  # read from the device once per cu_seqlens tensor, not once per layer
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    starts = offsets[:-1]
    buckets: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        buckets.setdefault(1 << (length - 1).bit_length(), []).append(i)
    pieces, rows = [], []
    for members in buckets.values():
        longest = max(lengths[i] for i in members)
        offsets = torch.arange(longest)
        # rows to gather, [n, longest]: a sequence's padding repeats its last token (never attended to, dropped)
        index = torch.stack([starts[i] + offsets.clamp(max=lengths[i] - 1) for i in members]).to(q.device)
        keep = torch.cat([offsets[: lengths[i]] + j * longest for j, i in enumerate(members)]).to(q.device)
        batch = [x[0][:, index].transpose(0, 1) for x in (q, k, v)]  # [n, H, longest, D]
        o = F.scaled_dot_product_attention(*batch, is_causal=True)
        pieces.append(o.transpose(0, 1).reshape(o.shape[1], -1, o.shape[-1])[:, keep])
        rows.append(index.reshape(-1)[keep])
    order = torch.argsort(torch.cat(rows))
    return torch.cat(pieces, 1)[:, order].unsqueeze(0)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"attention needs hidden_size ({hidden_size}) divisible by num_heads ({num_heads}) and num_heads "
                f"a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: KVState | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVState | None]:
        """x [B, T, D], positions [B, T]; attention_mask [B, T'] marks real tokens (last T columns are x's)."""
        B, T, _ = x.shape
        q = rotate(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions, self.rope_theta)
        k = rotate(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            valid = attention_mask[:, -T:].bool()
        if state is not None:
            k = torch.cat([state.k, k], 2)
            v = torch.cat([state.v, v], 2)
            valid = torch.cat([state.valid, valid], 1)
        S = k.shape[2]
        new_state = KVState(k, v, valid) if (use_cache or state is not None) else None

        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = (t.repeat_interleave(groups, 1) for t in (k, v))
        if cu_seqlens is not None:
            o = packed_causal_attention(q, k, v, cu_seqlens)
        elif attention_mask is None and state is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            mask = (causal[None] & valid[:, None, :])[:, None]
            # a padding query that sees nothing would give NaN; let it see itself (its output is ignored)
            own = torch.arange(T, device=x.device)[:, None] + (S - T) == torch.arange(S, device=x.device)[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | own[None, None])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), new_state
