"""Chunkwise GSA in plain PyTorch: the CPU path and the fallback everywhere.

The sequence is cut into chunks of C steps. Within a chunk, with G the chunk-local cumulative sum of the
log gates, the decay from step j to step t (j <= t) is exp(G_t - G_j) <= 1: it is always formed as that
difference, never as a ratio exp(G_t) / exp(G_j), so no gate value can overflow. Per chunk:

    states   Hk_end = Hk_prev * exp(G_C) + Σ_j k_j (s_j * exp(G_C - G_j))ᵀ        (same for Hv)
    pass 1   a_t = scale * [ exp(G_t) * (q_t Hk_prev) + Σ_{j<=t} (q_t·k_j) s_j exp(G_t - G_j) ]
    softmax  p_t = softmax(a_t)                                                      (fp32 at least)
    pass 2   o_t = (p_t * exp(G_t)) Hv_prev + Σ_{j<=t} [Σ_m p_t s_j exp(G_t - G_j)]_m v_j

The states depend only on (k, v, s, g), so they come from one scan over chunks before either pass.
The backward is written by hand (see `_ChunkGSA.backward`): it recomputes the chunk states from the inputs
instead of keeping them, so saved memory is the inputs plus the logits, O(T (K + V + M)).
"""

from __future__ import annotations

import functools

import torch

from .reference import compute_dtype

# A log gate below this is an exact zero gate in float32 (exp(-128) underflows); clamping keeps chunk cumulative
# sums finite when a caller passes -inf, while small cumsum magnitudes keep their float32 precision.
LOG_GATE_FLOOR = -128.0
# The factored form runs fastest on the largest chunk whose gate span allows it; the explicit form on small
# chunks, since it materialises a [C, C, M] decay per chunk.
FACTORED_CHUNK_SIZES = (64, 32, 16)
EXPLICIT_CHUNK_SIZE = 16
# The factored form scales keys by exp(-G_j) <= exp(span of the chunk). Below this span nothing can overflow
# (exp(60) * |q.k| * C stays far from the float32 maximum, 3e38), and a common positive factor per (t, m)
# changes no relative rounding, so it is as exact as the explicit form.
FACTORED_SPAN_LIMIT = 60.0


class _GateChunk:
    """The gate algebra of one call, on chunked g, s [N, H, NC, C, M].

    The intra-chunk work reduces to three contractions with the causal decay D[t, j, m] = exp(G_t - G_j):
        rows(R)         Y[t, m] = Σ_{j<=t} R[t, j] s_j[m] D[t, j, m]
        pairs(X)        R[t, j] = Σ_m X[t, m] s_j[m] D[t, j, m]            (j <= t, else 0)
        key_grad(R, X)  Z[j, m] = Σ_{t>=j} R[t, j] X[t, m] D[t, j, m]       (summed over query groups)
    Two forms compute them. Factored: D = exp(G_t) exp(-G_j), so all three are matrix products; used when every
    chunk's gate span -G_C is below FACTORED_SPAN_LIMIT (any realistic layer). Explicit: D materialised as a
    [C, C, M] tensor per chunk; used otherwise (gates near -inf), where it never forms a factor above 1.
    """

    def __init__(self, g: torch.Tensor, s: torch.Tensor, factored: bool):
        C = g.shape[-2]
        gc = g.clamp(min=LOG_GATE_FLOOR).cumsum(-2)
        g_end = gc[..., -1:, :]
        self.factored = factored
        self.s = s
        self.causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
        self.decay_start = torch.exp(gc)  # exp(G_t): from the chunk's start through step t
        self.decay_to_end = torch.exp(g_end - gc)  # exp(G_C - G_j): after step j to the chunk's end
        self.chunk_decay = torch.exp(g_end.squeeze(-2))  # exp(G_C)
        if factored:
            self.inv_decay = torch.exp(-gc)
            self.s_keys = s * self.inv_decay  # s_j exp(-G_j)
        else:
            diff = gc.unsqueeze(-2) - gc.unsqueeze(-3)  # [.., t, j, M] = G_t - G_j
            self.decay = torch.exp(diff.masked_fill(~self.causal[:, :, None], float("-inf")))
            self.weights = self.decay * s.unsqueeze(-3)

    def rows(self, r: torch.Tensor) -> torch.Tensor:
        """R [N, H, G, NC, C, C] -> [N, H, G, NC, C, M]."""
        if self.factored:
            return self.decay_start.unsqueeze(2) * (r.masked_fill(~self.causal, 0) @ self.s_keys.unsqueeze(2))
        return torch.einsum("nhgctj,nhctjm->nhgctm", r, self.weights)

    def pairs(self, x: torch.Tensor) -> torch.Tensor:
        """X [N, H, G, NC, C, M] -> [N, H, G, NC, C, C]."""
        if self.factored:
            r = (x * self.decay_start.unsqueeze(2)) @ self.s_keys.unsqueeze(2).transpose(-1, -2)
            return r.masked_fill(~self.causal, 0)
        return torch.einsum("nhgctm,nhctjm->nhgctj", x, self.weights)

    def key_grad(self, *terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Σ over (R, X) terms of Z[j, m], each R [N, H, G, NC, C, C], X [N, H, G, NC, C, M] -> [N, H, NC, C, M]."""
        if self.factored:
            ge = self.decay_start.unsqueeze(2)
            total = sum(r.masked_fill(~self.causal, 0).transpose(-1, -2) @ (x * ge) for r, x in terms)
            return self.inv_decay * total.sum(2)
        total = sum(r.unsqueeze(-1) * x.unsqueeze(-2) for r, x in terms)
        return (total.sum(2) * self.decay).sum(-3)


def _scan(start: torch.Tensor, local: torch.Tensor, chunk_decay: torch.Tensor, reverse: bool = False):
    """All chunk-boundary states of x_n = x_{n-1} * decay_n + local_n, decay acting on the slot (last) dim.

    start [N, H, D, M], local [N, H, NC, D, M], chunk_decay [N, H, NC, M]. Returns [N, H, NC + 1, D, M] whose
    entry n is the state before chunk n (reverse: the gradient after chunk n - 1, i.e. entry n + 1 is "after").
    """
    NC = local.shape[2]
    out = local.new_empty(local.shape[0], local.shape[1], NC + 1, *local.shape[3:])
    first, steps = (NC, range(NC - 1, -1, -1)) if reverse else (0, range(NC))
    out[:, :, first] = start
    for n in steps:
        src, dst = (n + 1, n) if reverse else (n, n + 1)
        torch.addcmul(local[:, :, n], out[:, :, src], chunk_decay[:, :, n, None, :], out=out[:, :, dst])
    return out


def _slot_states(state0, k, v, s_to_end, chunk_decay):
    """Chunk-boundary states of the joint slot state S = [Hk ; Hvᵀ], [N, H, NC + 1, K + V, M].

    Hk (K x M) and Hvᵀ (V x M) both decay along the slots, so one scan carries both.
    """
    kv = torch.cat([k, v], -1)
    return _scan(state0, kv.transpose(-1, -2) @ s_to_end, chunk_decay), kv


def without_autocast(backward):
    """Run an autograd Function's backward with autocast off, as its forward ran (see `gated_slot_attention`):
    backward may be called inside an autocast region, which would otherwise recast its float32 matmuls."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next(g.device.type for g in grads if g is not None)
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return run


class _ChunkGSA(torch.autograd.Function):
    """Core on chunked tensors: q [N,H,G,NC,C,K], k [N,H,NC,C,K], v [N,H,NC,C,V], s/g [N,H,NC,C,M],
    state0 = [Hk0 ; Hv0ᵀ] [N, H, K + V, M]."""

    @staticmethod
    def forward(ctx, q, k, v, s, g, state0, scale, factored):
        K = k.shape[-1]
        gates = _GateChunk(g, s, factored)
        states, _ = _slot_states(state0, k, v, s * gates.decay_to_end, gates.chunk_decay)
        before = states[:, :, :-1].unsqueeze(2)
        ge = gates.decay_start.unsqueeze(2)
        scores = q @ k.unsqueeze(2).transpose(-1, -2)
        logits = scale * (ge * (q @ before[..., :K, :]) + gates.rows(scores))
        p = torch.softmax(logits, dim=-1)
        o = (p * ge) @ before[..., K:, :].transpose(-1, -2) + gates.pairs(p) @ v.unsqueeze(2)
        ctx.save_for_backward(q, k, v, s, g, state0, logits)
        ctx.scale = scale
        ctx.factored = factored
        return o, states[:, :, -1]

    @staticmethod
    @without_autocast
    def backward(ctx, do, dstate_final):
        q, k, v, s, g, state0, logits = ctx.saved_tensors
        scale, K = ctx.scale, k.shape[-1]
        gates = _GateChunk(g, s, ctx.factored)
        s_to_end = s * gates.decay_to_end
        states, kv = _slot_states(state0, k, v, s_to_end, gates.chunk_decay)
        before = states[:, :, :-1].unsqueeze(2)
        kk, vv, ge = k.unsqueeze(2), v.unsqueeze(2), gates.decay_start.unsqueeze(2)
        p = torch.softmax(logits, dim=-1)

        # pass 2: o = (p * ge) Hv_before + P v
        d_pv = do @ vv.transpose(-1, -2)  # dP[t, j] = do_t . v_j
        dp = ge * (do @ before[..., K:, :]) + gates.rows(d_pv)
        dv = (gates.pairs(p).transpose(-1, -2) @ do).sum(2)

        # softmax, then pass 1: logits = scale * (ge * (q Hk_before) + scores-weighted slots)
        dlogits = p * (dp - (p * dp).sum(-1, keepdim=True))
        d_scores = gates.pairs(dlogits)
        scores = q @ kk.transpose(-1, -2)
        dq = scale * ((dlogits * ge) @ before[..., :K, :].transpose(-1, -2) + d_scores @ kk)
        dk = scale * (d_scores.transpose(-1, -2) @ q).sum(2)

        # state gradients run backwards over chunks: dS_before = dS_after * decay + local
        dlocal = torch.cat([scale * q.transpose(-1, -2) @ (dlogits * ge), do.transpose(-1, -2) @ (p * ge)], -2)
        dend = torch.zeros_like(state0) if dstate_final is None else dstate_final
        dstates = _scan(dend, dlocal.sum(2), gates.chunk_decay, reverse=True)
        dafter = dstates[:, :, 1:]
        dkv = s_to_end @ dafter.transpose(-1, -2)
        dk = dk + dkv[..., :K]
        dv = dv + dkv[..., K:]

        # s enters only as s_j exp(-G_j) (times a decay to a later step), so dG_j gets -s_j ds_j; every
        # later-step factor exp(G_t) multiplies a whole logit, probability or end state.
        ds = gates.key_grad((scale * scores, dlogits), (d_pv, p)) + gates.decay_to_end * (kv @ dafter)
        dgc = (dlogits * logits + dp * p).sum(2) - s * ds
        dgc[..., -1, :] += (dafter * states[:, :, 1:]).sum(-2)
        dg = dgc.flip(-2).cumsum(-2).flip(-2) * (g >= LOG_GATE_FLOOR)
        return dq, dk, dv, ds, dg, dstates[:, :, 0], None, None


def choose_chunking(g: torch.Tensor, packing) -> tuple[int, bool]:
    """(chunk size, factored?): the largest chunk of FACTORED_CHUNK_SIZES whose every gate span is small enough.

    Spans are sums of clamped log gates over aligned chunks; larger chunks' sums are sums of the smallest ones.
    A chunk longer than the longest sequence rounded up to the smallest size is not taken: it would be mostly
    padding (sequences of 8 steps padded to 64 cost 8x their work).
    """
    smallest = FACTORED_CHUNK_SIZES[-1]
    block_sums = _to_chunks(g.detach().clamp(min=LOG_GATE_FLOOR), smallest, packing).sum(-2)  # [N, H, NB, M]
    for size in FACTORED_CHUNK_SIZES:
        per_chunk = size // smallest
        nb = block_sums.shape[2]
        if per_chunk > nb:
            continue
        padded = torch.nn.functional.pad(block_sums, [0, 0, 0, -nb % per_chunk])
        spans = padded.view(*padded.shape[:2], -1, per_chunk, padded.shape[-1]).sum(-2)
        if bool(spans.min() >= -FACTORED_SPAN_LIMIT):
            return size, True
    return EXPLICIT_CHUNK_SIZE, False


def _sequence_index(cu_seqlens: torch.Tensor, T: int):
    """For packed sequences: each step's sequence id and position within its sequence."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    pos = torch.arange(T, device=cu_seqlens.device) - cu_seqlens[:-1][seq]
    return seq, pos, int(lengths.max())


def _to_chunks(x: torch.Tensor, chunk_size: int, packing) -> torch.Tensor:
    """[B, T, H, *D] -> [N, H, *D_lead, NC, C, D_last], zero-padded at each sequence's end.

    Zero padding is harmless: a padded step has s = 0 (writes nothing) and g = 0 (forgets nothing), so the
    state after the padding equals the state at the sequence's true end.
    """
    if packing is not None:
        seq, pos, longest = packing
        padded = x.new_zeros(int(seq.max()) + 1, longest, *x.shape[2:])
        padded[seq, pos] = x[0]
        x = padded
    B, T = x.shape[:2]
    num_chunks = -(-T // chunk_size)
    x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, num_chunks * chunk_size - T])
    x = x.view(B, num_chunks, chunk_size, *x.shape[2:])
    # move time (NC, C) next to the last dim: [B, NC, C, H, ..., D] -> [B, H, ..., NC, C, D]
    order = [0, *range(3, x.dim() - 1), 1, 2, x.dim() - 1]
    return x.permute(order)


def _from_chunks(x: torch.Tensor, T: int, packing) -> torch.Tensor:
    """Inverse of `_to_chunks` for the output [N, H, G, NC, C, V] -> [B, T, H*G, V]."""
    N, H, G, NC, C, V = x.shape
    x = x.permute(0, 3, 4, 1, 2, 5).reshape(N, NC * C, H * G, V)
    if packing is not None:
        seq, pos, _ = packing
        return x[seq, pos].unsqueeze(0)
    return x[:, :T].contiguous()


def chunk_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    factored: bool | None = None,
):
    """Chunkwise GSA over validated [B, T, H, D] inputs; see `gsa.ops.gated_slot_attention` for the contract.

    chunk_size and factored are chosen from the gates when None (`choose_chunking`); tests force each form.
    """
    dtype = compute_dtype(q.dtype)
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    packing = None if cu_seqlens is None else _sequence_index(cu_seqlens, T)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if chunk_size is None or factored is None:
        auto_size, auto_factored = choose_chunking(g, packing)
        chunk_size = auto_size if chunk_size is None else chunk_size
        factored = auto_factored if factored is None else factored
    qc = _to_chunks(q.to(dtype).view(B, T, H, HQ // H, K), chunk_size, packing)
    kc, vc, sc, gc = (_to_chunks(t.to(dtype), chunk_size, packing) for t in (k, v, s, g))
    if initial_state is None:
        state0 = q.new_zeros(N, H, K + V, M, dtype=dtype)
    else:
        state0 = torch.cat([initial_state[0].to(dtype), initial_state[1].to(dtype).transpose(-1, -2)], -2)
    o, state = _ChunkGSA.apply(qc, kc, vc, sc, gc, state0, float(scale), factored)
    o = _from_chunks(o, T, packing).to(q.dtype)
    final_state = (state[:, :, :K].contiguous(), state[:, :, K:].transpose(-1, -2).contiguous())
    return o, (final_state if output_final_state else None)
