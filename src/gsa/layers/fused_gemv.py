"""Linear maps of one row (decoding at batch 1) with what comes before them fused in, on the GPU.

A decoding step of the 1.3B model at batch 1 reads ~2.6 GB of weights, ~0.6 ms on an H200, yet took ~1.9 ms: each
layer ran ~17 kernels (an RMSNorm, four projections, the step's two, the output norm and projection, the MLP's
norm, two projections, SwiGLU and down projection, two residual adds) of a few microseconds each inside the graph.
Here one kernel serves a whole group of matrix-vector products:

    row_linear(x, weights, prologue="norm", norm_weight=w, eps=eps)      RMSNorm(x) * w, then every W_i
    row_linear(x, weights, prologue="norm", ..., residual=r)             the same of h = r + x; returns (h, ...)
    row_linear(x, weights, prologue="silu_norm", ...)                    RMSNorm(silu(x)) * w (the GSA output norm)
    row_linear(gate, weights, prologue="swiglu", up=up)                  silu(gate) * up (the MLP's down projection)

Each program takes a block of output features of one of the (up to four) weights, forms the prologue's input from
the row on the fly (the row stays in cache; every program forms the norm's 1/rms itself) and accumulates in
float32. The roundings are those of the unfused path: the normalised or SwiGLU input in x's dtype, the product
rounded to the weights' dtype, so the two agree up to the order of the float32 sums. More rows take the unfused
path: there cuBLAS runs a real matrix product (a version of this kernel that held up to four rows in every
program was 6x slower or worse than the unfused path, benchmarks/results/tune_gemv_h200_v1.json).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl

    from ..ops.triton.common import cdiv
    from .fused_triton import _silu_rounded

    KERNELS_AVAILABLE = True
except ImportError:
    KERNELS_AVAILABLE = False

ENABLED = True  # the layers take the kernel where `fits` says so (False: the unfused path everywhere)
MAX_WEIGHTS = 4  # weights a launch takes (the GSA layer's q, k, v and f projections)
PROLOGUES = {"none": 0, "norm": 1, "silu_norm": 2, "swiglu": 3}

# Output features a program takes (BN), input features a loop step (BK) and warps, by the launch's output features:
# a launch of at most NARROW outputs (the 1.3B model's o_proj and down_proj, 2048) would have few programs of 16
# output features (128, fewer than an H200's multiprocessors), so it takes smaller blocks of longer steps.
# benchmarks/tune_gemv.py at the 1.3B layer (H200, one row, GPU time; results/tune_gemv_h200_v2.json): 16 / 256 was
# the best single setting, 32.4 us for the layer's four groups against 54.0 unfused; o_proj 7.3 -> 5.3 us and
# down_proj 9.4 -> 6.2 us with 4 / 512; the model's decoding 1.644 -> 1.366 ms a token (tune_gemv_h200_v3.json).
GEMV_LAUNCH = {"wide": dict(BN=16, BK=256, num_warps=4), "narrow": dict(BN=4, BK=512, num_warps=4)}
NARROW = 4096


def launch_for(outputs: int) -> dict:
    """GEMV_LAUNCH's setting for a launch of this many output features (all its weights together)."""
    return GEMV_LAUNCH["narrow" if outputs <= NARROW else "wide"]


if KERNELS_AVAILABLE:

    @triton.jit
    def _input_block(X, X2, cols, K, HAS_RES: tl.constexpr):
        """[1, BK] of x in float32, or of h = X2 + X rounded to x's dtype (the residual addition) when HAS_RES."""
        ok = cols < K
        x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            x = (x + tl.load(X2 + cols, mask=ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
        return x

    @triton.jit
    def _prologue_block(X, X2, NORM_W, rstd, cols, K, PROLOGUE: tl.constexpr, HAS_NORM_W: tl.constexpr,
                        HAS_RES: tl.constexpr, MM_DTYPE: tl.constexpr):
        """[1, BK] of the products' input in float32 at columns cols [1, BK], as the unfused path rounds it (x's
        dtype, then MM_DTYPE)."""
        ok = cols < K
        x = _input_block(X, X2, cols, K, HAS_RES)
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
    def _row_linear_kernel(X, X2, H, NORM_W, W0, W1, W2, W3, Y0, Y1, Y2, Y3, N0, N1, N2, N3, E0, E1, E2, K, eps,
                            PROLOGUE: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_RES: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr):
        """Programs [0, E0) take weight 0's output blocks, [E0, E1) weight 1's, [E1, E2) weight 2's, the rest
        weight 3's; Y_i [N_i] = W_i [N_i, K] @ prologue(X) [K]. HAS_RES (norm prologues): the row normalised is
        h = X2 + X, which program 0 writes to H."""
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
                x = _input_block(X, X2, cols, K, HAS_RES)
                if HAS_RES and pid == 0:
                    tl.store(H + cols, x.to(H.dtype.element_ty), mask=cols < K)
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
            x = _prologue_block(X, X2, NORM_W, rstd, cols, K, PROLOGUE, HAS_NORM_W, HAS_RES, W0.dtype.element_ty)
            w = tl.load(rows + cols, mask=n_ok & (cols < K), other=0.0)
            acc += w.to(tl.float32) * x
        tl.store(y_ptr + n, tl.sum(acc, 1).to(Y0.dtype.element_ty), mask=n < n_out)


def fits(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] = (),
         norm_weight: torch.Tensor | None = None, up: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> bool:
    """Whether row_linear takes these: a Triton device (or the interpreter), one contiguous row x, 1 to MAX_WEIGHTS
    contiguous weights of x's dtype over its width, no biases, a contiguous norm weight of x's width and an `up` or
    `residual` of x's shape, dtype and layout where given, all on x's device, no autograd to record, and no
    autocast (which would cast the weights every call: the unfused path does that)."""
    from .fused import triton_wanted

    if not (ENABLED and KERNELS_AVAILABLE and x.dim() >= 1 and x.shape[-1] > 0 and x.numel() == x.shape[-1]):
        return False
    K, same_place = x.shape[-1], lambda t: t.device == x.device and t.is_contiguous()
    return (
        1 <= len(weights) <= MAX_WEIGHTS
        and triton_wanted(x)
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.is_contiguous()
        and all(b is None for b in biases)
        and all(w.dim() == 2 and w.shape[1] == K and w.dtype == x.dtype and same_place(w) for w in weights)
        and (norm_weight is None or (norm_weight.shape == (K,) and same_place(norm_weight)))
        and all(t is None or (t.shape == x.shape and t.dtype == x.dtype and same_place(t)) for t in (up, residual))
        and not torch.is_autocast_enabled(x.device.type)
        and not (torch.is_grad_enabled()
                 and any(t is not None and t.requires_grad for t in (x, *weights, norm_weight, up, residual)))
    )


def row_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], prologue: str = "none",
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                up: torch.Tensor | None = None, check: bool = True,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(F.linear(u, W_i) for each weight), u = prologue(x): x itself, RMSNorm(x) * norm_weight, RMSNorm(silu(x)) *
    norm_weight, or silu(x) * up; u rounded to x's dtype, the products to the weights' dtype. With a residual
    ("norm" only) the row normalised is h = residual + x, rounded to x's dtype, and the result is (h, *products):
    the pre-norm block's residual addition inside the same launch. Only for what `fits` accepts (checked here:
    anything else is a ValueError, not a wrong result; check=False for a caller that has just asked `fits` itself,
    as the layers do on every decoding step)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"unknown prologue {prologue!r}; expected one of {sorted(PROLOGUES)}")
    if (prologue == "swiglu") != (up is not None) or (up is not None and up.shape != x.shape):
        raise ValueError(f"prologue 'swiglu' needs up of x's shape {list(x.shape)}; other prologues take no up")
    if residual is not None and prologue != "norm":
        raise ValueError(f"a residual goes with the 'norm' prologue only, got {prologue!r}")
    if check and not fits(x, weights, (), norm_weight, up, residual):
        raise ValueError(
            f"row_linear takes one contiguous row x on a Triton device (got {list(x.shape)} {x.dtype} on "
            f"{x.device}) and 1 to {MAX_WEIGHTS} contiguous weights of its dtype and width (got "
            f"{[(tuple(w.shape), w.dtype) for w in weights]}), without autograd or autocast; see fits()")
    K = x.shape[-1]
    outs = [torch.empty(*x.shape[:-1], w.shape[0], device=x.device, dtype=w.dtype) for w in weights]
    launch = launch_for(sum(w.shape[0] for w in weights))
    blocks = [cdiv(w.shape[0], launch["BN"]) for w in weights]
    ends = list(itertools.accumulate(blocks))
    padded_w = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
    padded_y = outs + [outs[0]] * (MAX_WEIGHTS - len(outs))
    widths = [w.shape[0] for w in weights] + [0] * (MAX_WEIGHTS - len(weights))
    ends += [ends[-1]] * (MAX_WEIGHTS - len(ends))
    h = torch.empty_like(x) if residual is not None else None
    second = up if up is not None else residual
    _row_linear_kernel[(ends[-1],)](
        x, second if second is not None else x, h if h is not None else x,
        norm_weight if norm_weight is not None else x, *padded_w, *padded_y, *widths, *ends[:3], K, eps,
        PROLOGUE=PROLOGUES[prologue], HAS_NORM_W=norm_weight is not None, HAS_RES=residual is not None, **launch,
    )
    return tuple(outs) if h is None else (h, *outs)
