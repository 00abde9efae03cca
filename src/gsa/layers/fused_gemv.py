"""Linear maps of a few rows (decoding: one token per sequence) with what comes before them fused in, on the GPU.

A decoding step of the 1.3B model at batch 1 reads ~2.6 GB of weights, ~0.6 ms on an H200, yet took ~1.9 ms: each
layer ran ~17 kernels (an RMSNorm, four projections, the step's two, the output norm and projection, the MLP's
norm, two projections, SwiGLU and down projection, two residual adds) of a few microseconds each inside the graph.
Here one kernel serves a whole group of matrix-vector products:

    rows_linear(x, weights, prologue="norm", norm_weight=w, eps=eps)     RMSNorm(x) * w, then every W_i
    rows_linear(x, weights, prologue="silu_norm", ...)                   RMSNorm(silu(x)) * w (the GSA output norm)
    rows_linear(gate, weights, prologue="swiglu", up=up)                 silu(gate) * up (the MLP's down projection)

Each program takes a block of output features of one of the (up to four) weights and all rows, forms the
prologue's input from x on the fly (x is a few rows: it stays in cache; the norm's 1/rms is formed by every
program) and accumulates in float32. The roundings are those of the unfused path: the normalised or SwiGLU input in
x's dtype, then cast to the weights' dtype, the product rounded to it, so the two agree up to the order of the
float32 sums. Rows beyond MAX_ROWS take the unfused path (cuBLAS is the better kernel for a real matrix product).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl

    from ..ops.triton.common import cdiv

    KERNELS_AVAILABLE = True
except ImportError:
    KERNELS_AVAILABLE = False

MAX_ROWS = 1  # one row: decoding at batch 1 (more rows: cuBLAS, see below)
MAX_WEIGHTS = 4  # weights a launch takes (the GSA layer's q, k, v and f projections)
PROLOGUES = {"none": 0, "norm": 1, "silu_norm": 2, "swiglu": 3}

# Output features a program takes (BN), input features a loop step (BK) and warps, by the launch's output features:
# a launch of at most NARROW outputs (the 1.3B model's o_proj and down_proj, 2048) has few programs of 16 rows,
# so it takes smaller blocks of longer steps. benchmarks/tune_gemv.py at the 1.3B layer (H200, one row, GPU time;
# results/tune_gemv_h200_v2.json): 16 / 256 was the best single setting, 32.4 us for the layer's four groups
# against 54.0 unfused; o_proj 7.3 -> 5.3 us and down_proj 9.4 -> 6.2 us with 4 / 512.
GEMV_LAUNCH = {"wide": dict(BN=16, BK=256, num_warps=4), "narrow": dict(BN=4, BK=512, num_warps=4)}
NARROW = 4096


def launch_for(outputs: int) -> dict:
    """GEMV_LAUNCH's setting for a launch of this many output features (all its weights together)."""
    return GEMV_LAUNCH["narrow" if outputs <= NARROW else "wide"]


if KERNELS_AVAILABLE:

    @triton.jit
    def _silu_rounded(x, DTYPE: tl.constexpr):
        return (x * tl.sigmoid(x)).to(DTYPE).to(tl.float32)

    @triton.jit
    def _prologue_block(X, X2, NORM_W, rstd, cols, K, PROLOGUE: tl.constexpr, HAS_NORM_W: tl.constexpr,
                        MM_DTYPE: tl.constexpr):
        """[1, BK] of the products' input in float32, as the unfused path rounds it (x's dtype, then MM_DTYPE). cols
        is [1, BK]: x loaded in the weight tile's layout broadcasts without a trip through shared memory."""
        ok = cols < K
        x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
        if PROLOGUE == 1 or PROLOGUE == 2:
            if PROLOGUE == 2:
                x = _silu_rounded(x, X.dtype.element_ty)
            x = x * rstd
            if HAS_NORM_W:
                x = x * tl.load(NORM_W + cols, mask=ok, other=0.0).to(tl.float32)
        if PROLOGUE == 3:
            x = _silu_rounded(x, X.dtype.element_ty) * tl.load(X2 + cols, mask=ok, other=0.0).to(tl.float32)
        return x.to(X.dtype.element_ty).to(MM_DTYPE).to(tl.float32)

    @triton.jit(do_not_specialize=["N0", "N1", "N2", "N3", "E0", "E1", "E2"])
    def _rows_linear_kernel(X, X2, NORM_W, W0, W1, W2, W3, Y0, Y1, Y2, Y3, N0, N1, N2, N3, E0, E1, E2, K, eps,
                            PROLOGUE: tl.constexpr, HAS_NORM_W: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Programs [0, E0) take weight 0's output blocks, [E0, E1) weight 1's, [E1, E2) weight 2's, the rest
        weight 3's; Y_i [N_i] = W_i [N_i, K] @ prologue(X) [K]."""
        pid = tl.program_id(0)
        if pid < E0:
            w_ptr, y_ptr, n_out, block = W0, Y0, N0, pid
        elif pid < E1:
            w_ptr, y_ptr, n_out, block = W1, Y1, N1, pid - E0
        elif pid < E2:
            w_ptr, y_ptr, n_out, block = W2, Y2, N2, pid - E1
        else:
            w_ptr, y_ptr, n_out, block = W3, Y3, N3, pid - E2
        rstd = 0.0
        if PROLOGUE == 1 or PROLOGUE == 2:
            squares = tl.zeros([1, BK], dtype=tl.float32)
            for k0 in range(0, K, BK):
                cols = k0 + tl.arange(0, BK)[None, :]
                x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
                if PROLOGUE == 2:
                    x = _silu_rounded(x, X.dtype.element_ty)
                squares += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, 1), 0) / K + eps)
        n = block * BN + tl.arange(0, BN)
        n_ok = n[:, None] < n_out
        rows = w_ptr + n[:, None].to(tl.int64) * K
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)[None, :]
            x = _prologue_block(X, X2, NORM_W, rstd, cols, K, PROLOGUE, HAS_NORM_W, W0.dtype.element_ty)
            w = tl.load(rows + cols, mask=n_ok & (cols < K), other=0.0)
            acc += w.to(tl.float32) * x
        tl.store(y_ptr + n, tl.sum(acc, 1).to(Y0.dtype.element_ty), mask=n < n_out)


def fits(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] = ()) -> bool:
    """Whether rows_linear takes these: a Triton device (or the interpreter), at most MAX_ROWS rows of contiguous
    x, 1 to MAX_WEIGHTS contiguous weights of x's dtype over its width, no biases, no autograd to record, and no
    autocast (which would cast the weights every call: the unfused path does that)."""
    from .fused import triton_wanted

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        KERNELS_AVAILABLE
        and 0 < rows <= MAX_ROWS
        and 1 <= len(weights) <= MAX_WEIGHTS
        and triton_wanted(x)
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.is_contiguous()
        and all(b is None for b in biases)
        and all(w.dim() == 2 and w.shape[1] == x.shape[-1] and w.dtype == weights[0].dtype and w.is_contiguous()
                and w.device == x.device for w in weights)
        and weights[0].dtype == x.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
    )


def rows_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], prologue: str = "none",
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                up: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(F.linear(u, W_i) for each weight), u = prologue(x): x itself, RMSNorm(x) * norm_weight, RMSNorm(silu(x)) *
    norm_weight, or silu(x) * up; u rounded to x's dtype, the products to the weights' dtype. Check `fits` first."""
    if prologue not in PROLOGUES:
        raise ValueError(f"unknown prologue {prologue!r}; expected one of {sorted(PROLOGUES)}")
    if (prologue == "swiglu") != (up is not None) or (up is not None and up.shape != x.shape):
        raise ValueError(f"prologue 'swiglu' needs up of x's shape {list(x.shape)}; other prologues take no up")
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"rows_linear takes one row (x of shape [..., K] with every other dimension 1), got "
                         f"{list(x.shape)}")
    outs = [torch.empty(*x.shape[:-1], w.shape[0], device=x.device, dtype=w.dtype) for w in weights]
    launch = launch_for(sum(w.shape[0] for w in weights))
    blocks = [cdiv(w.shape[0], launch["BN"]) for w in weights]
    ends = [sum(blocks[: i + 1]) for i in range(len(blocks))]
    padded_w = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
    padded_y = outs + [outs[0]] * (MAX_WEIGHTS - len(outs))
    widths = [w.shape[0] for w in weights] + [0] * (MAX_WEIGHTS - len(weights))
    ends += [ends[-1]] * (MAX_WEIGHTS - len(ends))
    _rows_linear_kernel[(ends[-1],)](
        x, up if up is not None else x, norm_weight if norm_weight is not None else x, *padded_w, *padded_y, *widths,
        *ends[:3], K, eps, PROLOGUE=PROLOGUES[prologue], HAS_NORM_W=norm_weight is not None, **launch,
    )
    return tuple(outs)
