"""Token-by-token GSA on the GPU: the decoding step (state updated in place, CUDA-graph safe).

A step is two launches so that every state block gets its own program (a decode step is a few KB of work per
block and pure latency otherwise): `_step_keys` updates Hk block by block, writes partial slot logits and (its
first block's program) the head's decay and write strength; `_step_values` sums the partials, takes the softmax,
updates Hv block by block and writes the output. A program's life is its memory latency, so each kernel issues
its state tile's loads (and in `_step_values` every load) before any arithmetic. The query heads of a group are the rows of one tile, so they share each state
read. States stay float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2


FEATURE_MAP_CODES = {"identity": 0, "swish": 1, "silu": 1, "relu": 2}


@triton.jit
def _feature_map(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        x = x * tl.sigmoid(x)
    elif FEATURE == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _gates(g_ptr, s_ptr, base, ms, m_ok, inv_tau, clamp_min, FROM_LOGITS: tl.constexpr, CLAMP: tl.constexpr):
    """(log gate g, write strength s) of one (sequence, head) [BM], float32. FROM_LOGITS: g_ptr holds the gate
    logits f and the layer's g = logsigmoid(f) / τ (clamped), s = 1 - exp(g) are formed here, saving launches."""
    if FROM_LOGITS:
        f = tl.load(g_ptr + base + ms, mask=m_ok, other=0.0).to(tl.float32)
        g = (tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))) * inv_tau
        if CLAMP:
            g = tl.maximum(g, clamp_min)
        g = tl.where(m_ok, g, 0.0)
        s = 1.0 - tl.exp(g)
    else:
        g = tl.load(g_ptr + base + ms, mask=m_ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + base + ms, mask=m_ok, other=0.0).to(tl.float32)
    return g, s


@triton.jit
def _load_state(ptr, mask, STREAM: tl.constexpr):
    """A state tile, read once a step: STREAM asks L2 to evict it first (the step touches each line once)."""
    if STREAM:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _store_state(ptr, value, mask, STREAM: tl.constexpr):
    if STREAM:
        tl.store(ptr, value, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _step_keys(
    q_ptr, k_ptr, s_ptr, g_ptr, hk_ptr, partial_ptr, gates_ptr, inv_tau, clamp_min,
    HQ, H, K, M, GROUP, NKB,
    BG: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
    FEATURE: tl.constexpr, FROM_LOGITS: tl.constexpr, CLAMP: tl.constexpr, STREAM: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    gg = tl.arange(0, BG)
    ms = tl.arange(0, BM)
    k_idx = i_k * BK + tl.arange(0, BK)
    m_ok = ms < M
    k_ok = k_idx < K
    # every load issued before the first use of any: a warp stalls at its first use of a pending load, so a load
    # written after some arithmetic (or after the state's store, which the compiler cannot move it past) costs a
    # second or third memory latency a program
    offs = (i_b * H + i_h) * K * M + k_idx[:, None] * M + ms[None, :]
    both = k_ok[:, None] & m_ok[None, :]
    hk = _load_state(hk_ptr + offs, both, STREAM)
    k = tl.load(k_ptr + (i_b * H + i_h) * K + k_idx, mask=k_ok, other=0.0)
    heads = i_h * GROUP + gg
    q = tl.load(q_ptr + (i_b * HQ + heads[:, None]) * K + k_idx[None, :],
                mask=(gg < GROUP)[:, None] & k_ok[None, :], other=0.0)
    # a barrier before the gates: ptxas otherwise sinks the state's loads below the gates' arithmetic, which waits
    # for the gate logits' load (two latencies); the gates' own load, after it, cannot be hoisted with that arithmetic
    # (ptxas' scheduling as Triton 3.6 drives it: read from the SASS, measured on the H200)
    tl.debug_barrier()
    g, s = _gates(g_ptr, s_ptr, (i_b * H + i_h) * M, ms, m_ok, inv_tau, clamp_min, FROM_LOGITS, CLAMP)
    decay = tl.exp(g)
    if i_k == 0:  # the head's decay and write strength for _step_values, which then has no gate arithmetic to wait on
        tl.store(gates_ptr + (i_b * H + i_h) * 2 * BM + ms, decay)
        tl.store(gates_ptr + (i_b * H + i_h) * 2 * BM + BM + ms, s)
    k = _feature_map(k.to(tl.float32), FEATURE)
    hk = hk * decay[None, :] + k[:, None] * s[None, :]
    _store_state(hk_ptr + offs, hk, both, STREAM)
    partial = tl.dot(_feature_map(q.to(tl.float32), FEATURE), hk, input_precision="ieee")
    tl.store(partial_ptr + (((i_b * H + i_h) * NKB + i_k) * BG + gg[:, None]) * BM + ms[None, :], partial)


@triton.jit
def _step_values(
    v_ptr, gates_ptr, hv_ptr, partial_ptr, o_ptr, scale,
    HQ, H, V, M, GROUP, NKB: tl.constexpr,
    BG: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, SWISH_V: tl.constexpr, STREAM: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    gg = tl.arange(0, BG)
    ms = tl.arange(0, BM)
    v_idx = i_v * BV + tl.arange(0, BV)
    m_ok = ms < M
    v_ok = v_idx < V
    # every load first, as in _step_keys: the state's columns, v, the gates _step_keys formed, and the key blocks'
    # partial logits (NKB is a constant, so the loop unrolls and they load at once, not one latency after another)
    offs = (i_b * H + i_h) * M * V + ms[:, None] * V + v_idx[None, :]
    both = m_ok[:, None] & v_ok[None, :]
    hv = _load_state(hv_ptr + offs, both, STREAM)
    v = tl.load(v_ptr + (i_b * H + i_h) * V + v_idx, mask=v_ok, other=0.0)
    decay = tl.load(gates_ptr + (i_b * H + i_h) * 2 * BM + ms)
    s = tl.load(gates_ptr + (i_b * H + i_h) * 2 * BM + BM + ms)
    logits = tl.zeros([BG, BM], dtype=tl.float32)
    for i_k in tl.static_range(NKB):
        logits += tl.load(partial_ptr + (((i_b * H + i_h) * NKB + i_k) * BG + gg[:, None]) * BM + ms[None, :])
    logits = tl.where(m_ok[None, :], scale * logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    v = v.to(tl.float32)
    if SWISH_V:  # raw projections: the layer's value activation is swish
        v = v * tl.sigmoid(v)
    hv = hv * decay[:, None] + s[:, None] * v[None, :]
    _store_state(hv_ptr + offs, hv, both, STREAM)
    o = tl.dot(p, hv, input_precision="ieee")
    heads = i_h * GROUP + gg
    tl.store(o_ptr + (i_b * HQ + heads[:, None]) * V + v_idx[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(gg < GROUP)[:, None] & v_ok[None, :])


# Launch settings of the step's two kernels: the block of the state a program takes (BK rows of Hk [K, M], BV columns
# of Hv [M, V]) and warps; module-level so that benchmarks/tune_decode.py can sweep them. H200, paper layer, batch 64,
# CUDA graph, with every load issued first (results/tune_decode_h200_v3.json): these (47.8 us; 5.5 at batch 1) beat
# 128 rows / 8 warps (50.2), 64 / 8 (55.0) and 128 / 4 (383); session 15's wider sweep of the earlier kernels agreed
# (results/tune_decode_h200.json). STREAM (state tiles read evict-first, written cache-streaming): 0.5-4 % faster
# steps at batch 64, no gain in the model's decoding, so off. Measured and not kept (session 21; NOTES has the
# figures, commits 313bef0 / d08212a / 899267d the code): a program a head in one launch (latency-bound: 20.6 us at
# batch 1), the two launches' programs chained through an arrival count (48.7-55.7 us at 64), the products as row
# sums instead of tl.dot (no change), several blocks a program with pipelined loads (twice as slow).
STEP_LAUNCH = dict(BK=64, BV=64, num_warps=4, STREAM=False)


@functools.lru_cache(maxsize=256)
def _step_blocks(HQ: int, H: int, K: int, V: int, M: int, bk: int, bv: int) -> tuple[int, ...]:
    """(group, BG, BK, BV, BM, key blocks, value blocks) of a step's shape: worked out once, not every token."""
    group = HQ // H
    BK, BV = min(bk, next_power_of_2(K)), min(bv, next_power_of_2(V))
    return group, next_power_of_2(group), BK, BV, next_power_of_2(M), cdiv(K, BK), cdiv(V, BV)


def gsa_step_triton(q, k, v, s, g, hk, hv, scale, projections: tuple[float, str, float | None] | None = None):
    """One token per sequence: q [B, HQ, K], k [B, H, K], v [B, H, V], s/g [B, H, M]; updates float32 contiguous
    hk [B, H, K, M] and hv [B, H, M, V] in place. Returns o [B, HQ, V].

    projections = (τ, feature map, clamp_min): q, k, v are the layer's raw projections and g its gate logits f
    (s unused); the kernels apply the feature map to q and k, swish to v, and form g and s from f themselves."""
    B, HQ, K = q.shape
    H, V, M = k.shape[1], v.shape[2], g.shape[2]
    config = STEP_LAUNCH
    group, BG, BK, BV, BM, nkb, nvb = _step_blocks(HQ, H, K, V, M, config["BK"], config["BV"])
    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    s = g if s is None else s.contiguous()
    raw = projections is not None
    tau, feature, clamp_min = projections if raw else (1.0, "identity", None)
    gate_args = dict(FROM_LOGITS=raw, CLAMP=clamp_min is not None)
    inv_tau, clamp = 1.0 / tau, float(clamp_min) if clamp_min is not None else 0.0
    partial = torch.empty(B, H, nkb, BG, BM, device=q.device, dtype=torch.float32)
    gates = torch.empty(B, H, 2, BM, device=q.device, dtype=torch.float32)  # a head's decay and write strength
    o = torch.empty(B, HQ, V, device=q.device, dtype=q.dtype)
    launch = dict(STREAM=config["STREAM"], num_warps=config["num_warps"])
    _step_keys[(B, H, nkb)](
        q, k, s, g, hk, partial, gates, inv_tau, clamp, HQ, H, K, M, group, nkb,
        BG=BG, BK=BK, BM=BM, FEATURE=FEATURE_MAP_CODES[feature], **gate_args, **launch,
    )
    _step_values[(B, H, nvb)](
        v, gates, hv, partial, o, scale, HQ, H, V, M, group, nkb,
        BG=BG, BV=BV, BM=BM, SWISH_V=raw, **launch,
    )
    return o
