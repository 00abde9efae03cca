"""Triton kernels for the elementwise / row-wise parts of the fused Functions (gsa.layers.fused) on CUDA tensors.

    rms_norm_rows_fwd(x, w, eps, pre_silu)          -> (y, rstd): y = RMSNorm(silu(x) or x) * w in x's dtype
    rms_norm_rows_fwd(x, w, eps, False, residual)   -> (y, rstd, h): the same of h = residual + x, h written too
    rms_norm_rows_bwd(x, w, rstd, dy, pre_silu)     -> (dx, dw)
    rms_norm_rows_bwd(h, w, rstd, dy, False, dh)    -> (dx + dh, dw): the residual stream's gradient added in
    swiglu_rows_fwd(gate, up)                       -> silu(gate) * up
    swiglu_rows_bwd(gate, up, dh, joined)           -> (h, dgate, dup), h = silu(gate) * up rebuilt for dW
    slot_gates_fwd(f, tau, clamp_min, mask, dtype)  -> (s, g) of the GSA layer from its gate logits f
    slot_gates_bwd(f, tau, clamp_min, mask, ds, dg) -> df (into a joined gradient's block when given one)
    swish_rows_fwd(q, k, v)                         -> silu of each, one launch
    swish_rows_bwd((q, k, v), (dq, dk, dv), out)    -> the three gradients through silu as blocks of out

One pass over the rows each, float32 inside, the same roundings as the torch operations they stand for (silu is
rounded to the input dtype before it is used, as torch computes it in that dtype); they agree with the torch path
up to float rounding (the row sums run in another order; the swish kernels form x * sigmoid(x) where torch forms
x / (1 + exp(-x)), which can differ in the last bit). Matrix products stay with torch. Importable without a
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
    def _rms_norm_fwd_kernel(X, RES, H, W, Y, RSTD, N, D, eps, HAS_W: tl.constexpr, PRE_SILU: tl.constexpr,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """HAS_RES: the rows normalised are h = RES + X, rounded to H's dtype as torch's addition rounds them,
        and written to H (the pre-norm block's residual addition, one pass over the rows fewer)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        valid = (rows < N)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_RES:
            h = (x + tl.load(RES + offs, mask=valid, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + offs, h, mask=valid)
            x = h.to(tl.float32)
        if PRE_SILU:
            x = _silu_rounded(x, X.dtype.element_ty)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        y = x * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
        tl.store(RSTD + rows, rstd, mask=rows < N)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, RSTD, DY, DRES, DX, DW, N, D, rows_per_program, HAS_W: tl.constexpr,
                             PRE_SILU: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK: tl.constexpr,
                             ROWS: tl.constexpr, STAGES: tl.constexpr):
        """rows_per_program (a multiple of ROWS) rows from pid * rows_per_program, ROWS at a time (the loads of
        STAGES tiles in flight); each program writes its partial dw row. HAS_DRES: DRES (the gradient that reached
        the normalised rows by the residual stream) is added to dx, in the same pass."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < D
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program
        for i in tl.range(0, rows_per_program, ROWS, num_stages=STAGES):
            rows = start + i + tl.arange(0, ROWS)
            valid = (rows < N)[:, None] & col_ok[None, :]
            offs = rows[:, None] * D + cols[None, :]
            x_in = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
            if PRE_SILU:
                u = _silu_rounded(x_in, X.dtype.element_ty)
            else:
                u = x_in
            rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)[:, None]
            xhat = u * rstd
            dy = tl.load(DY + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_W:
                dw += dy * xhat
                dy = dy * w
            du = rstd * (dy - xhat * (tl.sum(dy * xhat, 1) / D)[:, None])
            if PRE_SILU:
                du = du.to(DX.dtype.element_ty).to(tl.float32)  # the composition's grad of silu(x) is rounded
                du = swish_grad(du, x_in)
            if HAS_DRES:  # rounded as autograd sums the two: the norm's dx in its dtype, then the addition
                du = du.to(DX.dtype.element_ty).to(tl.float32) + tl.load(DRES + offs, mask=valid, other=0.0).to(
                    tl.float32)
            tl.store(DX + offs, du.to(DX.dtype.element_ty), mask=valid)
        if HAS_W:
            tl.store(DW + pid.to(tl.int64) * D + cols, tl.sum(dw, 0), mask=col_ok)

    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
        h = _silu_rounded(g, G.dtype.element_ty) * u
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=valid)

    @triton.jit
    def _swiglu_bwd_kernel(G, U, DH, H, DG, DU, width, d_stride, BLOCK: tl.constexpr):
        # one row's block of columns a program: the gradients' rows are d_stride apart (2 x width when dgate and
        # dup are the two halves of one buffer, which the next product reads as one matrix)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < width
        offs = row * width + cols
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=valid, other=0.0).to(tl.float32)
        s = _silu_rounded(g, G.dtype.element_ty)
        tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=valid)
        d_offs = row * d_stride + cols
        tl.store(DU + d_offs, (dh * s).to(DU.dtype.element_ty), mask=valid)
        ds = (dh * u).to(G.dtype.element_ty).to(tl.float32)  # torch rounds grad * up to the dtype first
        tl.store(DG + d_offs, swish_grad(ds, g).to(DG.dtype.element_ty), mask=valid)

    @triton.jit
    def _log_sigmoid(x):
        """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)) as torch forms it. log1p(z) as log(u) * z / (u - 1), u = 1 + z
        (exact to float32 rounding where log(1 + z) alone loses z's low bits: |x| from ~5 on), z itself where u
        rounds to 1."""
        z = tl.exp(-tl.abs(x))
        u = 1.0 + z
        log1p = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.minimum(x, 0.0) - log1p

    @triton.jit
    def _gate_block(F, MASK, numel, width, tau, clamp_min, HAS_CLAMP: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK: tl.constexpr):
        """This program's block of the gate logits: (offsets, valid, f and the mask in float32, g before the clamp,
        g = max(logsigmoid(f) / τ, clamp_min) * mask)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        f = tl.load(F + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            mask = tl.load(MASK + offs // width, mask=valid, other=0.0)
        else:  # a tensor either way: returned values must be
            mask = tl.full([BLOCK], 1.0, tl.float32)
        g0 = _log_sigmoid(f) / tau
        g = g0
        if HAS_CLAMP:  # a NaN logit stays NaN, as through torch.clamp
            g = tl.maximum(g, clamp_min, propagate_nan=tl.PropagateNan.ALL)
        if HAS_MASK:
            g = g * mask
        return offs, valid, f, mask, g0, g

    @triton.jit
    def _slot_gates_fwd_kernel(F, MASK, S, G, numel, width, tau, clamp_min, HAS_CLAMP: tl.constexpr,
                               HAS_MASK: tl.constexpr, WRITE_S: tl.constexpr, WRITE_G: tl.constexpr,
                               BLOCK: tl.constexpr):
        offs, valid, _, _, _, g = _gate_block(F, MASK, numel, width, tau, clamp_min, HAS_CLAMP, HAS_MASK, BLOCK)
        if WRITE_S:
            tl.store(S + offs, (1.0 - tl.exp(g)).to(S.dtype.element_ty), mask=valid)
        if WRITE_G:
            tl.store(G + offs, g.to(G.dtype.element_ty), mask=valid)

    @triton.jit
    def _slot_gates_bwd_kernel(F, MASK, DS, DG, DF, numel, width, tau, clamp_min, df_stride,
                               HAS_CLAMP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DS: tl.constexpr,
                               HAS_DG: tl.constexpr, ROW_WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        """With ROW_WIDTH > 0, df's rows (of ROW_WIDTH values) are df_stride apart: the gate logits' block of a
        joined gradient (a constant, so that finding an element's row is a multiply and shift, or a shift where it
        is a power of two, not an int64 division); dense otherwise."""
        offs, valid, f, mask, g0, g = _gate_block(F, MASK, numel, width, tau, clamp_min, HAS_CLAMP, HAS_MASK,
                                                  BLOCK)
        d = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_DS:  # s = 1 - exp(g)
            d -= tl.load(DS + offs, mask=valid, other=0.0).to(tl.float32) * tl.exp(g)
        if HAS_DG:
            d += tl.load(DG + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            d = d * mask
        if HAS_CLAMP:  # the clamp passes the gradient where it did not bite, ties included (torch.clamp's rule)
            d = tl.where(g0 >= clamp_min, d, 0.0)
        d = d / tau
        # d logsigmoid(f) / df = sigmoid(-f), formed from z = exp(-|f|) as torch's log_sigmoid_backward does
        z = tl.exp(-tl.abs(f))
        d = d * tl.where(f < 0, 1.0 / (1.0 + z), z / (1.0 + z))
        if ROW_WIDTH > 0:
            df_offs = (offs // ROW_WIDTH) * df_stride + offs % ROW_WIDTH
        else:
            df_offs = offs
        tl.store(DF + df_offs, d.to(DF.dtype.element_ty), mask=valid)

    @triton.jit
    def _swish_part(pid, X0, X1, X2, n0, n1, n2):
        """The tensor (0, 1 or 2) a program of the three-tensor swish kernels works on, and its size."""
        if pid == 0:
            X, n = X0, n0
        elif pid == 1:
            X, n = X1, n1
        else:
            X, n = X2, n2
        return X, n

    @triton.jit
    def _swish_fwd_kernel(X0, X1, X2, Y0, Y1, Y2, n0, n1, n2, BLOCK: tl.constexpr):
        """Y_i = silu(X_i) for up to three tensors in one launch (program axis 1 picks the tensor)."""
        X, n = _swish_part(tl.program_id(1), X0, X1, X2, n0, n1, n2)
        Y, _ = _swish_part(tl.program_id(1), Y0, Y1, Y2, n0, n1, n2)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(Y + offs, (x * tl.sigmoid(x)).to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _swish_bwd_kernel(X0, X1, X2, DY0, DY1, DY2, DX, w0, w1, w2, c1, c2, dx_stride, BLOCK: tl.constexpr):
        """DX[:, c_i : c_i + w_i] = silu'(X_i) * DY_i for three [rows, w_i] tensors, DX's rows dx_stride apart
        (the blocks of one joined gradient; c0 = 0); program axes: row, column block, tensor."""
        which = tl.program_id(2)
        X, width = _swish_part(which, X0, X1, X2, w0, w1, w2)
        DY, col0 = _swish_part(which, DY0, DY1, DY2, 0, c1, c2)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < width
        offs = row * width + cols
        x = tl.load(X + offs, mask=valid, other=0.0)
        dy = tl.load(DY + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(DX + row * dx_stride + col0 + cols, swish_grad(dy, x).to(DX.dtype.element_ty), mask=valid)

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


# Launch settings of the norm kernels: rows a program takes at a time, warps (None: by tile size), and (backward)
# programs per multiprocessor and tiles in flight. benchmarks/tune_rows.py times the choices on an H200 at the 1.3B
# model's rows (16K x 2048 bf16, GPU time; results/tune_rows_h200.json): forward 35.7 -> 34.3 us (2 rows, 8 warps),
# backward 68.7 -> 58.6 us (2 rows, 4 warps, 2 programs per multiprocessor, 3 tiles in flight) against one row a
# program; the backward's gain is mostly the pipelined loads.
NORM_LAUNCH = {"fwd_rows": 2, "fwd_warps": 8, "bwd_rows": 2, "bwd_warps": 4, "bwd_programs_per_sm": 2,
               "bwd_stages": 3}


def _norm_launch(kind: str, block: int) -> tuple[int, int, int]:
    """(rows a program takes at a time, warps, pipelined tiles) for the norm kernel `kind` ("fwd" / "bwd") at this
    block width: NORM_LAUNCH's settings, tuned at 2048-wide rows, while a row fits 4096 elements; wider rows one at
    a time with warps by their width and no pipelining (a 16384-wide float32 row would not fit 3 tiles deep)."""
    if block > 4096:
        return 1, _warps(block), 1
    rows = NORM_LAUNCH[f"{kind}_rows"]
    while rows > 1 and rows * block > 4096:
        rows //= 2
    warps = NORM_LAUNCH[f"{kind}_warps"] or _warps(block * rows)
    return rows, warps, NORM_LAUNCH.get(f"{kind}_stages", 1)


def rms_norm_rows_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, pre_silu: bool,
                      residual: torch.Tensor | None = None):
    """(y in x's dtype and shape, rstd [rows] float32); with residual (same shape, pre_silu False), the rows
    normalised are h = residual + x in their promoted dtype, y in that dtype, and h is returned third."""
    shape, D = x.shape, x.shape[-1]
    x2 = _rows(x)
    N = x2.shape[0]
    h2 = res2 = None
    if residual is not None:
        if pre_silu or residual.shape != x.shape:
            raise ValueError(f"a residual needs pre_silu False and x's shape {list(shape)}, got pre_silu="
                             f"{pre_silu} and {list(residual.shape)}")
        res2 = _rows(residual)
        h2 = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
    y = torch.empty_like(x2 if h2 is None else h2)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    block = _block(D)
    rows, warps, _ = _norm_launch("fwd", block)
    if N:
        _rms_norm_fwd_kernel[(cdiv(N, rows),)](x2, res2 if res2 is not None else x2, h2 if h2 is not None else y,
                                               weight if weight is not None else x2, y, rstd, N, D, eps,
                                               HAS_W=weight is not None, PRE_SILU=pre_silu, HAS_RES=res2 is not None,
                                               BLOCK=block, ROWS=rows, num_warps=warps)
    if h2 is None:
        return y.view(shape), rstd.view(*shape[:-1], 1)
    return y.view(shape), rstd.view(*shape[:-1], 1), h2.view(shape)


def rms_norm_rows_bwd(x, weight, rstd, dy, pre_silu: bool, d_residual: torch.Tensor | None = None):
    """(dx in x's dtype, dw float32 or None) for y = RMSNorm(silu(x) or x) * w and the gradient dy of y (any
    floating dtype; loaded as float32); d_residual (x's shape): a gradient of x from elsewhere, added to dx."""
    shape, D = x.shape, x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    dres2 = _rows(d_residual) if d_residual is not None else None
    N = x2.shape[0]
    dx = torch.empty_like(x2)
    block = _block(D)
    rows, warps, stages = _norm_launch("bwd", block)
    programs = max(1, min(cdiv(N, rows), NORM_LAUNCH["bwd_programs_per_sm"] * _multiprocessors(x.device)))
    rows_per_program = cdiv(cdiv(max(N, 1), programs), rows) * rows
    programs = cdiv(max(N, 1), rows_per_program)
    dw = torch.empty(programs, D, device=x.device, dtype=torch.float32) if weight is not None else None
    if N:
        _rms_norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, rstd.reshape(-1).contiguous(), dy2,
            dres2 if dres2 is not None else dy2, dx, dw if dw is not None else dx, N, D, rows_per_program,
            HAS_W=weight is not None, PRE_SILU=pre_silu, HAS_DRES=dres2 is not None, BLOCK=block, ROWS=rows,
            STAGES=stages, num_warps=warps,
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


def swiglu_rows_bwd(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, joined: bool = False):
    """(h, dgate, dup); joined (gate and up of one dtype): dgate and dup are the two halves of one [..., 2 x width]
    buffer (`joined_columns` gives it back as one tensor)."""
    gate, up, dh = gate.contiguous(), up.contiguous(), dh.contiguous()
    width = gate.shape[-1]
    # every output freshly allocated dense (empty_like would copy a size-1 dimension's odd stride), so that row r of
    # the gradients starts at r x d_stride
    h = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if joined:
        d = torch.empty(*gate.shape[:-1], 2 * width, device=gate.device, dtype=gate.dtype)
        dg, du = d[..., :width], d[..., width:]
    else:
        dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
        du = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    if gate.numel():
        grid = (gate.numel() // width, cdiv(width, SWIGLU_BLOCK))
        _swiglu_bwd_kernel[grid](gate, up, dh, h, dg, du, width, 2 * width if joined else width,
                                 BLOCK=SWIGLU_BLOCK, num_warps=4)
    return h, dg, du


GATE_BLOCK = 1024


def gate_mask_rows(f: torch.Tensor, mask: torch.Tensor | None):
    """(mask as float32 [rows] contiguous, row width) where mask broadcasts to f as one value per leading index
    (f [B, T, H, M], mask [B, T, 1, 1]: the layer's padding mask), (None, 1) without a mask; None where the mask
    has another shape (then the torch path serves it)."""
    if mask is None:
        return None, 1
    if mask.dim() != f.dim():
        return None
    lead = f.dim()
    while lead > 0 and mask.shape[lead - 1] == 1 and f.shape[lead - 1] != 1:
        lead -= 1
    if tuple(mask.shape[:lead]) != tuple(f.shape[:lead]) or any(n != 1 for n in mask.shape[lead:]):
        return None
    width = 1
    for n in f.shape[lead:]:
        width *= n
    return mask.reshape(-1).to(torch.float32).contiguous(), width


def slot_gates_fwd(f: torch.Tensor, tau: float, clamp_min: float | None, mask_rows, width: int,
                   dtype: torch.dtype, write_s: bool = True, write_g: bool = True):
    """(s, g) in dtype and f's shape from contiguous gate logits f; mask_rows / width from gate_mask_rows. Either
    output may be skipped (None): backward rebuilds s and g separately."""
    s = torch.empty(f.shape, device=f.device, dtype=dtype) if write_s else None
    g = torch.empty(f.shape, device=f.device, dtype=dtype) if write_g else None
    n = f.numel()
    if n:
        _slot_gates_fwd_kernel[(cdiv(n, GATE_BLOCK),)](
            f, mask_rows if mask_rows is not None else f, s if write_s else g, g if write_g else s, n, width, tau,
            clamp_min if clamp_min is not None else 0.0, HAS_CLAMP=clamp_min is not None,
            HAS_MASK=mask_rows is not None, WRITE_S=write_s, WRITE_G=write_g, BLOCK=GATE_BLOCK, num_warps=4,
        )
    return s, g


def slot_gates_bwd(f: torch.Tensor, tau: float, clamp_min: float | None, mask_rows, width: int,
                   ds: torch.Tensor | None, dg: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """df (f's dtype) from the gradients of s and g (either may be None); written into out when given (rows of
    f's last two dimensions, any row stride: a column block of a joined gradient)."""
    row_width = f.shape[-1] * f.shape[-2] if f.dim() > 1 else f.numel()
    if out is not None and (out.shape[-1] != row_width or out.stride(-1) != 1 or out.numel() != f.numel()):
        raise ValueError(f"out must hold f's {f.numel()} values as rows of f's last two dimensions ({row_width} "
                         f"values, unit column stride), got shape {list(out.shape)} strides {list(out.stride())}")
    df = torch.empty(f.shape, device=f.device, dtype=f.dtype) if out is None else out
    df_stride = row_width if out is None else out.stride(-2)
    n = f.numel()
    ds = ds.contiguous() if ds is not None else None
    dg = dg.contiguous() if dg is not None else None
    if n:
        _slot_gates_bwd_kernel[(cdiv(n, GATE_BLOCK),)](
            f, mask_rows if mask_rows is not None else f, ds if ds is not None else f, dg if dg is not None else f,
            df, n, width, tau, clamp_min if clamp_min is not None else 0.0, df_stride,
            HAS_CLAMP=clamp_min is not None, HAS_MASK=mask_rows is not None, HAS_DS=ds is not None,
            HAS_DG=dg is not None, ROW_WIDTH=row_width if df_stride != row_width else 0, BLOCK=GATE_BLOCK,
            num_warps=4,
        )
    return df


SWISH_BLOCK = 1024


def swish_rows_fwd(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """silu of each of up to three contiguous tensors, one launch."""
    ys = tuple(torch.empty_like(x) for x in xs)
    n = max(x.numel() for x in xs)
    if n:
        unused = 3 - len(xs)  # the kernel's unused slots: pointers it never reads (no program has that index)
        _swish_fwd_kernel[(cdiv(n, SWISH_BLOCK), len(xs))](
            *xs, *(xs[0],) * unused, *ys, *(ys[0],) * unused, *(x.numel() for x in xs), *(0,) * unused,
            BLOCK=SWISH_BLOCK, num_warps=4,
        )
    return ys


def swish_rows_bwd(xs: tuple[torch.Tensor, ...], dys: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    """out[:, c_i : c_i + w_i] = silu'(x_i) * dy_i for three contiguous [rows, w_i] pairs (x_i, dy_i), c_i the
    widths before; out [rows, >= Σ w_i] with unit column stride."""
    widths = [x.shape[-1] for x in xs]
    rows = xs[0].numel() // widths[0]
    if rows:
        grid = (rows, cdiv(max(widths), SWISH_BLOCK), 3)
        _swish_bwd_kernel[grid](*xs, *dys, out, *widths, widths[0], widths[0] + widths[1], out.stride(-2),
                                BLOCK=SWISH_BLOCK, num_warps=4)
