"""GPU backend of the GSA operator (Triton): chunked forward/backward, and a recurrent kernel for decoding.

Importable without a GPU (the kernels then run only under TRITON_INTERPRET=1, in float32, for tests).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401

    from .chunk import chunk_gsa_triton
    from .recurrent import gsa_step_triton

    KERNELS_AVAILABLE = True
except ImportError:  # triton missing (e.g. macOS): the torch backend serves everything
    KERNELS_AVAILABLE = False

# Without gradients, prompts up to this many steps run token by token (two launches a step, no chunk states).
RECURRENT_MAX_STEPS = 8


def triton_gsa(q, k, v, s, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
               keep_states=False):
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, s, g, *(initial_state or ()))
    )
    if not needs_grad and cu_seqlens is None and q.shape[1] <= RECURRENT_MAX_STEPS:
        B, _, _, K = q.shape
        H, V, M = k.shape[2], v.shape[3], s.shape[3]
        if initial_state is None:
            hk = torch.zeros(B, H, K, M, device=q.device, dtype=torch.float32)
            hv = torch.zeros(B, H, M, V, device=q.device, dtype=torch.float32)
        else:
            hk, hv = (h.float().contiguous().clone() for h in initial_state)
        o = torch.stack(
            [gsa_step_triton(q[:, t], k[:, t], v[:, t], s[:, t], g[:, t], hk, hv, scale) for t in range(q.shape[1])], 1
        )
        return o, ((hk, hv) if output_final_state else None)
    return chunk_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, keep_states)


def _check_inplace_state(hk, hv):
    if hk.dtype != torch.float32 or hv.dtype != torch.float32 or not hk.is_contiguous() or not hv.is_contiguous():
        raise ValueError("in-place decoding needs float32 contiguous states (Hk, Hv)")


def triton_gsa_step(q, k, v, s, g, state, scale, inplace=False):
    """One token: q [B, HQ, K] ...; state (Hk [B,H,K,M], Hv [B,H,M,V]) float32 contiguous for in-place updates."""
    hk, hv = state
    if inplace:
        _check_inplace_state(hk, hv)
    if not inplace:
        hk, hv = hk.float().contiguous().clone(), hv.float().contiguous().clone()
    o = gsa_step_triton(q, k, v, s, g, hk, hv, scale)
    return o, (state if inplace else (hk, hv))


def triton_gsa_decode(q, k, v, f, state, scale, projections):
    """One token from raw projections and gate logits (see gsa.ops.gated_slot_attention_decode); in place."""
    _check_inplace_state(*state)
    return gsa_step_triton(q, k, v, None, f, *state, scale, projections=projections)
