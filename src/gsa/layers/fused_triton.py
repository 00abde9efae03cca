"""Triton kernels for the elementwise / row-wise parts of the fused Functions (gsa.layers.fused) on CUDA tensors.

    rms_norm_rows_fwd(x, w, eps, pre_silu)          -> (y, rstd): y = RMSNorm(silu(x) or x) * w in x's dtype
    rms_norm_rows_bwd(x, w, rstd, dy, pre_silu)     -> (dx, dw)
    swiglu_rows_fwd(gate, up)                       -> silu(gate) * up
    swiglu_rows_bwd(gate, up, dh)                   -> (h, dgate, dup), h = silu(gate) * up rebuilt for dW

One pass over the rows each, float32 inside, the same roundings as the torch operations they stand for (silu is
rounded to the input dtype before it is used, as torch computes it in that dtype); they agree with the torch path
up to float rounding (the row sums run in another order). Matrix products stay with torch. Importable without a
GPU: under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how tests/layers check them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from ..ops.triton.common import cdiv, next_power_of_2, swish_grad

    KERNELS_AVAILABLE = True
except ImportError:  # no triton: the torch path serves everything
    KERNELS_AVAILABLE = False

MAX_WIDTH = 16384  # one row in one program; wider rows take the torch path


def supported(x: torch.Tensor) -> bool:
    return KERNELS_AVAILABLE and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.shape[-1] <= MAX_WIDTH


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


if KERNELS_AVAILABLE:

    @triton.jit
    def _silu_rounded(x, DTYPE: tl.constexpr):
        """silu(x) as torch computes it for a tensor of DTYPE: in float32, rounded to DTYPE."""
        return (x * tl.sigmoid(x)).to(DTYPE).to(tl.float32)

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, D, eps, HAS_W: tl.constexpr, PRE_SILU: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        valid = cols < D
        x = tl.load(X + row * D + cols, mask=valid, other=0.0).to(tl.float32)
        if PRE_SILU:
            x = _silu_rounded(x, X.dtype.element_ty)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=valid)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, RSTD, DY, DX, DW, N, D, rows_per_program, HAS_W: tl.constexpr,
                             PRE_SILU: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < D
        if HAS_W:
            w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * rows_per_program
        for i in range(0, rows_per_program):
            row = start + i
            if row < N:
                offset = row.to(tl.int64) * D
                x_in = tl.load(X + offset + cols, mask=valid, other=0.0).to(tl.float32)
                if PRE_SILU:
                    u = _silu_rounded(x_in, X.dtype.element_ty)
                else:
                    u = x_in
                rstd = tl.load(RSTD + row)
                xhat = u * rstd
                dy = tl.load(DY + offset + cols, mask=valid, other=0.0).to(tl.float32)
                if HAS_W:
                    dw += dy * xhat
                    dy = dy * w
                du = rstd * (dy - xhat * (tl.sum(dy * xhat, 0) / D))
                if PRE_SILU:
                    du = du.to(DX.dtype.element_ty).to(tl.float32)  # the composition's grad of silu(x) is rounded
                    du = swish_grad(du, x_in)
                tl.store(DX + offset + cols, du.to(DX.dtype.element_ty), mask=valid)
        if HAS_W:
            tl.store(DW + pid.to(tl.int64) * D + cols, dw, mask=valid)

    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
        h = _silu_rounded(g, G.dtype.element_ty) * u
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=valid)

    @triton.jit
    def _swiglu_bwd_kernel(G, U, DH, H, DG, DU, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=valid, other=0.0).to(tl.float32)
        s = _silu_rounded(g, G.dtype.element_ty)
        tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=valid)
        tl.store(DU + offs, (dh * s).to(DU.dtype.element_ty), mask=valid)
        ds = (dh * u).to(G.dtype.element_ty).to(tl.float32)  # torch rounds grad * up to the dtype first
        tl.store(DG + offs, swish_grad(ds, g).to(DG.dtype.element_ty), mask=valid)

    @triton.jit
    def _cross_entropy_kernel(LOGITS, LABELS, LOSS, COUNT, V, ignore_index, GRAD: tl.constexpr,
                              BLOCK: tl.constexpr):
        """One row of logits: its loss lse - logit[label] (0 for an ignored label) and, with GRAD, the loss
        gradient (softmax - onehot) / count written over the logits in their dtype."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * V
        cols = tl.arange(0, BLOCK)
        label = tl.load(LABELS + row)
        valid = label != ignore_index
        # running max and sum of exponentials per lane; a finite start keeps masked lanes at exp(-inf) = 0
        top = tl.full([BLOCK], -1e30, dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, x)
            total = total * tl.exp(top - new_top) + tl.exp(x - new_top)
            top = new_top
        peak = tl.max(top, 0)
        lse = peak + tl.log(tl.sum(total * tl.exp(top - peak), 0))
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
        if GRAD:
            scale = tl.where(valid, 1.0 / tl.load(COUNT).to(tl.float32), 0.0)
            for start in range(0, V, BLOCK):
                offs = start + cols
                p = tl.exp(tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32) - lse)
                p = tl.where(offs == label, p - 1.0, p) * scale
                tl.store(base + offs, p.to(LOGITS.dtype.element_ty), mask=offs < V)


CROSS_ENTROPY_BLOCK = 4096


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, ignore_index: int,
                       grad: bool) -> torch.Tensor:
    """Per-row losses (float32) of contiguous logits [rows, V] against labels; with grad, the logits are replaced
    in place by the gradient of sum(losses) / count (count: a one-element tensor, no host sync)."""
    rows, V = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        block = min(CROSS_ENTROPY_BLOCK, next_power_of_2(V))
        _cross_entropy_kernel[(rows,)](logits, labels, loss, count, V, ignore_index, GRAD=grad, BLOCK=block,
                                       num_warps=8 if block >= 2048 else 4)
    return loss


def _block(D: int) -> int:
    return next_power_of_2(D)


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm_rows_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, pre_silu: bool):
    """(y in x's dtype and shape, rstd [rows] float32)."""
    shape, D = x.shape, x.shape[-1]
    x2 = _rows(x)
    N = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    block = _block(D)
    if N:
        _rms_norm_fwd_kernel[(N,)](x2, weight if weight is not None else x2, y, rstd, D, eps,
                                   HAS_W=weight is not None, PRE_SILU=pre_silu, BLOCK=block, num_warps=_warps(block))
    return y.view(shape), rstd.view(*shape[:-1], 1)


def rms_norm_rows_bwd(x, weight, rstd, dy, pre_silu: bool):
    """(dx in x's dtype, dw float32 or None) for y = RMSNorm(silu(x) or x) * w and the gradient dy of y (any
    floating dtype; loaded as float32)."""
    shape, D = x.shape, x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    N = x2.shape[0]
    dx = torch.empty_like(x2)
    block = _block(D)
    programs = max(1, min(N, 4 * _multiprocessors(x.device)))
    rows_per_program = cdiv(max(N, 1), programs)
    programs = cdiv(max(N, 1), rows_per_program)
    dw = torch.empty(programs, D, device=x.device, dtype=torch.float32) if weight is not None else None
    if N:
        _rms_norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, rstd.reshape(-1).contiguous(), dy2, dx,
            dw if dw is not None else dx, N, D, rows_per_program, HAS_W=weight is not None, PRE_SILU=pre_silu,
            BLOCK=block, num_warps=_warps(block),
        )
    elif dw is not None:
        dw.zero_()
    return dx.view(shape), (dw.sum(0) if dw is not None else None)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


SWIGLU_BLOCK = 1024


def swiglu_rows_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, SWIGLU_BLOCK),)](gate, up, h, n, BLOCK=SWIGLU_BLOCK, num_warps=4)
    return h


def swiglu_rows_bwd(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    gate, up, dh = gate.contiguous(), up.contiguous(), dh.contiguous()
    h, dg, du = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, SWIGLU_BLOCK),)](gate, up, dh, h, dg, du, n, BLOCK=SWIGLU_BLOCK, num_warps=4)
    return h, dg, du
