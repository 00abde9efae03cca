"""The GSA recurrence, one step at a time: the obviously correct definition every fast path is tested against.

Per key/value head with m slots (spec §1):

    Hk_t = Hk_{t-1} diag(alpha_t) + k_t s_tᵀ        alpha_t = exp(g_t)
    p_t  = softmax(scale · q_tᵀ Hk_t)
    Hv_t = diag(alpha_t) Hv_{t-1} + s_t v_tᵀ
    o_t  = p_tᵀ Hv_t

Query heads are grouped: HQ / H query heads read the same (Hk, Hv).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 at least; float64 inputs stay float64 (the tests' truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    hk: torch.Tensor,
    hv: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token for a batch: q [B, HQ, K], k [B, H, K], v [B, H, V], s/g [B, H, M], hk [B, H, K, M], hv [B, H, M, V].

    Inputs must already be in the compute dtype. Returns (o [B, HQ, V], hk, hv), new tensors.
    """
    B, HQ, K = q.shape
    H = k.shape[1]
    alpha = torch.exp(g)
    hk = hk * alpha[:, :, None, :] + k[:, :, :, None] * s[:, :, None, :]
    hv = hv * alpha[:, :, :, None] + s[:, :, :, None] * v[:, :, None, :]
    qg = q.view(B, H, HQ // H, K)
    logits = scale * torch.einsum("bhgk,bhkm->bhgm", qg, hk)
    p = torch.softmax(logits, dim=-1)
    o = torch.einsum("bhgm,bhmv->bhgv", p, hv)
    return o.reshape(B, HQ, -1), hk, hv


def _recurrent_one_batch(q, k, v, s, g, scale, hk, hv):
    outputs = []
    for t in range(q.shape[1]):
        o, hk, hv = recurrent_step(q[:, t], k[:, t], v[:, t], s[:, t], g[:, t], hk, hv, scale)
        outputs.append(o)
    return torch.stack(outputs, dim=1), hk, hv


def reference_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Step-by-step GSA over [B, T, H, D] inputs (already validated). Differentiable by plain autograd."""
    dtype = compute_dtype(q.dtype)
    q, k, v, s, g = (t.to(dtype) for t in (q, k, v, s, g))
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    bounds = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    N = B if cu_seqlens is None else len(bounds)
    if initial_state is None:
        hk0 = q.new_zeros(N, H, K, M)
        hv0 = q.new_zeros(N, H, M, V)
    else:
        hk0, hv0 = (h.to(dtype) for h in initial_state)

    if cu_seqlens is None:
        o, hk, hv = _recurrent_one_batch(q, k, v, s, g, scale, hk0, hv0)
    else:
        pieces, hks, hvs = [], [], []
        for i, (a, b) in enumerate(bounds):
            o_i, hk_i, hv_i = _recurrent_one_batch(
                q[:, a:b], k[:, a:b], v[:, a:b], s[:, a:b], g[:, a:b], scale, hk0[i : i + 1], hv0[i : i + 1]
            )
            pieces.append(o_i)
            hks.append(hk_i)
            hvs.append(hv_i)
        o, hk, hv = torch.cat(pieces, dim=1), torch.cat(hks), torch.cat(hvs)
    final_state = (hk, hv) if output_final_state else None
    return o, final_state
