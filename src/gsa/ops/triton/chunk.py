"""Chunkwise GSA on the GPU: Triton forward and backward kernels and their autograd Function.

Layout: inputs flattened to [tokens, heads, width]; sequences given by cu_seqlens (a plain batch is B sequences
of length T). Chunks of BT steps never straddle sequences. The joint slot state S = [Hk ; Hvᵀ] ([K + V, M]: both
halves decay along the slots) is kept per chunk boundary in `states` [slots, H, K + V, M]; sequence i owns slots
slot_base[i] .. slot_base[i] + chunks_i, slot n holding the state before its chunk n (the last one: its final state).

States: `_gate_factors` forms each chunk's gate factors once (chunk-parallel: s * exp(G_C - G) and the decay
exp(G_C)), then the states come one of three ways (`state_plan`):
- "walk": `_walk_states`, one program per (sequence, head, block of state rows), walks the sequence's chunks,
  adding each chunk's contribution to a state held in registers and storing it at every boundary. Chosen when
  sequences x heads x row blocks fill the GPU (many short sequences).
- "segment": the same walk over segments of the sequences (`SegmentLayout`), for few long ones (chosen otherwise):
  walk every segment from zero keeping only its end, `_join_segments` runs the recurrence across segments (each
  segment's true start), then walk again from those starts storing every slot.
- "split": `_local_states` computes every chunk's contribution in parallel, then `_scan_slots` runs the
  recurrence x_n = x_{n-1} exp(G_C) + local_n elementwise (many programs, memory-bound). Only on request
  (GSA_TRITON_STATE_PASS=split): segment beat it on the H200 at 8K and 16K (benchmarks/NOTES.md, session 6).
Forward: the states, then `_output_fwd`, every chunk in parallel: logits over K blocks, softmax over slots, output
over V blocks. Backward: recompute the states; `_intra_bwd` (chunk-parallel: slot gradients, dq and the
within-chunk part of ds); the state gradient the same three ways (`_walk_dstates` over sequences or segments, or
`_local_dstates` + a reverse `_scan_slots`); `_state_grads_bwd` (chunk-parallel: dk and dv whole, from the slot
gradients and the state gradients, the state part of ds, and dg as a reverse cumulative sum within each chunk).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..checks import LastTensorCache, host_offsets
from ..chunk import FACTORED_SPAN_LIMIT, LOG_GATE_FLOOR, without_autocast
from .common import (
    cdiv,
    chunk_gates,
    chunk_span,
    dot_config,
    key_grad_exact,
    load_rows,
    next_power_of_2,
    key_grad_sub,
    pairs_exact,
    pairs_sub,
    rows_exact,
    rows_sub,
    state_offsets,
    store_rows,
    sub_span,
)

CHUNK = 64
SUB_CHUNK = 16  # rows of a sub-chunk in the steep-gate form (see common.py)


@triton.jit
def _local_states(
    x_ptr, factors_ptr, states_ptr, chunk_seq_ptr, chunk_start_ptr, chunk_slot_ptr, cu_ptr,
    H, W, M, KV, row0,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """What chunk c adds to rows row0 + [d0, d0 + BD) of S: xᵀ (s * exp(G_C - G)) (the factor from
    `_gate_factors`), written to the slot after the chunk (the scan turns it into the state there)."""
    i_c = tl.program_id(0)
    i_d = tl.program_id(1)
    i_h = tl.program_id(2)
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    slot = tl.load(chunk_slot_ptr + i_c).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    ms = tl.arange(0, BM)
    d0 = i_d * BD
    x = load_rows(x_ptr, t0, eos, i_h, H, W, d0, rows, dd).to(DOT_DT)
    factors = load_rows(factors_ptr, t0, eos, i_h, H, M, 0, rows, ms).to(DOT_DT)
    local = tl.dot(tl.trans(x), factors, input_precision=PRECISION)
    base, offs, mask = state_offsets(slot + 1, i_h, H, KV, M, row0 + d0, row0 + W, dd, ms)
    tl.store(states_ptr + base + offs, local.to(states_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _local_dstates(
    x_ptr, y_ptr, dstates_ptr, chunk_seq_ptr, chunk_start_ptr, chunk_slot_ptr, cu_ptr, x_scale,
    H, HQ, W, M, KV, row0, GROUP,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """What chunk c adds to the gradient of the state before it: x_scale Σ_group xᵀ y, where (x, y) is
    (q, dlogits exp(G)) for key rows and (do, p exp(G)) for value rows; written to the chunk's own slot."""
    i_c = tl.program_id(0)
    i_d = tl.program_id(1)
    i_h = tl.program_id(2)
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    slot = tl.load(chunk_slot_ptr + i_c).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    ms = tl.arange(0, BM)
    d0 = i_d * BD
    local = tl.zeros([BD, BM], dtype=tl.float32)
    for i_g in range(GROUP):
        i_hq = i_h * GROUP + i_g
        x = load_rows(x_ptr, t0, eos, i_hq, HQ, W, d0, rows, dd).to(DOT_DT)
        y = load_rows(y_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms).to(DOT_DT)
        local += tl.dot(tl.trans(x), y, input_precision=PRECISION)
    base, offs, mask = state_offsets(slot, i_h, H, KV, M, row0 + d0, row0 + W, dd, ms)
    tl.store(dstates_ptr + base + offs, (x_scale * local).to(dstates_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sequence_span(cu_ptr, slot_base_ptr, chunk_base_ptr, i_nh, H, BT: tl.constexpr):
    """Program i_nh = span * H + head of a per-(span, head) kernel, a span being a sequence or a segment of one
    (`ChunkLayout.segments`): the head, the span's first token, its end, its first state slot, its chunks, and
    its first chunk's index."""
    i_n = i_nh // H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    slot0 = tl.load(slot_base_ptr + i_n).to(tl.int64)
    chunk0 = tl.load(chunk_base_ptr + i_n).to(tl.int64)
    return i_nh % H, bos, eos, slot0, tl.cdiv(eos - bos, BT), chunk0


@triton.jit
def _store_halves(end_ptr, end_v_ptr, i_nh, K, V, M, r, m, x, mask):
    """Entries (row r of the joint [K + V, M], slot m; r, m, x and mask of one shape) of one (sequence, head)'s last
    value x, in float32, into the halves the caller gets: end [N, H, K, M] and end_v [N, H, M, V] (Hv transposed),
    each contiguous (no copy afterwards)."""
    n = i_nh.to(tl.int64)
    key = r < K
    tl.store(end_ptr + n * K * M + r * M + m, x, mask=mask & key)
    tl.store(end_v_ptr + n * M * V + m * V + (r - K), x, mask=mask & ~key)


@triton.jit
def _store_walk_end(end_ptr, end_v_ptr, i_nh, K, V, M, KV, is_key, d0, dd, ms, offs, x, mask,
                    SPLIT: tl.constexpr):
    """A walking program's rows (a block of one half: is_key, from row d0 of it; offs within one (slot, head)
    of the joint state) of its last value x, float32: into the joint end [N, H, K + V, M], or SPLIT into the
    halves end [N, H, K, M] / end_v [N, H, M, V]. One branch per program, the key rows' offsets the joint's
    (keys come first), so it costs the walk no more registers than the joint store."""
    n = i_nh.to(tl.int64)
    if SPLIT:
        if is_key:
            tl.store(end_ptr + n * K * M + offs, x, mask=mask)
        else:
            tl.store(end_v_ptr + n * M * V + ms[None, :] * V + (d0 + dd)[:, None], x, mask=mask)
    else:
        tl.store(end_ptr + n * KV * M + offs, x, mask=mask)


@triton.jit
def _scan_slots(
    slots_ptr, decay_ptr, start_ptr, end_ptr, end_v_ptr, cu_ptr, slot_base_ptr, chunk_base_ptr,
    H, K, V, M, SIZE,
    BT: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_START: tl.constexpr,
    STORE_END: tl.constexpr,
):
    """x_n = x_{n-1} * decay_n + local_n over one sequence's chunks, elementwise on BLOCK entries of [K + V, M].

    Forward: x_0 = start (initial state), local_n sits in slot n + 1 and is replaced by the state there.
    Reverse: x = start (final-state gradient) enters slot NT; local_n sits in slot n and is replaced by the
    gradient of the state before chunk n. STORE_END: the last x (final state / initial-state gradient) goes to
    the halves end [N, H, K, M] and end_v [N, H, M, V], float32."""
    i_nh = tl.program_id(0)
    i_b = tl.program_id(1)
    i_h, _, _, slot0, num_chunks, chunk0 = _sequence_span(cu_ptr, slot_base_ptr, chunk_base_ptr, i_nh, H, BT)
    e = i_b * BLOCK + tl.arange(0, BLOCK)
    ok = e < SIZE
    m = e % M
    x = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_START:
        x = tl.load(start_ptr + i_nh.to(tl.int64) * SIZE + e, mask=ok, other=0.0).to(tl.float32)
    if REVERSE:
        tl.store(slots_ptr + ((slot0 + num_chunks) * H + i_h) * SIZE + e, x.to(slots_ptr.dtype.element_ty), mask=ok)
        for back in range(num_chunks):
            n = num_chunks - 1 - back
            ptr = slots_ptr + ((slot0 + n) * H + i_h) * SIZE + e
            d = tl.load(decay_ptr + ((chunk0 + n) * H + i_h) * M + m, mask=ok, other=0.0)
            x = x * d + tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr, x.to(slots_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(slots_ptr + (slot0 * H + i_h) * SIZE + e, x.to(slots_ptr.dtype.element_ty), mask=ok)
        for n in range(num_chunks):
            ptr = slots_ptr + ((slot0 + n + 1) * H + i_h) * SIZE + e
            d = tl.load(decay_ptr + ((chunk0 + n) * H + i_h) * M + m, mask=ok, other=0.0)
            x = x * d + tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr, x.to(slots_ptr.dtype.element_ty), mask=ok)
    if STORE_END:
        _store_halves(end_ptr, end_v_ptr, i_nh, K, V, M, e // M, m, x, ok)


@triton.jit
def _joint_block(i_d, K, V, BD: tl.constexpr):
    """Row block i_d of the joint state [K + V, M] (key blocks first): (is a key block, first row in its half,
    the half's first joint row, the half's width)."""
    blocks_k = tl.cdiv(K, BD)
    is_key = i_d < blocks_k
    d0 = tl.where(is_key, i_d, i_d - blocks_k) * BD
    return is_key, d0, tl.where(is_key, 0, K), tl.where(is_key, K, V)


@triton.jit
def _walk_start(start_ptr, i_nh, KV, M, row0, row_limit, dd, ms, BD: tl.constexpr, BM: tl.constexpr,
                HAS_START: tl.constexpr):
    """A walking program's rows row0 + dd (below row_limit) within one (slot, head) of the joint state: offsets,
    mask, and the state it starts from (those rows of start[i_nh] in float32, or zeros)."""
    base, offs, mask = state_offsets(0, 0, 1, KV, M, row0, row_limit, dd, ms)
    offs = base + offs  # within one (slot, head): small enough for int32
    state = tl.zeros([BD, BM], dtype=tl.float32)
    if HAS_START:
        state = tl.load(start_ptr + i_nh.to(tl.int64) * KV * M + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, state


@triton.jit
def _gate_factors(
    s_ptr, g_ptr, factors_ptr, decay_ptr, chunk_seq_ptr, chunk_start_ptr, cu_ptr,
    H, M,
    BT: tl.constexpr, BM: tl.constexpr, FLOOR: tl.constexpr,
):
    """What both state passes need of chunk c's gates, formed once per chunk and head instead of once per row
    block of the state: s * exp(G_C - G) [rows, M], in the state products' operand dtype, and exp(G_C)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    ms = tl.arange(0, BM)
    _, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
    store_rows(factors_ptr, s * tl.exp(g_end[None, :] - cum), t0, eos, i_h, H, M, 0, rows, ms)
    tl.store(decay_ptr + (i_c.to(tl.int64) * H + i_h) * M + ms, tl.exp(g_end), mask=ms < M)


@triton.jit
def _store_slot(slots_ptr, slot, i_h, H, KV, M, offs, state, mask):
    """A walking program's rows (offs within one (slot, head)) of `slot`, in the slots' dtype."""
    tl.store(slots_ptr + (slot * H + i_h) * KV * M + offs, state.to(slots_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _walk_states(
    k_ptr, v_ptr, factors_ptr, decay_ptr, states_ptr, start_ptr, end_ptr, end_v_ptr, cu_ptr, slot_base_ptr,
    chunk_base_ptr,
    H, K, V, M, KV,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, HAS_START: tl.constexpr,
    STORE_SLOTS: tl.constexpr, STORE_EDGE: tl.constexpr, STORE_END: tl.constexpr, SPLIT_END: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """States of one span (sequence or segment) and head, rows of one block, at every chunk boundary:
    S_n+1 = S_n exp(G_C) + xᵀ (s * exp(G_C - G)) over chunk n, with S held in float32 registers; both gate factors
    come from `_gate_factors`. STORE_SLOTS: the states before each chunk; STORE_EDGE: the state after the last
    chunk, in its slot; STORE_END: that state in float32 in end (a segment's contribution, joint), or SPLIT_END
    in the halves end / end_v (a sequence's final state, as the caller gets it)."""
    i_nh = tl.program_id(0)
    i_d = tl.program_id(1)
    i_h, bos, eos, slot0, num_chunks, chunk0 = _sequence_span(cu_ptr, slot_base_ptr, chunk_base_ptr, i_nh, H, BT)
    is_key, d0, row0, W = _joint_block(i_d, K, V, BD)
    if is_key:
        x_ptr = k_ptr
    else:
        x_ptr = v_ptr
    rows = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    ms = tl.arange(0, BM)
    offs, mask, state = _walk_start(start_ptr, i_nh, KV, M, row0 + d0, row0 + W, dd, ms, BD, BM, HAS_START)
    for n in range(num_chunks):
        t0 = bos + n * BT
        if STORE_SLOTS:
            _store_slot(states_ptr, slot0 + n, i_h, H, KV, M, offs, state, mask)
        x = load_rows(x_ptr, t0, eos, i_h, H, W, d0, rows, dd).to(DOT_DT)
        factors = load_rows(factors_ptr, t0, eos, i_h, H, M, 0, rows, ms).to(DOT_DT)
        decay = tl.load(decay_ptr + ((chunk0 + n) * H + i_h) * M + ms, mask=ms < M, other=0.0)
        state = state * decay[None, :] + tl.dot(tl.trans(x), factors, input_precision=PRECISION)
    if STORE_EDGE:
        _store_slot(states_ptr, slot0 + num_chunks, i_h, H, KV, M, offs, state, mask)
    if STORE_END:
        _store_walk_end(end_ptr, end_v_ptr, i_nh, K, V, M, KV, is_key, d0, dd, ms, offs, state, mask, SPLIT_END)


@triton.jit
def _walk_dstates(
    q_ptr, do_ptr, dl_dec_ptr, p_dec_ptr, dstates_ptr, decay_ptr, start_ptr, end_ptr, end_v_ptr, cu_ptr, slot_base_ptr,
    chunk_base_ptr,
    scale, H, HQ, K, V, M, KV, GROUP,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, HAS_START: tl.constexpr,
    STORE_SLOTS: tl.constexpr, STORE_EDGE: tl.constexpr, STORE_END: tl.constexpr, SPLIT_END: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The state gradient, walking one span's chunks backwards: dS_n = dS_n+1 exp(G_C) + x_scale Σ_group xᵀ y
    over chunk n, (x, y) = (q, dlogits exp(G)) for key rows (x_scale = scale) and (do, p exp(G)) for value rows.
    STORE_SLOTS: dS_n in slot n; STORE_EDGE: the gradient it starts from (final state's) in the last slot;
    STORE_END: dS_0 in float32 in end (joint), or SPLIT_END in the halves end / end_v."""
    i_nh = tl.program_id(0)
    i_d = tl.program_id(1)
    i_h, bos, eos, slot0, num_chunks, chunk0 = _sequence_span(cu_ptr, slot_base_ptr, chunk_base_ptr, i_nh, H, BT)
    is_key, d0, row0, W = _joint_block(i_d, K, V, BD)
    if is_key:
        x_ptr = q_ptr
        y_ptr = dl_dec_ptr
    else:
        x_ptr = do_ptr
        y_ptr = p_dec_ptr
    x_scale = tl.where(is_key, scale, 1.0)
    rows = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    ms = tl.arange(0, BM)
    offs, mask, state = _walk_start(start_ptr, i_nh, KV, M, row0 + d0, row0 + W, dd, ms, BD, BM, HAS_START)
    if STORE_EDGE:
        _store_slot(dstates_ptr, slot0 + num_chunks, i_h, H, KV, M, offs, state, mask)
    for back in range(num_chunks):
        n = num_chunks - 1 - back
        t0 = bos + n * BT
        local = tl.zeros([BD, BM], dtype=tl.float32)
        for i_g in range(GROUP):
            i_hq = i_h * GROUP + i_g
            x = load_rows(x_ptr, t0, eos, i_hq, HQ, W, d0, rows, dd).to(DOT_DT)
            y = load_rows(y_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms).to(DOT_DT)
            local += tl.dot(tl.trans(x), y, input_precision=PRECISION)
        decay = tl.load(decay_ptr + ((chunk0 + n) * H + i_h) * M + ms, mask=ms < M, other=0.0)
        state = state * decay[None, :] + x_scale * local
        if STORE_SLOTS:
            _store_slot(dstates_ptr, slot0 + n, i_h, H, KV, M, offs, state, mask)
    if STORE_END:
        _store_walk_end(end_ptr, end_v_ptr, i_nh, K, V, M, KV, is_key, d0, dd, ms, offs, state, mask, SPLIT_END)


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _join_segments(
    ends_ptr, decay_ptr, start_ptr, starts_ptr, final_ptr, final_v_ptr, slots_ptr,
    cu_ptr, slot_base_ptr, seg_first_ptr, seg_cu_ptr, seg_chunk_ptr,
    H, K, V, M, KV,
    BT: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, REVERSE: tl.constexpr,
    HAS_START: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    """The segments' recurrence for one sequence and head, on BR rows of the joint state [K + V, M]:
    x_after(j) = x_before(j) * decay(j) + ends(j), decay(j) the product of segment j's chunk decays (BC chunks a
    load, so that a segment costs a few dependent loads, not one per chunk), ends(j) what the segment's walk from
    zero gave. Forward: x enters as the initial state; each segment's start state goes to starts, the final state
    to the sequence's last slot (and, STORE_FINAL, to the halves final [N, H, K, M] / final_v [N, H, M, V]).
    Reverse: x enters as the final-state gradient (also stored in the last slot) and runs from the last segment
    back; each segment's end gradient goes to starts, the initial-state gradient (STORE_FINAL) to the halves."""
    i_nh = tl.program_id(0)
    i_r = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    rr = tl.arange(0, BR)
    ms = tl.arange(0, BM)
    cc = tl.arange(0, BC)
    base, offs, mask = state_offsets(0, 0, 1, KV, M, i_r * BR, KV, rr, ms)
    x = tl.zeros([BR, BM], dtype=tl.float32)
    if HAS_START:
        x = tl.load(start_ptr + i_nh.to(tl.int64) * KV * M + base + offs, mask=mask, other=0.0).to(tl.float32)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    last_slot = tl.load(slot_base_ptr + i_n).to(tl.int64) + tl.cdiv(eos - bos, BT)
    last_ptr = slots_ptr + (last_slot * H + i_h) * KV * M + base + offs
    if REVERSE:
        tl.store(last_ptr, x.to(slots_ptr.dtype.element_ty), mask=mask)
    first = tl.load(seg_first_ptr + i_n).to(tl.int64)
    count = tl.load(seg_first_ptr + i_n + 1).to(tl.int64) - first
    for step in range(count):
        if REVERSE:
            j = first + count - 1 - step
        else:
            j = first + step
        tl.store(starts_ptr + (j * H + i_h) * KV * M + base + offs, x, mask=mask)
        chunk0 = tl.load(seg_chunk_ptr + j).to(tl.int64)
        chunks = tl.cdiv(tl.load(seg_cu_ptr + j + 1).to(tl.int64) - tl.load(seg_cu_ptr + j).to(tl.int64), BT)
        decay = tl.full([BM], 1.0, dtype=tl.float32)
        for c0 in range(0, chunks, BC):
            c = c0 + cc
            tile = tl.load(decay_ptr + ((chunk0 + c) * H + i_h)[:, None] * M + ms[None, :],
                           mask=(c < chunks)[:, None] & (ms < M)[None, :], other=1.0)
            decay *= tl.reduce(tile, 0, _multiply)
        x = x * decay[None, :] + tl.load(ends_ptr + (j * H + i_h) * KV * M + base + offs, mask=mask, other=0.0)
    if not REVERSE:
        tl.store(last_ptr, x.to(slots_ptr.dtype.element_ty), mask=mask)
    if STORE_FINAL:
        _store_halves(final_ptr, final_v_ptr, i_nh, K, V, M, (i_r * BR + rr)[:, None], ms[None, :], x, mask)


@triton.jit
def _output_fwd(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, states_ptr, logits_ptr, o_ptr,
    chunk_seq_ptr, chunk_start_ptr, chunk_slot_ptr, cu_ptr, scale,
    HQ, H, K, V, M, KV, GROUP,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    FLOOR: tl.constexpr, SPAN_LIMIT: tl.constexpr, SUB: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_hq = tl.program_id(1)
    i_h = i_hq // GROUP
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    slot = tl.load(chunk_slot_ptr + i_c).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ms = tl.arange(0, BM)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    _, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
    fast = chunk_span(g_end, ms, M) <= SPAN_LIMIT
    decay_start = tl.exp(cum)
    s_keys = s * tl.exp(tl.minimum(-cum, SPAN_LIMIT))  # exact when fast (-G <= span <= limit); never overflows
    causal = rows[:, None] >= cols[None, :]

    # pass 1: logits = scale * (exp(G) * (q Hk_before) + rows(q kᵀ))
    q_state = tl.zeros([BT, BM], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        q = load_rows(q_ptr, t0, eos, i_hq, HQ, K, i_k * BK, rows, kk).to(DOT_DT)
        k = load_rows(k_ptr, t0, eos, i_h, H, K, i_k * BK, rows, kk).to(DOT_DT)
        base, offs, mask = state_offsets(slot, i_h, H, KV, M, i_k * BK, K, kk, ms)
        hk = tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(DOT_DT)
        q_state += tl.dot(q, hk, input_precision=PRECISION)
        scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    scores = tl.where(causal, scores, 0.0)
    sub = fast  # only read where fast is False; the sub-chunk spans are computed only for those chunks
    if not fast:
        sub = sub_span(cum, rows, ms, M, BT, SUB) <= SPAN_LIMIT
    if fast:
        intra = decay_start * tl.dot(scores.to(DOT_DT), s_keys.to(DOT_DT), input_precision=PRECISION)
    elif sub:
        intra = rows_sub(scores, s, cum, rows, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    else:
        intra = rows_exact(scores, s, cum, rows, cols, BT, BM)
    logits = scale * (decay_start * q_state + intra)
    logits = tl.where((ms < M)[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    store_rows(logits_ptr, logits, t0, eos, i_hq, HQ, M, 0, rows, ms)

    # pass 2: o = (p * exp(G)) Hv_before + pairs(p) v
    p_decayed = p * decay_start
    if fast:
        probs = tl.dot(p_decayed.to(DOT_DT), tl.trans(s_keys.to(DOT_DT)), input_precision=PRECISION)
        probs = tl.where(causal, probs, 0.0)
    elif sub:
        probs = pairs_sub(p, s, cum, rows, causal, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    else:
        probs = pairs_exact(p, s, cum, rows, cols, BT)
    for i_v in range(tl.cdiv(V, BV)):
        base, offs, mask = state_offsets(slot, i_h, H, KV, M, K + i_v * BV, K + V, vv, ms)
        hv_t = tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(DOT_DT)  # [BV, BM] = Hvᵀ rows
        v = load_rows(v_ptr, t0, eos, i_h, H, V, i_v * BV, rows, vv).to(DOT_DT)
        o = tl.dot(p_decayed.to(DOT_DT), tl.trans(hv_t), input_precision=PRECISION)
        o += tl.dot(probs.to(DOT_DT), v, input_precision=PRECISION)
        store_rows(o_ptr, o, t0, eos, i_hq, HQ, V, i_v * BV, rows, vv)


@triton.jit
def _probabilities(logits_ptr, t0, eos, i_hq, HQ, M, rows, ms):
    """One chunk and query head's slot probabilities p (the softmax of its stored logits), and the logits with
    the padding slots at 0."""
    logits = load_rows(logits_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms)
    logits = tl.where((ms < M)[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    return p, tl.where((ms < M)[None, :], logits, 0.0)


@triton.jit
def _intra_bwd(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, states_ptr, logits_ptr, do_ptr,
    dq_ptr, ds_ptr, dgq_ptr, dl_ptr, dl_dec_ptr, p_dec_ptr,
    chunk_seq_ptr, chunk_start_ptr, chunk_slot_ptr, cu_ptr, scale,
    HQ, H, K, V, M, KV, GROUP,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    FLOOR: tl.constexpr, SPAN_LIMIT: tl.constexpr, SUB: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per chunk and query head: dq; ds's within-chunk part (per query head: [tokens, HQ, M], summed over the
    group later); the query-side gate gradient dlogits*logits + dp*p; dlogits*exp(G) and p*exp(G) (for the
    reverse scan, and for `_state_grads_bwd`'s pair weights); dlogits itself for chunks off the factored form."""
    i_c = tl.program_id(0)
    i_hq = tl.program_id(1)
    i_h = i_hq // GROUP
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    slot = tl.load(chunk_slot_ptr + i_c).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ms = tl.arange(0, BM)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    _, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
    span = chunk_span(g_end, ms, M)
    fast = span <= SPAN_LIMIT
    decay_start = tl.exp(cum)
    s_keys = s * tl.exp(tl.minimum(-cum, SPAN_LIMIT))
    causal = rows[:, None] >= cols[None, :]
    p, logits = _probabilities(logits_ptr, t0, eos, i_hq, HQ, M, rows, ms)

    # pass 2 backward: dp = exp(G) (do Hv_beforeᵀ) + rows(do vᵀ)
    do_state = tl.zeros([BT, BM], dtype=tl.float32)
    d_pv = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        do = load_rows(do_ptr, t0, eos, i_hq, HQ, V, i_v * BV, rows, vv).to(DOT_DT)
        v = load_rows(v_ptr, t0, eos, i_h, H, V, i_v * BV, rows, vv).to(DOT_DT)
        base, offs, mask = state_offsets(slot, i_h, H, KV, M, K + i_v * BV, K + V, vv, ms)
        hv_t = tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(DOT_DT)
        do_state += tl.dot(do, hv_t, input_precision=PRECISION)
        d_pv += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    d_pv = tl.where(causal, d_pv, 0.0)
    sub = fast  # only read where fast is False; the sub-chunk spans are computed only for those chunks
    if not fast:
        sub = sub_span(cum, rows, ms, M, BT, SUB) <= SPAN_LIMIT
    if fast:
        dp = decay_start * (do_state + tl.dot(d_pv.to(DOT_DT), s_keys.to(DOT_DT), input_precision=PRECISION))
    elif sub:
        dp = decay_start * do_state + rows_sub(d_pv, s, cum, rows, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    else:
        dp = decay_start * do_state + rows_exact(d_pv, s, cum, rows, cols, BT, BM)
    dlogits = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    store_rows(dgq_ptr, dlogits * logits + dp * p, t0, eos, i_hq, HQ, M, 0, rows, ms)
    store_rows(dl_dec_ptr, dlogits * decay_start, t0, eos, i_hq, HQ, M, 0, rows, ms)
    store_rows(p_dec_ptr, p * decay_start, t0, eos, i_hq, HQ, M, 0, rows, ms)
    # `_state_grads_bwd` forms dk's pair weights from dlogits itself off the factored form, deciding the form from
    # its own sum of the same gates: summed in another order (another warp count), a span at the limit could land
    # on either side, so dlogits is written a margin below it (a few chunks more), never read where not written
    if span > SPAN_LIMIT - 1.0:
        store_rows(dl_ptr, dlogits, t0, eos, i_hq, HQ, M, 0, rows, ms)

    # pass 1 backward: dq = scale (dlogits exp(G) Hk_beforeᵀ + pairs(dlogits) k)
    if fast:
        d_scores = tl.dot((dlogits * decay_start).to(DOT_DT), tl.trans(s_keys.to(DOT_DT)), input_precision=PRECISION)
        d_scores = tl.where(causal, d_scores, 0.0)
    elif sub:
        d_scores = pairs_sub(dlogits, s, cum, rows, causal, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    else:
        d_scores = pairs_exact(dlogits, s, cum, rows, cols, BT)
    dl_dec = (dlogits * decay_start).to(DOT_DT)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        q = load_rows(q_ptr, t0, eos, i_hq, HQ, K, i_k * BK, rows, kk).to(DOT_DT)
        k = load_rows(k_ptr, t0, eos, i_h, H, K, i_k * BK, rows, kk).to(DOT_DT)
        base, offs, mask = state_offsets(slot, i_h, H, KV, M, i_k * BK, K, kk, ms)
        hk = tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(DOT_DT)
        scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dq = tl.dot(dl_dec, tl.trans(hk), input_precision=PRECISION)
        dq += tl.dot(d_scores.to(DOT_DT), k, input_precision=PRECISION)
        dq = scale * dq
        store_rows(dq_ptr, dq, t0, eos, i_hq, HQ, K, i_k * BK, rows, kk)
    scores = tl.where(causal, scale * scores, 0.0)

    # ds within the chunk: Σ_t D[t, j] (scale q_t.k_j dlogits_t + dP[t, j] p_t)
    if fast:
        ds = tl.dot(tl.trans(scores.to(DOT_DT)), dl_dec, input_precision=PRECISION)
        ds += tl.dot(tl.trans(d_pv.to(DOT_DT)), (p * decay_start).to(DOT_DT), input_precision=PRECISION)
        ds = ds * tl.exp(-cum)
    elif sub:
        ds = key_grad_sub(scores, dlogits, d_pv, p, cum, rows, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    else:
        ds = key_grad_exact(scores, dlogits, d_pv, p, cum, rows, cols, BT, BM)
    store_rows(ds_ptr, ds, t0, eos, i_hq, HQ, M, 0, rows, ms)


@triton.jit
def _pair_weights(x_dec_ptr, x_ptr, logits_ptr, FROM_LOGITS: tl.constexpr, fast, sub, s, cum, s_keys, causal,
                  t0, eos, i_hq, HQ, M, rows, cols, ms, BT: tl.constexpr, SUB: tl.constexpr,
                  SPAN_LIMIT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    """pairs(x) [BT, BT] of one chunk and query head, x being dlogits or (FROM_LOGITS) p. In the factored form from
    x exp(G) as `_intra_bwd` stored it, in the products' operand dtype: the operand `_intra_bwd` and `_output_fwd`
    multiply there, so the same weights. Otherwise from x in float32: dlogits as stored for those chunks, p formed
    again from the logits."""
    if fast:
        x_dec = load_rows(x_dec_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms).to(DOT_DT)
        pairs = tl.where(causal, tl.dot(x_dec, tl.trans(s_keys.to(DOT_DT)), input_precision=PRECISION), 0.0)
    else:
        if FROM_LOGITS:
            x, _ = _probabilities(logits_ptr, t0, eos, i_hq, HQ, M, rows, ms)
        else:
            x = load_rows(x_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms)
        if sub:
            pairs = pairs_sub(x, s, cum, rows, causal, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
        else:
            pairs = pairs_exact(x, s, cum, rows, cols, BT)
    return pairs


@triton.jit
def _half_grads(
    x_ptr, y_ptr, dx_ptr, x_dec_ptr, FROM_LOGITS: tl.constexpr, pairs, y_scale, states_ptr, dstates_ptr, dl_ptr,
    logits_ptr, ds_state, end_term, s_to_end, fast, sub, s, cum, s_keys, causal, slot, t0, eos, i_h, H, HQ, W, row0,
    KV, M, rows, cols, ms, dd, GROUP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr,
    SPAN_LIMIT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One half of the joint state for `_state_grads_bwd`, rows row0 .. row0 + W: keys (x = k, y = q, the pairs of
    dlogits, y_scale = scale) or values (x = v, y = do, the pairs of p, FROM_LOGITS). Writes dx = y_scale Σ_group
    pairsᵀ y + (s exp(G_C - G)) dHᵀ once; returns ds_state (+ x dH) and end_term (+ Σ_rows dH * H). pairs: the
    group's one pair tile (GROUP == 1), else formed here per query head."""
    for i_d in range(tl.cdiv(W, BD)):
        base, offs, mask = state_offsets(slot, i_h, H, KV, M, row0 + i_d * BD, row0 + W, dd, ms)
        d_state = tl.load(dstates_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        state = tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        end_term += tl.sum(d_state * state, axis=0)
        x = load_rows(x_ptr, t0, eos, i_h, H, W, i_d * BD, rows, dd).to(DOT_DT)
        ds_state += tl.dot(x, d_state.to(DOT_DT), input_precision=PRECISION)
        dx = tl.dot(s_to_end, tl.trans(d_state.to(DOT_DT)), input_precision=PRECISION)
        for i_g in range(GROUP):
            i_hq = i_h * GROUP + i_g
            if GROUP > 1:
                pairs = _pair_weights(x_dec_ptr, dl_ptr, logits_ptr, FROM_LOGITS, fast, sub, s, cum, s_keys, causal,
                                      t0, eos, i_hq, HQ, M, rows, cols, ms, BT, SUB, SPAN_LIMIT, DOT_DT,
                                      PRECISION).to(DOT_DT)
            y = load_rows(y_ptr, t0, eos, i_hq, HQ, W, i_d * BD, rows, dd).to(DOT_DT)
            dx += y_scale * tl.dot(tl.trans(pairs), y, input_precision=PRECISION)
        store_rows(dx_ptr, dx, t0, eos, i_h, H, W, i_d * BD, rows, dd)
    return ds_state, end_term


@triton.jit
def _state_grads_bwd(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, do_ptr, states_ptr, dstates_ptr, logits_ptr, dl_ptr, dl_dec_ptr, p_dec_ptr,
    ds_part_ptr, dgq_ptr, dk_ptr, dv_ptr, ds_ptr, dg_ptr,
    chunk_seq_ptr, chunk_start_ptr, chunk_slot_ptr, cu_ptr, scale,
    H, K, V, M, KV,
    GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    FLOOR: tl.constexpr, SPAN_LIMIT: tl.constexpr, SUB: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per chunk and key/value head: dk and dv, each written once (the within-chunk parts of the group's query
    heads and the state parts, summed in float32), and ds and dg.

    dk_j = scale Σ_group pairs(dlogits)ᵀ q + (s_j exp(G_C - G_j)) dHk_afterᵀ; dv = Σ_group pairs(p)ᵀ do + (s_j
    exp(G_C - G_j)) dHv_after; ds_j = within-chunk part + exp(G_C - G_j) (k_j dHk_after + v_j dHvᵀ_after);
    dG = dgq - s ds (+ Σ dS_after S_after at the chunk's last step); dg = reverse cumulative sum of dG."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    HQ = H * GROUP
    i_n = tl.load(chunk_seq_ptr + i_c)
    t0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    slot = tl.load(chunk_slot_ptr + i_c).to(tl.int64) + 1  # the state after this chunk
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ms = tl.arange(0, BM)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    _, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
    fast = chunk_span(g_end, ms, M) <= SPAN_LIMIT
    sub = fast  # only read where fast is False (as in `_intra_bwd`: the same gates give the same form)
    if not fast:
        sub = sub_span(cum, rows, ms, M, BT, SUB) <= SPAN_LIMIT
    s_to_end = (s * tl.exp(g_end[None, :] - cum)).to(DOT_DT)
    s_keys = s * tl.exp(tl.minimum(-cum, SPAN_LIMIT))
    causal = rows[:, None] >= cols[None, :]
    ds_state = tl.zeros([BT, BM], dtype=tl.float32)
    end_term = tl.zeros([BM], dtype=tl.float32)
    pairs = tl.zeros([BT, BT], dtype=DOT_DT)  # under GQA formed per query head inside the loops
    if GROUP == 1:  # one query head: each pair tile formed once, before its half's loop
        pairs = _pair_weights(dl_dec_ptr, dl_ptr, logits_ptr, False, fast, sub, s, cum, s_keys, causal, t0, eos,
                              i_h, HQ, M, rows, cols, ms, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION).to(DOT_DT)
    ds_state, end_term = _half_grads(
        k_ptr, q_ptr, dk_ptr, dl_dec_ptr, False, pairs, scale, states_ptr, dstates_ptr, dl_ptr, logits_ptr,
        ds_state, end_term, s_to_end, fast, sub, s, cum, s_keys, causal, slot, t0, eos, i_h, H, HQ, K, 0, KV, M,
        rows, cols, ms, kk, GROUP, BT, BK, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    if GROUP == 1:  # the gates again, not kept through the key loop (three float32 tiles fewer live across it)
        _, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
        s_keys = s * tl.exp(tl.minimum(-cum, SPAN_LIMIT))
        pairs = _pair_weights(p_dec_ptr, dl_ptr, logits_ptr, True, fast, sub, s, cum, s_keys, causal, t0, eos,
                              i_h, HQ, M, rows, cols, ms, BT, SUB, SPAN_LIMIT, DOT_DT, PRECISION).to(DOT_DT)
    ds_state, end_term = _half_grads(
        v_ptr, do_ptr, dv_ptr, p_dec_ptr, True, pairs, 1.0, states_ptr, dstates_ptr, dl_ptr, logits_ptr,
        ds_state, end_term, s_to_end, fast, sub, s, cum, s_keys, causal, slot, t0, eos, i_h, H, HQ, V, K, KV, M,
        rows, cols, ms, vv, GROUP, BT, BV, SUB, SPAN_LIMIT, DOT_DT, PRECISION)
    # the gates again rather than kept through the loops: four fewer [BT, BM] float32 tiles live across them
    # (4 warps spilled ~2 KB a thread; the reload is one [BT, BM] read of g and of s, from L2)
    g_raw, s, cum, g_end = chunk_gates(g_ptr, s_ptr, t0, eos, i_h, H, M, rows, ms, FLOOR)
    ds = tl.exp(g_end[None, :] - cum) * ds_state
    dgc = tl.zeros([BT, BM], dtype=tl.float32)
    for i_g in range(GROUP):
        i_hq = i_h * GROUP + i_g
        dgc += load_rows(dgq_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms)
        ds += load_rows(ds_part_ptr, t0, eos, i_hq, HQ, M, 0, rows, ms)
    last = tl.minimum(eos - t0, BT) - 1
    dgc = dgc - s * ds + tl.where(rows[:, None] == last, end_term[None, :], 0.0)
    dg = tl.cumsum(dgc, axis=0, reverse=True)
    dg = tl.where(g_raw >= FLOOR, dg, 0.0)
    store_rows(ds_ptr, ds, t0, eos, i_h, H, M, 0, rows, ms)
    store_rows(dg_ptr, dg, t0, eos, i_h, H, M, 0, rows, ms)


class ChunkLayout:
    """Where every chunk of every sequence lives: token offsets, sequence ids and state slots (device tensors)."""

    def __init__(self, cu_seqlens: torch.Tensor, T_total: int, uniform_length: int | None):
        device = cu_seqlens.device
        self._segments: dict[int, SegmentLayout] = {}
        if uniform_length is not None:  # B sequences of one length: no host round trip
            N = cu_seqlens.numel() - 1
            self.offsets = [i * uniform_length for i in range(N + 1)]
            per_seq = cdiv(uniform_length, CHUNK)
            self.max_chunks = per_seq
            n = torch.arange(per_seq, device=device)
            seq = torch.arange(N, device=device).repeat_interleave(per_seq)
            self.chunk_start = (seq * uniform_length + n.repeat(N) * CHUNK).to(torch.int64)
            self.slot_base = torch.arange(N, device=device, dtype=torch.int64) * (per_seq + 1)
            self.chunk_slot = self.slot_base[seq] + n.repeat(N)
            self.num_slots = N * (per_seq + 1)
        else:
            offsets = self.offsets = host_offsets(cu_seqlens)
            lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
            per_seq = [cdiv(length, CHUNK) for length in lengths]
            self.max_chunks = max(per_seq, default=0)
            seq_list, start_list, slot_list, base_list, slot = [], [], [], [], 0
            for i, (offset, count) in enumerate(zip(offsets[:-1], per_seq)):
                base_list.append(slot)
                seq_list += [i] * count
                start_list += [offset + c * CHUNK for c in range(count)]
                slot_list += [slot + c for c in range(count)]
                slot += count + 1
            seq = torch.tensor(seq_list, device=device)
            self.chunk_start = torch.tensor(start_list, device=device, dtype=torch.int64)
            self.chunk_slot = torch.tensor(slot_list, device=device, dtype=torch.int64)
            self.slot_base = torch.tensor(base_list, device=device, dtype=torch.int64)
            self.num_slots = slot
        self.chunk_seq = seq.to(torch.int32)
        self.cu_seqlens = cu_seqlens.to(torch.int64)
        self.num_chunks = self.chunk_start.numel()
        self.num_sequences = cu_seqlens.numel() - 1
        # a sequence's first chunk: its first slot less the one extra slot of each earlier sequence
        self.chunk_base = self.slot_base - torch.arange(self.num_sequences, device=device, dtype=torch.int64)

    def segments(self, length: int) -> SegmentLayout:
        """The sequences cut into segments of `length` chunks (the last of each sequence shorter), cached."""
        if length not in self._segments:
            self._segments[length] = SegmentLayout(self.offsets, length, self.cu_seqlens.device)
        return self._segments[length]


class SegmentLayout:
    """Sequences cut into segments of whole chunks, for walking the states of a few long sequences with enough
    programs: token bounds `cu_seqlens` (contiguous, like a sequence layout's), each segment's first state slot
    and first chunk in the sequence layout, and `first`, the first segment of each sequence (and the count)."""

    def __init__(self, offsets: list[int], length: int, device: torch.device):
        bounds, slots, chunks, first = [offsets[0]], [], [], [0]
        slot = chunk = 0
        for bos, eos in zip(offsets[:-1], offsets[1:]):
            count = cdiv(eos - bos, CHUNK)
            for c0 in range(0, count, length):
                bounds.append(min(eos, bos + (c0 + length) * CHUNK))
                slots.append(slot + c0)
                chunks.append(chunk + c0)
            first.append(len(slots))
            slot += count + 1
            chunk += count
        self.cu_seqlens = torch.tensor(bounds, device=device, dtype=torch.int64)
        self.slot_base = torch.tensor(slots, device=device, dtype=torch.int64)
        self.chunk_base = torch.tensor(chunks, device=device, dtype=torch.int64)
        self.first = torch.tensor(first, device=device, dtype=torch.int64)
        self.num_segments = len(slots)


_VARLEN_LAYOUTS = LastTensorCache()


@functools.lru_cache(maxsize=64)
def _uniform_layout(B: int, T: int, device: torch.device) -> ChunkLayout:
    """Layouts of plain batches are reused across calls: building one costs several small launches."""
    cu = torch.arange(0, (B + 1) * T, T, device=device, dtype=torch.int64)
    return ChunkLayout(cu, B * T, T)


def _dot_args(dtype: torch.dtype):
    dot_dtype, precision = dot_config(str(dtype).replace("torch.", ""))
    return dict(DOT_DT=dot_dtype, PRECISION=precision)


SCAN_BLOCK = 1024

# num_warps / num_stages of each kernel: `benchmarks/tune_ops.py --graph` on an H200 (Triton 3.6, paper-2k, walking
# state pass, GPU time; results/tune_launch_h200_v2.json): forward+backward 1.093 -> 1.052 ms (session 7, after the
# kernels' addressing stopped spilling). Configs within 0.02 ms of each other are ties (run-to-run noise); the split
# pass's kernels keep Triton's defaults.
LAUNCH: dict[str, dict[str, int]] = {
    "_walk_states": {"num_warps": 4, "num_stages": 3},
    "_gate_factors": {},
    "_walk_dstates": {"num_warps": 8, "num_stages": 2},
    "_output_fwd": {"num_warps": 4, "num_stages": 3},
    "_intra_bwd": {"num_warps": 8, "num_stages": 3},
    "_state_grads_bwd": {"num_warps": 4, "num_stages": 3},
    "_local_states": {},
    "_local_dstates": {},
    "_scan_slots": {},
}
FEATURE_BLOCKS = ("BK", "BV")  # loop tiles over the key / value width: results the same up to the sums' rounding order
_FITTED: dict[tuple, tuple[dict, dict]] = {}  # (kernel, config, constants, device, dtypes) -> what fitted
_STEPPED: set[str] = set()  # kernels that have needed a step down on this GPU


def _step_downs(config: dict, meta: dict):
    """LAUNCH's config, then ones that need less shared memory: fewer pipeline stages, then the feature blocks
    halved down to 16 (tl.dot's smallest; a block already at 16 or below stays)."""
    yield config, {}
    for stages in range(config.get("num_stages", 3) - 1, 0, -1):
        yield {**config, "num_stages": stages}, {}
    blocks = {name: meta[name] for name in FEATURE_BLOCKS if name in meta}
    while blocks and max(blocks.values()) > 16:
        blocks = {name: size // 2 if size > 16 else size for name, size in blocks.items()}
        yield {**config, "num_stages": 1}, blocks


def _try(kernel, grid, args, meta):  # one launch attempt (a seam for tests)
    kernel[grid](*args, **meta)


def _launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta, **LAUNCH.get(its name, {})), stepping down (`_step_downs`) where the GPU cannot hold
    that config: 256 slots keep [64, 256] float32 tiles, and `_intra_bwd` asked an H200 for 264 KB of shared memory
    (227 KB there; GPUs with less fail sooner). A step down is remembered per kernel, config and constants; kernels
    that never needed one launch without building that key (the host's time per launch counts at small shapes)."""
    name = kernel.fn.__name__
    config = LAUNCH.get(name, {})
    if name not in _STEPPED:
        try:
            return _try(kernel, grid, args, {**meta, **config})
        except OutOfResources:
            pass
    # every tensor's dtype (the float32 scratch tensors' among them) and the constants decide what fits
    key = (name, tuple(config.items()), tuple(meta.items()), args[0].device,
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    if key in _FITTED:
        options, blocks = _FITTED[key]
        try:
            _try(kernel, grid, args, {**meta, **blocks, **options})
            _STEPPED.add(name)
            return
        except OutOfResources:  # the integer arguments' specialisation is not in the key: search again
            pass
    failures = []
    for options, blocks in _step_downs(config, meta):
        try:
            _try(kernel, grid, args, {**meta, **blocks, **options})
        except OutOfResources as error:
            failures.append(f"{options} {blocks}: {error}")
            continue
        _FITTED[key] = options, blocks
        _STEPPED.add(name)
        return
    raise RuntimeError(f"{name} does not fit this GPU with any config tried; " + "; ".join(failures))


def _joint(hk: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """(Hk [N, H, K, M], Hv [N, H, M, V]) in any float dtype -> the joint state [N, H, K + V, M] in float32,
    converted as it is copied (no float32 copies of the halves first)."""
    N, H, K, M = hk.shape
    joint = torch.empty(N, H, K + hv.shape[-1], M, device=hk.device, dtype=torch.float32)
    return torch.cat([hk, hv.transpose(-1, -2)], -2, out=joint)


def _halves(N: int, H: int, K: int, V: int, M: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty float32 (Hk [N, H, K, M], Hv [N, H, M, V]): what the kernels write a final state (or an initial-state
    gradient) into, in the layout the caller gets, so that no copy follows."""
    return (torch.empty(N, H, K, M, device=device, dtype=torch.float32),
            torch.empty(N, H, M, V, device=device, dtype=torch.float32))


def _scan(slots, decay, start, layout, reverse, end, K):
    """Run `_scan_slots` over all sequences and heads; the last value of each scan goes to the halves `end`
    (float32), when given."""
    _, H, KV, M = slots.shape
    grid = (layout.num_sequences * H, cdiv(KV * M, SCAN_BLOCK))
    end_k, end_v = end if end is not None else (slots, slots)  # unused pointers when nothing is stored
    _launch(
        _scan_slots, grid, slots, decay, start if start is not None else slots, end_k, end_v, layout.cu_seqlens,
        layout.slot_base, layout.chunk_base, H, K, KV - K, M, KV * M, BT=CHUNK, BLOCK=SCAN_BLOCK, REVERSE=reverse,
        HAS_START=start is not None, STORE_END=end is not None,
    )


# "auto", "walk", "segment" or "split" (see the module docstring); GSA_TRITON_STATE_PASS forces one, for benchmarks.
STATE_PASS = os.environ.get("GSA_TRITON_STATE_PASS", "auto")
# Walking programs (sequences x heads x row blocks of 64) that fill the GPU: "auto" walks whole sequences from
# there and walks segments below. H200, 16K tokens, K=V=512: walking won at 512 programs (8 x 2048 tokens:
# f+b 1.82 vs 2.18 ms) and lost at 128 (2 x 8192: 1.80 vs 1.59); 32-row blocks (twice the programs) never won.
# Segments (2 x 8192 and 1 x 16384 cut into 512 programs) beat split in GPU time once their join took 16 chunk
# decays a load (1.292 vs 1.348 ms at 8K, 1.300 vs 1.521 at 16K; the first join, one dependent load a chunk, lost:
# 2.13 / 2.07 vs 1.89 / 1.99). benchmarks/tune_ops.py, NOTES.md sessions 5-6.
WALK_MIN_PROGRAMS = int(os.environ.get("GSA_TRITON_WALK_MIN_PROGRAMS", "256"))
SEGMENT_PROGRAMS = 512  # segments are cut to give about this many walking programs (the paper shape's 512 won)
SEGMENT_MIN_CHUNKS = 8  # below this a segment's walk is mostly its join's overhead
# > 0 forces the segment length (tests; auto too)
SEGMENT_CHUNKS = int(os.environ.get("GSA_TRITON_SEGMENT_CHUNKS", "0"))
# Walking over blocks of slots (a third program axis: each slot's recurrence is its own) lost to the segments in GPU
# time, forward+backward: 1.250 / 1.239 ms (blocks of 32 / 16) vs 1.223 at 2 x 8192, 1.592 / 1.559 vs 1.234 at
# 1 x 16384 (results/tune_slot_walk_h200.json, NOTES.md session 14); removed.


def state_plan(layout: ChunkLayout, H: int, K: int, V: int) -> tuple[int, int | None] | None:
    """How the state passes run for this shape: (row block of the walking kernels, segment length in chunks or
    None to walk whole sequences), or None for the split form."""
    if STATE_PASS not in ("auto", "walk", "segment", "split"):
        raise ValueError(f"GSA_TRITON_STATE_PASS must be auto, walk, segment or split, got {STATE_PASS!r}")
    block = min(64, next_power_of_2(max(K, V)))
    blocks = cdiv(K, block) + cdiv(V, block)
    if STATE_PASS == "split":
        return None
    if STATE_PASS == "walk" or (STATE_PASS == "auto" and layout.num_sequences * H * blocks >= WALK_MIN_PROGRAMS):
        return block, None
    length = SEGMENT_CHUNKS or max(SEGMENT_MIN_CHUNKS, cdiv(layout.num_chunks * H * blocks, SEGMENT_PROGRAMS))
    return block, (length if length < layout.max_chunks else None)


def _walk_spans(launch, layout: ChunkLayout, length: int | None, slots, decay, start, final, K: int, reverse: bool):
    """Run a walking kernel (`launch(spans, count, start, end, end_v, **flags)`) over whole sequences, or over
    segments of `length` chunks in three steps: walk every segment from zero keeping only its end, join the
    segments' ends in sequence order (`_join_segments`: each segment's true start, and the final value), walk again
    from those starts storing every slot. `final`, when given, receives the final state (forward) or the
    initial-state gradient as its halves (Hk [N, H, K, M], Hv [N, H, M, V])."""
    final_k, final_v = final if final is not None else (slots, slots)  # unused pointers when nothing is stored
    if length is None:
        launch(layout, layout.num_sequences, start if start is not None else slots, final_k, final_v,
               HAS_START=start is not None, STORE_SLOTS=True, STORE_EDGE=True, STORE_END=final is not None,
               SPLIT_END=True)
        return
    spans = layout.segments(length)
    _, H, KV, M = slots.shape
    ends = torch.empty(spans.num_segments, H, KV, M, device=slots.device, dtype=torch.float32)
    starts = torch.empty_like(ends)
    launch(spans, spans.num_segments, ends, ends, ends, HAS_START=False, STORE_SLOTS=False, STORE_EDGE=False,
           STORE_END=True, SPLIT_END=False)
    BM = next_power_of_2(M)
    rows = max(1, SCAN_BLOCK // BM)
    _launch(
        _join_segments, (layout.num_sequences * H, cdiv(KV, rows)),
        ends, decay, start if start is not None else slots, starts, final_k, final_v, slots,
        layout.cu_seqlens, layout.slot_base, spans.first, spans.cu_seqlens, spans.chunk_base,
        H, K, KV - K, M, KV, BT=CHUNK, BR=rows, BM=BM, BC=16, REVERSE=reverse, HAS_START=start is not None,
        STORE_FINAL=final is not None,
    )
    # the edge slots (between segments, and the sequences' last) are the join's and the neighbours' to store
    launch(spans, spans.num_segments, starts, ends, ends, HAS_START=True, STORE_SLOTS=True, STORE_EDGE=False,
           STORE_END=False, SPLIT_END=False)


def _scan_states(k, v, s, g, start, layout, final=None, gates=None):
    """Joint states at every chunk boundary (in `_state_dtype`), the chunk decays and the gate factors, from the
    joint initial states `start` (float32) or zeros; the final states go to the halves `final` (float32 (Hk, Hv))
    when given. gates: (factors, decay) an earlier call formed (the forward's, kept for the backward)."""
    _, H, K = k.shape
    V, M = v.shape[-1], s.shape[-1]
    BM = next_power_of_2(M)
    # states and gate factors are operands of matrix products only: both in the products' operand dtype
    # (dot_config: bf16 for bf16 inputs, else float32, which is what _state_dtype gives)
    operand_dtype = _state_dtype(k.dtype)
    states = torch.empty(layout.num_slots, H, K + V, M, device=k.device, dtype=operand_dtype)
    if gates is not None:
        factors, decay = gates
    else:
        factors = torch.empty(s.shape, device=k.device, dtype=operand_dtype)  # each chunk's gate factors, once
        decay = torch.empty(layout.num_chunks, H, M, device=k.device, dtype=torch.float32)
        _launch(
            _gate_factors, (layout.num_chunks, H),
            s, g, factors, decay, layout.chunk_seq, layout.chunk_start, layout.cu_seqlens, H, M,
            BT=CHUNK, BM=BM, FLOOR=LOG_GATE_FLOOR
        )
    dot = _dot_args(k.dtype)
    plan = state_plan(layout, H, K, V)
    if plan is not None:
        BD, length = plan

        def launch(spans, count, start_, end, end_v, **flags):
            _launch(
                _walk_states, (count * H, cdiv(K, BD) + cdiv(V, BD)),
                k, v, factors, decay, states, start_, end, end_v, spans.cu_seqlens, spans.slot_base,
                spans.chunk_base, H, K, V, M, K + V, BT=CHUNK, BD=BD, BM=BM, **flags, **dot
            )

        _walk_spans(launch, layout, length, states, decay, start, final, K, reverse=False)
        return states, decay, factors
    for x, width, row0 in ((k, K, 0), (v, V, K)):
        BD = min(64, next_power_of_2(width))
        _launch(
            _local_states, (layout.num_chunks, cdiv(width, BD), H),
            x, factors, states, layout.chunk_seq, layout.chunk_start, layout.chunk_slot, layout.cu_seqlens,
            H, width, M, K + V, row0, BT=CHUNK, BD=BD, BM=BM, **dot
        )
    _scan(states, decay, start, layout, reverse=False, end=final, K=K)
    return states, decay, factors


# Keep the forward's gate factors (the size of s, in the products' operand dtype) and chunk decays for the backward
# instead of forming them again: one launch less a forward+backward (~12 us of GPU time at the paper shape by an
# earlier profile, and the host's time for a launch) for the memory of s kept by autograd. Measured on the H200
# (results/tune_factors_h200.json, alternating with it off): forward+backward 1.036 -> 1.025 ms at 8 x 2K, 1.230 ->
# 1.220 at 2 x 8K, 1.241 -> 1.231 at 1 x 16K in both alternations; peak memory 0.39 GiB either way.
KEEP_GATE_FACTORS = True


def _scratch(*shape: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer one kernel writes only where a later one reads it (a seam: tests fill it with NaN)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 inputs keep chunk states in bf16 (half the traffic, within bf16's error budget); others in float32
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


class ChunkGSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, scale, layout, output_final_state, keep_states):
        TT, HQ, K = q.shape
        H, V, M = k.shape[1], v.shape[-1], s.shape[-1]
        start = _joint(hk0, hv0) if hk0 is not None else None  # kept for the backward's recomputation (if any)
        final = _halves(layout.num_sequences, H, K, V, M, q.device) if output_final_state else None
        states, decay, factors = _scan_states(k, v, s, g, start, layout, final)
        final_k, final_v = final if final is not None else (None, None)
        o = torch.empty(TT, HQ, V, device=q.device, dtype=q.dtype)
        logits = torch.empty(TT, HQ, M, device=q.device, dtype=torch.float32)
        BM = next_power_of_2(M)
        _launch(
            _output_fwd, (layout.num_chunks, HQ),
            q, k, v, s, g, states, logits, o,
            layout.chunk_seq, layout.chunk_start, layout.chunk_slot, layout.cu_seqlens, scale,
            HQ, H, K, V, M, K + V, HQ // H,
            BT=CHUNK, BK=min(64, next_power_of_2(K)), BV=min(64, next_power_of_2(V)), BM=BM,
            FLOOR=LOG_GATE_FLOOR, SPAN_LIMIT=FACTORED_SPAN_LIMIT, SUB=SUB_CHUNK, **_dot_args(q.dtype)
        )
        # with the states kept, the backward needs of the state pass only its chunk decays (for the gradients' walk)
        if keep_states:
            kept = (None, decay, states, None)
        else:
            kept = ((factors, decay) if KEEP_GATE_FACTORS else (None, None)) + (None, start)
        ctx.save_for_backward(q, k, v, s, g, logits, *kept)
        ctx.scale, ctx.layout, ctx.has_start = scale, layout, start is not None
        # gradients of unused outputs arrive as None, not as zeros to fill and join (16 us at the paper shape when
        # the final states are returned but not trained through)
        ctx.set_materialize_grads(False)
        return o, final_k, final_v

    @staticmethod
    @without_autocast
    def backward(ctx, do, dfinal_k, dfinal_v):
        q, k, v, s, g, logits, factors, decay, states, start = ctx.saved_tensors
        scale, layout = ctx.scale, ctx.layout
        TT, HQ, K = q.shape
        H, V, M = k.shape[1], v.shape[-1], s.shape[-1]
        group = HQ // H
        do = do.contiguous() if do is not None else torch.zeros(TT, HQ, V, device=q.device, dtype=q.dtype)
        # the states are recomputed (as the paper does) unless the caller kept them; the gate factors too unless
        # KEEP_GATE_FACTORS
        if states is None:
            gates = (factors, decay) if factors is not None else None
            states, decay, _ = _scan_states(k, v, s, g, start, layout, gates=gates)
        BM = next_power_of_2(M)
        BK, BV = min(64, next_power_of_2(K)), min(64, next_power_of_2(V))
        dot = _dot_args(q.dtype)
        dq = torch.empty_like(q)
        ds_part, dgq = (torch.empty(TT, HQ, M, device=q.device, dtype=torch.float32) for _ in range(2))
        dl = _scratch(TT, HQ, M, device=q.device)  # dlogits, written only for chunks off the factored form
        # dlogits exp(G) and p exp(G) only feed matrix products: keep them at the products' operand precision
        dl_dec, p_dec = (torch.empty(TT, HQ, M, device=q.device, dtype=_state_dtype(q.dtype)) for _ in range(2))
        _launch(
            _intra_bwd, (layout.num_chunks, HQ),
            q, k, v, s, g, states, logits, do, dq, ds_part, dgq, dl, dl_dec, p_dec,
            layout.chunk_seq, layout.chunk_start, layout.chunk_slot, layout.cu_seqlens, scale,
            HQ, H, K, V, M, K + V, group,
            BT=CHUNK, BK=BK, BV=BV, BM=BM, FLOOR=LOG_GATE_FLOOR, SPAN_LIMIT=FACTORED_SPAN_LIMIT, SUB=SUB_CHUNK, **dot
        )

        dstates = torch.empty_like(states)
        dfinal = None
        if dfinal_k is not None or dfinal_v is not None:
            dfinal = _joint(
                dfinal_k if dfinal_k is not None else torch.zeros(layout.num_sequences, H, K, M, device=q.device),
                dfinal_v if dfinal_v is not None else torch.zeros(layout.num_sequences, H, M, V, device=q.device),
            )
        # the initial states' gradient, when they were given and need one, straight into their halves' layout
        wanted = ctx.has_start and (ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        dh0 = _halves(layout.num_sequences, H, K, V, M, q.device) if wanted else None
        plan = state_plan(layout, H, K, V)
        if plan is not None:
            walk, length = plan

            def launch(spans, count, start_, end, end_v, **flags):
                _launch(
                    _walk_dstates, (count * H, cdiv(K, walk) + cdiv(V, walk)),
                    q, do, dl_dec, p_dec, dstates, decay, start_, end, end_v, spans.cu_seqlens, spans.slot_base,
                    spans.chunk_base, scale, H, HQ, K, V, M, K + V, group,
                    BT=CHUNK, BD=walk, BM=BM, **flags, **dot
                )

            _walk_spans(launch, layout, length, dstates, decay, dfinal, dh0, K, reverse=True)
        else:
            for x, y, x_scale, width, row0 in ((q, dl_dec, scale, K, 0), (do, p_dec, 1.0, V, K)):
                BD = min(64, next_power_of_2(width))
                _launch(
                    _local_dstates, (layout.num_chunks, cdiv(width, BD), H),
                    x, y, dstates, layout.chunk_seq, layout.chunk_start, layout.chunk_slot, layout.cu_seqlens,
                    x_scale, H, HQ, width, M, K + V, row0, group, BT=CHUNK, BD=BD, BM=BM, **dot
                )
            _scan(dstates, decay, dfinal, layout, reverse=True, end=dh0, K=K)
        # float32: autograd converts them to the initial states' dtype (a copy it makes anyway when that is not float32)
        dh0_k, dh0_v = dh0 if dh0 is not None else (None, None)
        # stored in the inputs' dtype straight from float32 registers: no conversion pass afterwards
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        ds = torch.empty(TT, H, M, device=q.device, dtype=s.dtype)
        dg = torch.empty(TT, H, M, device=q.device, dtype=g.dtype)
        _launch(
            _state_grads_bwd, (layout.num_chunks, H),
            q, k, v, s, g, do, states, dstates, logits, dl, dl_dec, p_dec, ds_part, dgq, dk, dv, ds, dg,
            layout.chunk_seq, layout.chunk_start, layout.chunk_slot, layout.cu_seqlens, scale,
            H, K, V, M, K + V,
            GROUP=group, BT=CHUNK, BK=BK, BV=BV, BM=BM, FLOOR=LOG_GATE_FLOOR, SPAN_LIMIT=FACTORED_SPAN_LIMIT,
            SUB=SUB_CHUNK, **dot
        )
        return dq, dk, dv, ds, dg, dh0_k, dh0_v, None, None, None, None


def chunk_gsa_triton(q, k, v, s, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     keep_states=False):
    """The chunked Triton operator over validated [B, T, H, D] inputs (see gsa.ops.gated_slot_attention).
    keep_states: the forward's chunk states are kept for the backward instead of computed again there."""
    B, T, HQ = q.shape[:3]
    V = v.shape[3]
    q, k, v, s, g = (t.reshape(B * T, t.shape[2], t.shape[3]).contiguous() for t in (q, k, v, s, g))
    if cu_seqlens is None:
        layout = _uniform_layout(B, T, q.device)
    else:  # built once per cu_seqlens tensor: a model's layers share it (and its host round trip)
        layout = _VARLEN_LAYOUTS.get(cu_seqlens, T, lambda: ChunkLayout(cu_seqlens, T, None))
    hk0 = hv0 = None
    if initial_state is not None:
        hk0, hv0 = initial_state  # converted to float32 as the operator joins them
    o, final_k, final_v = ChunkGSAFunction.apply(
        q, k, v, s, g, hk0, hv0, float(scale), layout, output_final_state, bool(keep_states)
    )
    o = o.view(B, T, HQ, V)
    return o, ((final_k, final_v) if output_final_state else None)
