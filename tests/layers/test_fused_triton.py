"""Triton kernels of the fused Functions (gsa.layers.fused_triton) against the torch path of the same Functions.

On CPU they run in Triton's interpreter (tests/conftest.py), at small shapes; on a GPU the same tests run natively.
"""

from __future__ import annotations

import pytest
import torch

fused_triton = pytest.importorskip("gsa.layers.fused_triton")
if not fused_triton.KERNELS_AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

from gsa.layers.fused import (  # noqa: E402
    rms_norm,
    rms_norm_linear,
    slot_gate_recipes,
    slot_gates,
    swiglu_linear,
    swish_features,
    use_triton_kernels,
)
from tests.helpers import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def grads_of(fn, tensors, seed=5):
    xs = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [x for x in xs if x is not None], cot)
    return [o.detach() for o in outs], list(grads)


def both_paths(fn, tensors):
    with use_triton_kernels(True):
        got = grads_of(fn, tensors)
    with use_triton_kernels(False):
        want = grads_of(fn, tensors)
    return got, want


def assert_close(got, want, dtype, what):
    (go, gg), (wo, wg) = got, want
    for i, (a, b) in enumerate(zip(go + gg, wo + wg)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert rel_err(a, b) < TOL[dtype], (what, i, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pre_silu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_kernels_match_torch(dtype, pre_silu, affine):
    x = randn(3, 7, 100, seed=1, dtype=dtype, scale=2.0)  # width off the power-of-two grid
    w = 1 + randn(100, seed=2, scale=0.3) if affine else None  # float32 weight (the trainer's master copy)
    tensors = [x, w] if affine else [x]
    got, want = both_paths(lambda x, *w: rms_norm(x, w[0] if w else None, 1e-6, pre_silu), tensors)
    assert_close(got, want, dtype, "rms_norm")


@pytest.mark.parametrize("launch", [dict(fwd_rows=4, bwd_rows=2, bwd_programs_per_sm=1),
                                    dict(fwd_rows=8, fwd_warps=2, bwd_rows=4, bwd_warps=4, bwd_programs_per_sm=2,
                                         bwd_stages=3)],
                         ids=["rows4-2", "rows8-4"])
def test_rms_norm_kernels_with_several_rows_a_program(launch, monkeypatch):
    """Tiles of several rows (the last one partly past the end), programs walking several tiles: still the torch
    path's values (21 rows: no tile or program count divides them)."""
    monkeypatch.setattr(fused_triton, "NORM_LAUNCH", {**fused_triton.NORM_LAUNCH, **launch})
    x, w = randn(3, 7, 100, seed=31, scale=2.0), 1 + randn(100, seed=32, scale=0.3)
    got, want = both_paths(lambda x, w: rms_norm(x, w, 1e-6, True), [x, w])
    assert_close(got, want, torch.float32, "rms_norm rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pre_silu", [False, True])
def test_rms_norm_linear_with_kernels_matches_torch(dtype, pre_silu):
    x = randn(2, 33, 48, seed=3, dtype=dtype, scale=2.0)
    w = (1 + randn(48, seed=4, scale=0.3)).to(dtype)
    W1, W2 = randn(40, 48, seed=5, dtype=dtype, scale=0.15), randn(24, 48, seed=6, dtype=dtype, scale=0.15)
    got, want = both_paths(lambda x, w, a, b: rms_norm_linear(x, w, 1e-6, [a, b], pre_silu=pre_silu), [x, w, W1, W2])
    assert_close(got, want, dtype, "rms_norm_linear")


def test_rms_norm_linear_with_kernels_under_autocast():
    x = randn(2, 33, 48, seed=7, scale=2.0)
    w, W = 1 + randn(48, seed=8, scale=0.3), randn(40, 48, seed=9, scale=0.15)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = both_paths(lambda x, w, a: rms_norm_linear(x, w, 1e-6, [a]), [x, w, W])
    assert_close(got, want, torch.bfloat16, "autocast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("outputs", [0, 2])
def test_rms_norm_kernels_with_residual_match_torch(dtype, outputs):
    """h = residual + x formed in the norm's pass (forward) and the residual stream's gradient added in its
    backward: h, y or the products, and the gradients of x, residual, w and the weights as the torch path's."""
    x, residual = randn(3, 7, 100, seed=41, dtype=dtype, scale=2.0), randn(3, 7, 100, seed=42, dtype=dtype, scale=3.0)
    w = 1 + randn(100, seed=43, scale=0.3)
    weights = [randn(24 + 8 * i, 100, seed=44 + i, dtype=dtype, scale=0.1) for i in range(outputs)]
    for keep_normed in (False, True):
        got, want = both_paths(lambda x, r, w, *W: rms_norm_linear(x, w, 1e-6, W, residual=r, keep_normed=keep_normed)
                               if W else rms_norm(x, w, 1e-6, residual=r), [x, residual, w, *weights])
        assert_close(got, want, dtype, f"residual, keep_normed={keep_normed}")


def test_rms_norm_kernel_rounds_the_residual_sum_as_torch_does():
    """The sum is rounded to the inputs' dtype before it is normalised and written, as torch's addition rounds it:
    float16 (the interpreter rounds float16 as the GPU does), bitwise; a float32 residual with a float16 branch
    gives a float32 sum."""
    x, residual = randn(5, 64, seed=51, dtype=torch.float16), randn(5, 64, seed=52, dtype=torch.float16, scale=4.0)
    y, rstd, h = fused_triton.rms_norm_rows_fwd(x, None, 1e-6, False, residual)
    assert h.dtype == torch.float16 and torch.equal(h, residual + x)
    y_alone, rstd_alone = fused_triton.rms_norm_rows_fwd(residual + x, None, 1e-6, False)
    assert torch.equal(y, y_alone) and torch.equal(rstd, rstd_alone)
    wide = randn(5, 64, seed=53, scale=4.0)
    h32 = fused_triton.rms_norm_rows_fwd(x, None, 1e-6, False, wide)[2]
    assert h32.dtype == torch.float32 and torch.equal(h32, wide + x)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []), ids=str)
def test_rms_norm_backward_adds_the_residual_gradient_as_autograd_sums_it(dtype):
    """The residual stream's gradient added inside the norm's backward: bitwise the norm's dx rounded to its dtype
    plus that gradient, as autograd sums the two (float16 on the CPU, whose interpreter rounds it as the GPU does;
    bf16 too on a GPU). A sum formed in float32 and rounded once differs in ~4 % of the elements."""
    h, dy = randn(37, 96, seed=61, dtype=dtype, scale=2.0), randn(37, 96, seed=62, dtype=dtype)
    d_h, w = randn(37, 96, seed=63, dtype=dtype, scale=0.5), 1 + randn(96, seed=64, scale=0.3)
    _, rstd = fused_triton.rms_norm_rows_fwd(h, w, 1e-6, False)
    dx, dw = fused_triton.rms_norm_rows_bwd(h, w, rstd, dy, False)
    summed, dw_summed = fused_triton.rms_norm_rows_bwd(h, w, rstd, dy, False, d_h)
    assert torch.equal(summed, dx + d_h) and torch.equal(dw_summed, dw)


def test_rms_norm_kernels_with_float32_residual_under_autocast():
    """The trainer's one-process mode: a float32 residual stream, a bf16 branch, float32 norm and weights."""
    x, residual = randn(2, 33, 48, seed=54, dtype=torch.bfloat16), randn(2, 33, 48, seed=55, scale=2.0)
    w, W = 1 + randn(48, seed=56, scale=0.3), randn(40, 48, seed=57, scale=0.15)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = both_paths(lambda x, r, w, a: rms_norm_linear(x, w, 1e-6, [a], residual=r), [x, residual, w, W])
    assert got[0][0].dtype == torch.float32 and got[1][0].dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16, "autocast residual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_kernels_match_torch(dtype):
    gate, up = randn(2, 19, 72, seed=10, dtype=dtype, scale=2.0), randn(2, 19, 72, seed=11, dtype=dtype)
    W = randn(24, 72, seed=12, dtype=dtype, scale=0.1)
    got, want = both_paths(swiglu_linear, [gate, up, W])
    assert_close(got, want, dtype, "swiglu_linear")


@pytest.fixture
def joined(monkeypatch):
    """What `fused.joined_columns` found at each call, in order: the joined tensor's shape, or None."""
    from gsa.layers import fused

    found = []
    real = fused.joined_columns

    def record(grads):
        result = real(grads)
        found.append(None if result is None else tuple(result.shape))
        return result

    monkeypatch.setattr(fused, "joined_columns", record)
    return found


def assert_kernels_match_torch(block, params, x, residual, tol, **kwargs):
    """block(x, norm=..., residual=..., **kwargs) -> (out, ..., h) on the row kernels and on the torch path from the
    same inputs: the outputs, the inputs' and every parameter's gradients agree within tol."""
    cot = randn(*x.shape, seed=44, dtype=torch.float32)
    results = {}
    for kernels in (True, False):
        for p in params:
            p.grad = None
        xl, rl = x.clone().requires_grad_(), residual.clone().requires_grad_()
        with use_triton_kernels(kernels):
            outputs = block(xl, residual=rl, **kwargs)
            out, h = outputs[0], outputs[-1]
            ((out.float() * cot).sum() + (h.float() * cot).sum()).backward()
        results[kernels] = [out.detach(), h.detach(), xl.grad, rl.grad, *(p.grad for p in params)]
    for i, (a, b) in enumerate(zip(results[True], results[False])):
        assert a.dtype == b.dtype and rel_err(a, b) < tol, (i, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mlp_runs_its_projections_backward_as_one_product_each_way(dtype, joined):
    """The MLP with its pre-norm and a residual on the kernels: SwiGLU's backward writes dgate and dup as halves of
    one buffer, and the projections' backward runs one product for dy and one for both weight gradients; every
    output and gradient agrees with the torch path (separate products), and the joined form is what ran. 1100
    hidden columns: two of the kernel's column blocks. (float16, not bf16: the CPU's interpreter truncates float32
    to bf16 where the GPU rounds.)"""
    from gsa.layers import RMSNorm, SwiGLU

    tol = {torch.float32: 2e-6, torch.float16: 2e-3}[dtype]
    torch.manual_seed(3)
    mlp, norm = SwiGLU(48, 1100).to(DEVICE, dtype), RMSNorm(48).to(DEVICE, dtype)
    x, residual = randn(2, 7, 48, seed=40, dtype=dtype), randn(2, 7, 48, seed=41, dtype=dtype)
    assert_kernels_match_torch(mlp, [*mlp.parameters(), *norm.parameters()], x, residual, tol, norm=norm)
    assert joined == [(2, 7, 2200), None], joined  # the kernels' run joined them; the torch run's are separate


GSA_LAYER_CASES = {  # (layer arguments, attention mask, the joined q / k / v / f gradient's width or None)
    "plain": (dict(num_heads=2, num_slots=8), False, 3 * 32 + 2 * 8),
    "gqa": (dict(num_heads=4, num_kv_heads=2, num_slots=8), False, 32 + 2 * 16 + 2 * 8),
    "padding": (dict(num_heads=2, num_slots=8), True, 3 * 32 + 2 * 8),
    # the short convolutions' gradients arrive apart: the four products stay
    "short-conv": (dict(num_heads=2, num_slots=8, use_short_conv=True), False, None),
}


@pytest.mark.parametrize("dtype, case", [(torch.float32, case) for case in GSA_LAYER_CASES]
                         + [(torch.float16, "plain"), (torch.float16, "gqa")], ids=str)
def test_gsa_layer_features_are_one_function_with_one_gradient_matrix(dtype, case, joined):
    """The GSA layer (pre-norm, residual) on the row kernels: swish(q), swish(k), swish(v) and the slot gates come
    from one Function whose backward writes dq, dk, dv, df as column blocks of one gradient, which the projections'
    backward reads as one matrix; outputs and every gradient agree with the torch path (separate swishes and
    gates), and the joined form is what ran (with grouped-query heads, padding, and not with short convolutions).
    (float16, not bf16: the interpreter truncates to bf16.)"""
    from gsa.layers import GatedSlotAttention, RMSNorm

    arguments, padded, width = GSA_LAYER_CASES[case]
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    torch.manual_seed(4)
    layer = GatedSlotAttention(32, layer_idx=0, **arguments).to(DEVICE, dtype)
    norm = RMSNorm(32).to(DEVICE, dtype)
    x, residual = randn(2, 70, 32, seed=42, dtype=dtype), randn(2, 70, 32, seed=43, dtype=dtype)
    mask = None
    if padded:  # the first sequence left-padded by 9 tokens
        mask = torch.ones(2, 70, device=DEVICE, dtype=torch.long)
        mask[0, :9] = 0
    assert_kernels_match_torch(layer, [*layer.parameters(), *norm.parameters()], x, residual, tol, norm=norm,
                               attention_mask=mask)
    # the kernels' run: o_proj alone, then q / k / v / f; the torch run's: nothing joined
    assert joined == [None, None if width is None else (2, 70, width), None, None], joined


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_swish_features_match_swish_and_the_gates(dtype, joined):
    """`swish_features` alone, widths over one column block (1200 / 600 / 1080 / 48), grouped-query heads, a
    padding mask and a clamp: outputs and gradients equal swish and the slot gates formed one by one, and the four
    input gradients are the column blocks of one tensor."""
    from gsa.layers.fused import joined_columns, plain_slot_gates, swish_features

    tol = {torch.float32: 2e-6, torch.float16: 2e-3}[dtype]
    q, k = randn(2, 9, 6, 200, seed=50, dtype=dtype, scale=3.0), randn(2, 9, 3, 200, seed=51, dtype=dtype)
    v, f = randn(2, 9, 3, 360, seed=52, dtype=dtype), randn(2, 9, 3, 16, seed=53, dtype=dtype, scale=4.0)
    mask = torch.ones(2, 9, 1, 1, device=DEVICE)
    mask[1, :3] = 0
    args = (8.0, -0.5, mask, dtype)

    def composed(q, k, v, f):
        return (torch.nn.functional.silu(q), torch.nn.functional.silu(k), torch.nn.functional.silu(v),
                *plain_slot_gates(f, *args))

    with use_triton_kernels(True):
        got = grads_of(lambda q, k, v, f: swish_features(q, k, v, f, *args), [q, k, v, f])
        assert swish_features(q, k, v, f, *args) is None  # no gradient recorded: not this path
    want = grads_of(composed, [q, k, v, f])
    for i, (a, b) in enumerate(zip(got[0] + got[1], want[0] + want[1])):
        assert a.dtype == b.dtype and a.shape == b.shape and rel_err(a, b) < tol, (i, rel_err(a, b))
    whole = joined_columns([g.reshape(2, 9, -1) for g in got[1]])
    assert whole is not None and whole.shape == (2, 9, 1200 + 600 + 1080 + 48)


def test_kernel_outputs_directly():
    """The kernels alone: forward values equal the torch operations they stand for."""
    x = randn(5, 64, seed=13, scale=3.0)
    w = 1 + randn(64, seed=14, scale=0.2)
    y, rstd = fused_triton.rms_norm_rows_fwd(x, w, 1e-5, False)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert rel_err(y, want) < 1e-6 and rstd.shape == (5, 1)
    gate, up = randn(300, seed=15), randn(300, seed=16)  # numel off the block grid
    h = fused_triton.swiglu_rows_fwd(gate, up)
    assert rel_err(h, torch.nn.functional.silu(gate) * up) < 1e-6
    (y,) = fused_triton.swish_rows_fwd(gate)
    assert rel_err(y, torch.nn.functional.silu(gate)) < 1e-6


@pytest.mark.parametrize("joined", [False, True], ids=["apart", "joined"])
def test_swiglu_backward_kernel_directly(joined):
    """swiglu_rows_bwd on rows of 1100 (two column blocks), the input contiguous with a size-1 dimension's odd
    stride (its outputs must not copy that stride), apart or as halves of one buffer."""
    gate = randn(1, 4, 1100, seed=60, scale=2.0).transpose(0, 1)  # [4, 1, 1100], contiguous, stride 4400 on dim 1
    up, dh = randn(4, 1, 1100, seed=61), randn(4, 1, 1100, seed=62)
    assert gate.is_contiguous() and gate.stride(1) != 1100
    h, dg, du = fused_triton.swiglu_rows_bwd(gate, up, dh, joined=joined)
    s = torch.nn.functional.silu(gate)
    sig = torch.sigmoid(gate)
    assert rel_err(h, s * up) < 1e-6 and rel_err(du, dh * s) < 1e-6
    assert rel_err(dg, dh * up * sig * (1 + gate * (1 - sig))) < 1e-6
    if joined:
        assert dg.untyped_storage().data_ptr() == du.untyped_storage().data_ptr()


def test_slot_gates_backward_into_a_joined_gradient():
    """slot_gates_bwd(out=): df written as a column block of a wider matrix, equal to the plain df, the other
    columns untouched."""
    f = randn(2, 5, 3, 16, seed=63, scale=4.0)
    ds, dg = randn(2, 5, 3, 16, seed=64), randn(2, 5, 3, 16, seed=65)
    want = fused_triton.slot_gates_bwd(f, 8.0, None, None, 1, ds, dg)
    wide = torch.full((2, 5, 100), 7.0, device=DEVICE)
    fused_triton.slot_gates_bwd(f, 8.0, None, None, 1, ds, dg, out=wide[..., 30:78])
    assert torch.equal(wide[..., 30:78].reshape(f.shape), want)
    assert (wide[..., :30] == 7).all() and (wide[..., 78:] == 7).all()
    with pytest.raises(ValueError, match="rows of f's last two dimensions"):  # an f-shaped block of rows of 16
        fused_triton.slot_gates_bwd(f, 8.0, None, None, 1, ds, dg, out=wide[..., 30:78].view(2, 5, 3, 16))


def test_functions_call_the_kernels(monkeypatch):
    """use_triton_kernels(True) routes the Functions' row-wise work to the kernels (forward and backward)."""
    calls = []
    for name in ("rms_norm_rows_fwd", "rms_norm_rows_bwd", "swiglu_rows_fwd", "swiglu_rows_bwd", "slot_gates_fwd",
                 "slot_gates_bwd", "swish_rows_fwd", "swish_rows_bwd"):
        kernel = getattr(fused_triton, name)
        monkeypatch.setattr(fused_triton, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    x, w, W = randn(2, 5, 48, seed=20), 1 + randn(48, seed=21), randn(8, 48, seed=22)
    gate, up, D = randn(3, 40, seed=23), randn(3, 40, seed=24), randn(5, 40, seed=25)
    both_paths(lambda x, w, W: rms_norm_linear(x, w, 1e-6, [W], pre_silu=True), [x, w, W])
    both_paths(swiglu_linear, [gate, up, D])
    both_paths(lambda f: slot_gates(f, 8.0), [randn(2, 3, 16, seed=26)])
    silu = torch.nn.functional.silu
    both_paths(lambda q, k, v, f: swish_features(q, k, v, f, 8.0) or (silu(q), silu(k), silu(v), *slot_gates(f, 8.0)),
               [randn(2, 3, 2, 8, seed=27 + i) for i in range(4)])
    # forward, the rebuilt y in backward, backward; SwiGLU forward and backward; the gates' forward and backward;
    # the swishes and gates of the GSA layer forward and backward; the torch runs add nothing
    assert calls == ["rms_norm_rows_fwd", "rms_norm_rows_fwd", "rms_norm_rows_bwd", "swiglu_rows_fwd",
                     "swiglu_rows_bwd", "slot_gates_fwd", "slot_gates_bwd", "swish_rows_fwd", "slot_gates_fwd",
                     "swish_rows_bwd", "slot_gates_bwd"]


# ------------------------------------------------------------------------------------------------- slot gates

GATE_CASES = [(None, None), (-0.3, None), (None, "rows"), (-0.3, "rows")]  # (clamp_min, mask)
# both tails of logsigmoid, and the band where log(1 + exp(-f)) alone would lose exp(-f)'s low bits (f ~ 5 to 9)
GATE_TAILS = [-40.0, -12.0, 0.0, 4.6, 5.5, 6.9, 8.1, 9.2, 9.5, 12.0, 17.0, 40.0]


def gate_logits(dtype, shape=(2, 37, 3, 20), seed=30):
    f = randn(*shape, seed=seed, dtype=dtype, scale=4.0)
    f.view(-1)[: len(GATE_TAILS)] = torch.tensor(GATE_TAILS, dtype=dtype)
    return f


def gate_mask(kind, shape=(2, 37, 3, 20)):
    if kind is None:
        return None
    B, T = shape[:2]
    # the layer's padding mask: one value per token
    return (torch.arange(T, device=DEVICE) % 5 != 0).to(torch.int64)[None, :, None, None].expand(B, T, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=str)
def test_slot_gate_kernels_match_torch(case, dtype):
    clamp_min, kind = case
    f, mask = gate_logits(dtype), gate_mask(kind)
    got, want = both_paths(lambda f: slot_gates(f, 8.0, clamp_min, mask, dtype), [f])
    assert_close(got, want, dtype, "slot_gates")
    # element by element where g is near 0 (large f): a log1p that dropped exp(-f)'s low bits would show here (up
    # to 6e-4 relative); the GPU's exp and log differ from torch's by an ulp or two (~1e-6 relative in df)
    if dtype == torch.float32:
        n = len(GATE_TAILS)
        for a, b in ((got[0][1], want[0][1]), (got[1][0], want[1][0])):
            a, b = a.reshape(-1)[:n], b.reshape(-1)[:n]
            assert torch.all((a - b).abs() <= 5e-6 * b.abs() + 1e-30), (a, b)


def test_slot_gates_with_another_mask_shape_take_the_torch_path():
    """A mask that is not one value per token (here per head) is outside the kernels' row masks: torch serves it."""
    f = gate_logits(torch.float32)
    mask = (torch.arange(3, device=DEVICE) != 1).to(torch.float32)[None, None, :, None]
    assert fused_triton.gate_mask_rows(f, mask) is None
    assert fused_triton.gate_mask_rows(f, gate_mask("rows")) is not None
    got, want = both_paths(lambda f: slot_gates(f, 8.0, None, mask, torch.float32), [f])
    assert_close(got, want, torch.float32, "slot_gates, per-head mask")


@pytest.mark.parametrize("which", [0, 1])
def test_slot_gate_kernels_with_one_gradient(which):
    """Backward with only ds or only dg (the other output unused)."""
    f, mask = gate_logits(torch.float32), gate_mask("rows")
    results = []
    for triton in (True, False):
        x = f.clone().requires_grad_()
        with use_triton_kernels(triton):
            out = slot_gates(x, 8.0, -0.3, mask, torch.float32)[which]
            (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
        results.append(x.grad)
    assert rel_err(results[0], results[1]) < TOL[torch.float32]


def test_slot_gate_recipes_rebuild_the_forward_bitwise():
    """recompute_saved relies on the rebuilt s and g being the very tensors the forward made."""
    f, mask = gate_logits(torch.bfloat16), gate_mask("rows")
    with use_triton_kernels(True):
        s, g = slot_gates(f.clone().requires_grad_(), 8.0, None, mask, torch.bfloat16)
        recipes = slot_gate_recipes(f, s, g, 8.0, None, mask, torch.bfloat16)
    for out, fn, inp in recipes:
        assert torch.equal(fn(inp), out)
