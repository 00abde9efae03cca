"""Triton helpers shared by the GSA kernels: tile loads, chunk gates, and the three gated contractions.

Every chunk kernel works on one chunk of BT steps of one sequence. With G the chunk-local cumulative sum of the
log gates, the intra-chunk work is three contractions with the causal decay D[t, j, m] = exp(G_t[m] - G_j[m]):

    rows(R)      Y[t, m] = Σ_{j<=t} R[t, j] s_j[m] D[t, j, m]
    pairs(X)     R[t, j] = Σ_m X[t, m] s_j[m] D[t, j, m]                (j <= t)
    key_grad     Z[j, m] = Σ_{t>=j} (R1[t, j] X1[t, m] + R2[t, j] X2[t, m]) D[t, j, m]

Fast form: D = exp(G_t) exp(-G_j), so each is one matrix product. exp(-G_j) <= exp(span of the chunk), so the
kernels take it only when the span is below SPAN_LIMIT (same scheme as the PyTorch path, gsa/ops/chunk.py).
A chunk with a steeper gate splits its rows t into sub-chunks of SUB steps and factors around the gate just
before each: D = exp(G_t - G_ref) exp(G_ref - G_j), the left factor <= 1 and the right one <= 1 for j before the
sub-chunk and <= exp(sub-chunk span) inside it: BT / SUB matrix products per contraction, exact whenever every
sub-chunk's span is below SPAN_LIMIT (gates that learned to forget fast, as in recall tasks, stay on matrix
units). Only a sub-chunk steeper still takes the exact loop over j, which never forms a factor above 1.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, t0, eos, head, n_heads, width, d0, rows, cols):
    """Rows t0 + rows (those before eos) of [tokens, n_heads, width] at `head`, columns d0 + cols; zeros outside.

    The int64 part of the address is one scalar (the tile's first element); the tile's own offsets are int32,
    which keeps a [rows, cols] tile of 64-bit offsets out of the registers."""
    stride = n_heads * width
    base = ptr + t0 * stride + head * width + d0
    offs = rows[:, None] * stride + cols[None, :]
    mask = (rows < eos - t0)[:, None] & ((d0 + cols) < width)[None, :]
    return tl.load(base + offs, mask=mask, other=0.0)


@triton.jit
def swish_grad(dx, x):
    """The gradient through swish at the projection x of a feature's gradient dx (float32)."""
    xf = x.to(tl.float32)
    sig = tl.sigmoid(xf)
    return dx * sig * (1.0 + xf * (1.0 - sig))


@triton.jit
def store_rows(ptr, value, t0, eos, head, n_heads, width, d0, rows, cols):
    stride = n_heads * width
    base = ptr + t0 * stride + head * width + d0
    offs = rows[:, None] * stride + cols[None, :]
    mask = (rows < eos - t0)[:, None] & ((d0 + cols) < width)[None, :]
    tl.store(base + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_offsets(slot, head, n_heads, joint_rows, slots, row0, row_limit, rr, ms):
    """(base, offsets, mask) of rows row0 + rr (below row_limit) of state slot `slot` in [slots, H, K + V, M]:
    address them as ptr + base + offsets (base a scalar that may need int64, the tile's offsets int32)."""
    base = ((slot * n_heads + head) * joint_rows + row0) * slots
    offs = rr[:, None] * slots + ms[None, :]
    mask = ((row0 + rr) < row_limit)[:, None] & (ms < slots)[None, :]
    return base, offs, mask


@triton.jit
def chunk_gates(g_ptr, s_ptr, t0, eos, head, n_heads, slots, rows, ms, FLOOR: tl.constexpr):
    """Gates of one chunk in float32: raw g, s, chunk cumulative sum G, and G at the chunk's end."""
    base = t0 * (n_heads * slots) + head * slots
    offs = rows[:, None] * (n_heads * slots) + ms[None, :]
    mask = (rows < eos - t0)[:, None] & (ms < slots)[None, :]
    g_raw = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.maximum(g_raw, FLOOR)
    cum = tl.cumsum(g, axis=0)
    return g_raw, s, cum, tl.sum(g, axis=0)


@triton.jit
def chunk_span(g_end, ms, slots):
    """The largest total decay exponent -G_C over the slots: the factor exp(-G_j) is at most exp(span)."""
    return tl.max(tl.where(ms < slots, -g_end, 0.0), axis=0)


@triton.jit
def sub_factors(cum, rows, a, SUB: tl.constexpr, LIMIT: tl.constexpr):
    """Factors of D[t, j] for the rows t of sub-chunk a, around ref = G before the sub-chunk (0 for the first):
    left = exp(G_t - ref) on its rows (<= 1; 0 on the others), right = exp(ref - G_j) for every j (clamped at
    exp(LIMIT), reached only after the sub-chunk, where causality zeroes the products)."""
    a0 = a * SUB
    ref = tl.sum(tl.where(rows[:, None] == a0 - 1, cum, 0.0), axis=0)
    inside = (rows >= a0) & (rows < a0 + SUB)
    left = tl.where(inside[:, None], tl.exp(tl.minimum(cum - ref[None, :], 0.0)), 0.0)
    right = tl.exp(tl.minimum(ref[None, :] - cum, LIMIT))
    return left, right


@triton.jit
def sub_span(cum, rows, ms, slots, BT: tl.constexpr, SUB: tl.constexpr):
    """The largest decay exponent over the slots within any one sub-chunk of SUB steps."""
    span = tl.max(tl.where(ms < slots, -row(cum, rows, SUB - 1), 0.0), axis=0)
    for a in tl.static_range(1, BT // SUB):
        inner = row(cum, rows, a * SUB - 1) - row(cum, rows, a * SUB + SUB - 1)
        span = tl.maximum(span, tl.max(tl.where(ms < slots, inner, 0.0), axis=0))
    return span


@triton.jit
def rows_sub(r, s, cum, rows, BT: tl.constexpr, SUB: tl.constexpr, LIMIT: tl.constexpr,
             DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    """rows(r) by sub-chunks (see the module docstring); r is causal (zero above the diagonal)."""
    out = tl.zeros_like(s)
    for a in tl.static_range(BT // SUB):
        left, right = sub_factors(cum, rows, a, SUB, LIMIT)
        out += left * tl.dot(r.to(DOT_DT), (s * right).to(DOT_DT), input_precision=PRECISION)
    return out


@triton.jit
def pairs_sub(x, s, cum, rows, causal, BT: tl.constexpr, SUB: tl.constexpr, LIMIT: tl.constexpr,
              DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    """pairs(x) by sub-chunks; causal is the [BT, BT] mask j <= t."""
    out = tl.zeros([BT, BT], dtype=tl.float32)
    for a in tl.static_range(BT // SUB):
        left, right = sub_factors(cum, rows, a, SUB, LIMIT)
        out += tl.dot((x * left).to(DOT_DT), tl.trans((s * right).to(DOT_DT)), input_precision=PRECISION)
    return tl.where(causal, out, 0.0)


@triton.jit
def key_grad_sub(r1, x1, r2, x2, cum, rows, BT: tl.constexpr, SUB: tl.constexpr, LIMIT: tl.constexpr,
                 DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    """key_grad by sub-chunks; r1, r2 are causal."""
    out = tl.zeros_like(x1)
    for a in tl.static_range(BT // SUB):
        left, right = sub_factors(cum, rows, a, SUB, LIMIT)
        mixed = tl.dot(tl.trans(r1.to(DOT_DT)), (x1 * left).to(DOT_DT), input_precision=PRECISION)
        mixed += tl.dot(tl.trans(r2.to(DOT_DT)), (x2 * left).to(DOT_DT), input_precision=PRECISION)
        out += right * mixed
    return out


@triton.jit
def column(x, cols, j):
    """x[:, j] of a register tile."""
    return tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)


@triton.jit
def row(x, rows, j):
    """x[j, :] of a register tile."""
    return tl.sum(tl.where(rows[:, None] == j, x, 0.0), axis=0)


@triton.jit
def decay_from(cum, rows, j, cum_j):
    """exp(G_t - G_j) for rows t >= j, 0 above: never exponentiates a positive number."""
    return tl.exp(tl.where(rows[:, None] >= j, cum - cum_j[None, :], float("-inf")))


@triton.jit
def rows_exact(r, s, cum, rows, cols, BT: tl.constexpr, BM: tl.constexpr):
    out = tl.zeros([BT, BM], dtype=tl.float32)
    for j in range(BT):
        d = decay_from(cum, rows, j, row(cum, rows, j))
        out += column(r, cols, j)[:, None] * row(s, rows, j)[None, :] * d
    return out


@triton.jit
def pairs_exact(x, s, cum, rows, cols, BT: tl.constexpr):
    out = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):
        d = decay_from(cum, rows, j, row(cum, rows, j))
        values = tl.sum(x * row(s, rows, j)[None, :] * d, axis=1)
        out += tl.where(cols[None, :] == j, values[:, None], 0.0)
    return out


@triton.jit
def key_grad_exact(r1, x1, r2, x2, cum, rows, cols, BT: tl.constexpr, BM: tl.constexpr):
    out = tl.zeros([BT, BM], dtype=tl.float32)
    for j in range(BT):
        d = decay_from(cum, rows, j, row(cum, rows, j))
        mixed = column(r1, cols, j)[:, None] * x1 + column(r2, cols, j)[:, None] * x2
        out += tl.where(rows[:, None] == j, tl.sum(mixed * d, axis=0)[None, :], 0.0)
    return out


def dot_config(dtype_name: str):
    """(operand dtype, input_precision) for tl.dot by input dtype: bf16 stays bf16; fp16 goes to fp32 (its range
    is too small for operands scaled by exp(-G)); fp32 stays exact."""
    if dtype_name == "bfloat16":
        return tl.bfloat16, "tf32"
    if dtype_name == "float16":
        return tl.float32, "tf32"
    return tl.float32, "ieee"


# Host-side helpers in plain Python: triton's own (constexpr functions) cost ~2-4 us a call, and one forward+backward
# of the operator makes ~30 of them.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())
