"""The fused autograd Functions (gsa.layers.fused) against the plain PyTorch compositions they replace.

Each Function: gradcheck in float64; forward bitwise equal to the plain composition in float32, bfloat16 and
under CPU autocast; gradients equal up to rounding (float32: 1e-6 relative; bfloat16: no further from the float64
gradient than the plain composition's, within a small margin); and it saves only what it should for backward.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from gsa.layers import fused
from gsa.layers.fused import (
    plain_rms_norm,
    plain_slot_gates,
    plain_swiglu_linear,
    recompute_saved,
    rms_norm,
    rms_norm_linear,
    slot_gates,
    swiglu_linear,
    use_fused,
    use_triton_kernels,
)
from tests.helpers import rel_err


def randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


def run(fn, tensors, seed=7):
    """Outputs of fn(*tensors) and the gradients of all floating inputs for fixed random cotangents."""
    xs = leaves(tensors)
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    needs = [x for x in xs if x is not None and x.requires_grad]
    grads = torch.autograd.grad(outs, needs, cotangents)
    return [o.detach() for o in outs], list(grads)


def saved_storages(fn, tensors):
    """The storages autograd saves running fn(*tensors): {data_ptr: (shape, dtype)}."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.dtype))
        return t

    xs = leaves(tensors)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*xs)
    return saved, xs


def fused_and_plain(fused_fn, plain_fn, tensors, autocast=False):
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        got = run(fused_fn, tensors)
        want = run(plain_fn, tensors)
    return got, want


def check_against_plain(fused_fn, plain_fn, tensors, autocast=False, margin=1.05, slack=2e-3):
    """Forward bitwise equal; gradients: float32 within 1e-6; low precision no worse than plain vs float64."""
    (got_out, got_grads), (want_out, want_grads) = fused_and_plain(fused_fn, plain_fn, tensors, autocast)
    for a, b in zip(got_out, want_out):
        assert a.dtype == b.dtype and torch.equal(a, b), "forward differs from the plain composition"
    low = autocast or any(t is not None and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
    if not low:
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            assert a.dtype == b.dtype and rel_err(a, b) < 1e-6, (i, rel_err(a, b))
        return
    exact = run(plain_fn, [t.double() if t is not None and t.is_floating_point() else t for t in tensors])[1]
    for i, (a, b, e) in enumerate(zip(got_grads, want_grads, exact)):
        assert a.dtype == b.dtype, i
        assert rel_err(a, e) <= margin * rel_err(b, e) + slack, (i, rel_err(a, e), rel_err(b, e))


# ---------------------------------------------------------------------------------------------------- RMSNorm

NORM_CASES = [  # (pre_silu, affine, outputs, bias)
    (False, True, 0, False),
    (False, False, 0, False),
    (True, True, 0, False),
    (False, True, 1, False),
    (False, True, 3, False),
    (True, True, 1, False),
    (False, False, 2, True),
]


def norm_inputs(pre_silu, affine, outputs, bias, dtype=torch.float64, D=24, shape=(2, 5)):
    x = randn(*shape, D, seed=1, dtype=dtype, scale=2.0)
    w = (1 + randn(D, seed=2, scale=0.3)).to(dtype) if affine else None
    weights = [randn(7 + 3 * i, D, seed=10 + i, dtype=dtype, scale=D**-0.5) for i in range(outputs)]
    biases = [randn(7 + 3 * i, seed=20 + i, dtype=dtype) if bias else None for i in range(outputs)]
    return [x, w, *weights, *biases]


def norm_fns(pre_silu, outputs, eps=1e-6):
    def fused_fn(x, w, *params):
        if outputs == 0:
            return rms_norm(x, w, eps, pre_silu)
        return rms_norm_linear(x, w, eps, params[:outputs], params[outputs:], pre_silu)

    def plain_fn(x, w, *params):
        y = plain_rms_norm(x, w, eps, pre_silu)
        if outputs == 0:
            return y
        return tuple(F.linear(y, W, b) for W, b in zip(params[:outputs], params[outputs:]))

    return fused_fn, plain_fn


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_rms_norm_linear_gradcheck(case):
    pre_silu, affine, outputs, bias = case
    fused_fn, _ = norm_fns(pre_silu, outputs)
    tensors = [t for t in leaves(norm_inputs(*case))]
    assert torch.autograd.gradcheck(fused_fn, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_rms_norm_linear_equals_plain(case, dtype):
    pre_silu, affine, outputs, bias = case
    check_against_plain(*norm_fns(pre_silu, outputs), norm_inputs(*case, dtype=dtype, D=64, shape=(3, 40)))


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_rms_norm_linear_equals_plain_under_autocast(case):
    """float32 weights and input, CPU autocast to bfloat16: the matrix products run in bf16 in both."""
    pre_silu, affine, outputs, bias = case
    tensors = norm_inputs(*case, dtype=torch.float32, D=64, shape=(3, 40))
    check_against_plain(*norm_fns(pre_silu, outputs), tensors, autocast=True)


def test_projection_gradients_are_summed_as_autograd_sums_them():
    """float32 input under autocast: autograd sums the bf16 products' gradients after casting them to float32, so
    the fused backward does too (summing in bf16 was 27 % less accurate); bf16 input without autocast: summed in
    bf16 inside the products, as autograd sums bf16 gradients."""
    fused_fn, plain_fn = norm_fns(False, 4)
    tensors = norm_inputs(False, True, 4, False, dtype=torch.float32, D=256, shape=(4, 64))
    (_, got), (_, want) = fused_and_plain(fused_fn, plain_fn, tensors, autocast=True)
    assert got[0].dtype == torch.float32 and rel_err(got[0], want[0]) < 1e-5, rel_err(got[0], want[0])
    tensors = [t.bfloat16() if t is not None else None for t in tensors]
    (_, got), (_, want) = fused_and_plain(fused_fn, plain_fn, tensors)
    assert got[0].dtype == torch.bfloat16 and rel_err(got[0], want[0]) < 2e-2, rel_err(got[0], want[0])


def test_rms_norm_linear_mixed_dtypes_under_autocast():
    """bf16 activations with float32 weights (the trainer: autocast outputs feeding float32 norms) and the output
    norm's bf16 input: the norm computes in float32 and returns the input dtype, as the composition does."""
    x = randn(3, 40, 64, seed=3, dtype=torch.bfloat16)
    w = 1 + randn(64, seed=4, dtype=torch.float32, scale=0.2)
    W = randn(32, 64, seed=5, dtype=torch.float32, scale=0.125)
    for pre_silu in (False, True):
        check_against_plain(*norm_fns(pre_silu, 1), [x, w, W, None], autocast=True)


def test_backward_inside_autocast_region_changes_nothing():
    """On CPU, backward runs on the calling thread: calling it inside an autocast region must not recast."""
    tensors = norm_inputs(True, True, 2, False, dtype=torch.float32, D=64, shape=(3, 40))
    fused_fn = norm_fns(True, 2)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run(fused_fn, tensors)
    xs = leaves(tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fused_fn(*xs)
    gen = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    outside = torch.autograd.grad(outs, [x for x in xs if x is not None], cot)
    for a, b in zip(inside[1], outside):
        assert torch.equal(a, b)


def residual_fns(outputs, keep_normed=False, eps=1e-6):
    """(fused, plain) of h = residual + x, then RMSNorm(h) * w and `outputs` linear maps; both return (h, ...)."""

    def fused_fn(x, residual, w, *params):
        if outputs == 0:
            return rms_norm(x, w, eps, residual=residual)
        return rms_norm_linear(x, w, eps, params[:outputs], params[outputs:], residual=residual,
                               keep_normed=keep_normed)

    def plain_fn(x, residual, w, *params):
        h = residual + x
        y = plain_rms_norm(h, w, eps)
        if outputs == 0:
            return h, y
        return (h, *(F.linear(y, W, b) for W, b in zip(params[:outputs], params[outputs:])))

    return fused_fn, plain_fn


def residual_inputs(outputs, dtype=torch.float64, residual_dtype=None, D=24, shape=(2, 5)):
    x, w, *params = norm_inputs(False, True, outputs, False, dtype=dtype, D=D, shape=shape)
    residual = randn(*shape, D, seed=3, dtype=residual_dtype or dtype, scale=3.0)
    return [x, residual, w, *params]


@pytest.mark.parametrize("keep_normed", [False, True])
@pytest.mark.parametrize("outputs", [0, 2])
def test_rms_norm_with_residual_gradcheck(outputs, keep_normed):
    fused_fn, _ = residual_fns(outputs, keep_normed)
    assert torch.autograd.gradcheck(fused_fn, leaves(residual_inputs(outputs)), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep_normed", [False, True])
@pytest.mark.parametrize("outputs", [0, 1, 3])
def test_rms_norm_with_residual_equals_plain(outputs, keep_normed, dtype):
    """The residual addition inside the norm: h and the outputs bitwise the composition's; the gradients of x and
    of the residual (one sum: the norm's and h's own) as autograd's up to rounding."""
    check_against_plain(*residual_fns(outputs, keep_normed), residual_inputs(outputs, dtype, D=64, shape=(3, 40)))


def test_rms_norm_with_float32_residual_and_bf16_branch_under_autocast():
    """The trainer's one-process mode: a float32 residual stream plus a branch that autocast left in bf16; h is
    float32 as the composition's sum is, and the branch's gradient comes back in bf16."""
    tensors = residual_inputs(2, torch.float32, D=64, shape=(3, 40))
    tensors[0] = tensors[0].bfloat16()
    check_against_plain(*residual_fns(2, keep_normed=True), tensors, autocast=True)
    (h, *_), (dx, d_residual, *_) = run(residual_fns(2)[0], tensors)
    assert h.dtype == torch.float32 and dx.dtype == torch.bfloat16 and d_residual.dtype == torch.float32


def test_rms_norm_keeping_its_output_saves_it_and_nothing_else():
    """keep_normed: the normalised rows are saved once (for the weight gradients) next to h and 1/rms; without
    it they are not saved; a residual adds nothing saved (h is saved either way, the branch is not)."""
    tensors = residual_inputs(2, torch.bfloat16, D=64, shape=(2, 8))
    for keep_normed, want in ((False, [((2, 8, 64), torch.bfloat16), ((2, 8, 1), torch.float32)]),
                              (True, [((2, 8, 64), torch.bfloat16)] * 2 + [((2, 8, 1), torch.float32)])):
        saved, xs = saved_storages(residual_fns(2, keep_normed)[0], tensors)
        params = {t.untyped_storage().data_ptr() for t in xs[2:] if t is not None}
        activations = {k: v for k, v in saved.items() if k not in params}
        assert xs[0].untyped_storage().data_ptr() not in activations  # the branch
        assert xs[1].untyped_storage().data_ptr() not in activations  # the residual: its sum h is kept instead
        assert sorted(activations.values()) == sorted(want), keep_normed


def test_rms_norm_residual_refuses_mismatched_shape_and_pre_silu():
    x, residual = randn(2, 5, 8), randn(2, 4, 8)
    with pytest.raises(ValueError, match="residual of x's shape"):
        rms_norm_linear(x, None, 1e-6, [randn(3, 8)], residual=residual)
    with pytest.raises(ValueError, match="residual addition and pre_silu"):
        rms_norm(x, None, 1e-6, pre_silu=True, residual=randn(2, 5, 8))


@pytest.mark.parametrize("outputs", [0, 2])
def test_rms_norm_saves_input_and_rstd_only(outputs):
    tensors = norm_inputs(False, True, outputs, False, dtype=torch.bfloat16, D=64, shape=(2, 8))
    saved, xs = saved_storages(norm_fns(False, outputs)[0], tensors)
    params = {t.untyped_storage().data_ptr() for t in xs[1:] if t is not None}
    activations = {k: v for k, v in saved.items() if k not in params}
    assert xs[0].untyped_storage().data_ptr() in activations
    assert sorted(activations.values()) == sorted([((2, 8, 64), torch.bfloat16), ((2, 8, 1), torch.float32)])


def test_rms_norm_module_and_switch():
    from gsa.layers import RMSNorm

    norm = RMSNorm(32, 1e-5).double()
    x = randn(4, 32, seed=9, dtype=torch.float32)
    norm = norm.float()
    with use_fused(False):
        assert not fused.fused_enabled()
        want = norm(x)
    assert fused.fused_enabled()
    assert torch.equal(norm(x), want)


# ----------------------------------------------------------------------------------------------------- SwiGLU


def swiglu_inputs(dtype=torch.float64, I=40, D=16, shape=(2, 9)):
    gate = randn(*shape, I, seed=30, dtype=dtype, scale=2.0)
    up = randn(*shape, I, seed=31, dtype=dtype)
    W = randn(D, I, seed=32, dtype=dtype, scale=I**-0.5)
    return [gate, up, W]


def test_swiglu_linear_gradcheck():
    assert torch.autograd.gradcheck(swiglu_linear, leaves(swiglu_inputs()), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_linear_equals_plain(dtype):
    check_against_plain(swiglu_linear, plain_swiglu_linear, swiglu_inputs(dtype, I=128, D=48, shape=(3, 30)))


def test_swiglu_linear_equals_plain_under_autocast():
    gate, up, W = swiglu_inputs(torch.float32, I=128, D=48, shape=(3, 30))
    # under autocast the projections give bf16 gate and up; the down projection's weight stays float32
    check_against_plain(swiglu_linear, plain_swiglu_linear, [gate.bfloat16(), up.bfloat16(), W], autocast=True)


def test_swiglu_saves_gate_and_up_only():
    tensors = swiglu_inputs(torch.bfloat16, I=64, D=16, shape=(2, 8))
    saved, xs = saved_storages(swiglu_linear, tensors)
    want = {t.untyped_storage().data_ptr() for t in xs}  # gate, up and the weight (a parameter)
    assert set(saved) == want


def test_swiglu_module_with_norm_equals_plain():
    from gsa.layers import RMSNorm, SwiGLU

    torch.manual_seed(0)
    mlp, norm = SwiGLU(32, 80).double(), RMSNorm(32).double()
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = randn(2, 11, 32, seed=40)
    fused_out = run(lambda x: mlp(x, norm=norm), [x])
    with use_fused(False):
        plain_out = run(lambda x: mlp(norm(x)), [x])
    assert rel_err(fused_out[0][0], plain_out[0][0]) < 1e-14
    assert rel_err(fused_out[1][0], plain_out[1][0]) < 1e-13


# ------------------------------------------------------------------------------------------------- slot gates

GATE_CASES = [(None, False), (-0.3, False), (None, True), (-0.3, True)]  # (clamp_min, mask)


def gate_inputs(masked, dtype=torch.float64, shape=(2, 13, 3, 8)):
    f = randn(*shape, seed=50, dtype=dtype, scale=3.0)
    mask = None
    if masked:
        mask = (torch.arange(shape[1]) % 4 != 0).to(torch.int64)[None, :, None, None].expand(shape[0], -1, 1, 1)
    return f, mask


def gate_fns(clamp_min, mask, dtype, tau=8.0):
    return (
        lambda f: slot_gates(f, tau, clamp_min, mask, dtype),
        lambda f: plain_slot_gates(f, tau, clamp_min, mask, dtype),
    )


@pytest.mark.parametrize("case", GATE_CASES, ids=str)
def test_slot_gates_gradcheck(case):
    clamp_min, masked = case
    f, mask = gate_inputs(masked)
    fn = gate_fns(clamp_min, mask, torch.float64)[0]
    assert torch.autograd.gradcheck(fn, leaves([f]), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=str)
def test_slot_gates_equal_plain(case, dtype):
    clamp_min, masked = case
    f, mask = gate_inputs(masked, dtype)
    got, want = fused_and_plain(*gate_fns(clamp_min, mask, dtype), [f])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)  # the same operations: bitwise equal, gradients too


def test_slot_gates_at_the_clamp_boundary():
    """Gradient passes where logsigmoid(f)/τ >= clamp_min, ties included, as torch.clamp's backward."""
    f = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    clamp_min = float(F.logsigmoid(f[0]) / 8)  # exactly the first value
    got, want = fused_and_plain(*gate_fns(clamp_min, None, torch.float64), [f])
    assert torch.equal(got[1][0], want[1][0]) and got[1][0][0] != 0


def test_slot_gates_save_f_only():
    f, _ = gate_inputs(False, torch.bfloat16)
    saved, xs = saved_storages(gate_fns(None, None, torch.bfloat16)[0], [f])
    assert list(saved) == [xs[0].untyped_storage().data_ptr()]


# ---------------------------------------------------------------------------------------- recomputed outputs


class _SavesInputs(torch.autograd.Function):
    """Stands for the operator: saves its inputs, y = a * b."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a


def _op_through_silu(x, z, recompute=True):
    a = F.silu(x)
    b = z * 2
    context = recompute_saved([(a, F.silu, x)]) if recompute else contextlib.nullcontext()
    with context:
        return _SavesInputs.apply(a.view(-1, a.shape[-1]), b)


def test_recompute_saved_keeps_the_input_not_the_output():
    x, z = randn(6, 5, seed=60), randn(6, 5, seed=61)
    for recompute in (False, True):
        saved, (xl, zl) = saved_storages(lambda x, z: _op_through_silu(x, z, recompute), [x, z])
        # silu saves x; the stand-in saves silu(x) (unless recomputed) and b
        assert len(saved) == (2 if recompute else 3)
        assert xl.untyped_storage().data_ptr() in saved
    got = run(lambda x, z: _op_through_silu(x, z, True), [x, z])
    want = run(lambda x, z: _op_through_silu(x, z, False), [x, z])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(lambda x, z: _op_through_silu(x, z, True), leaves([x, z]))


def test_recompute_saved_does_not_keep_the_output_alive():
    """Once the caller drops the recomputable output, nothing holds it until backward (autograd keeps the pack hook
    with each packed tensor: a hook that held the recipes kept every layer's swish outputs, 4.5 GiB at 1.3B)."""
    x, z = leaves([randn(6, 5, seed=62), randn(6, 5, seed=63)])
    a = F.silu(x)
    with recompute_saved([(a, F.silu, x)]):
        y = _SavesInputs.apply(a, z * 2)
    alive = weakref.ref(a)
    del a
    gc.collect()
    assert alive() is None
    y.sum().backward()
    torch.testing.assert_close(z.grad, 2 * F.silu(x.detach()))


def test_recompute_saved_goes_through_outer_hooks():
    """Offloading / checkpointing hooks in force still see every saved tensor (the recipe's input included)."""
    x, z = randn(6, 5, seed=62), randn(6, 5, seed=63)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.untyped_storage().data_ptr())
        return ("outer", t.clone())  # a copy, as offloading makes

    def unpack(p):
        unpacked.append(1)
        return p[1]

    xs = leaves([x, z])
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = _op_through_silu(*xs)
    assert xs[0].untyped_storage().data_ptr() in packed and len(packed) == 3  # silu: x; stand-in: x again, b
    cotangent = randn(6, 5, seed=64)
    (y * cotangent).sum().backward()
    assert len(unpacked) == 3
    plain = leaves([x, z])
    (_op_through_silu(*plain, recompute=False) * cotangent).sum().backward()
    assert torch.equal(xs[0].grad, plain[0].grad) and torch.equal(xs[1].grad, plain[1].grad)


def test_recompute_saved_under_checkpointing():
    x, z = randn(6, 5, seed=65), randn(6, 5, seed=66)
    from torch.utils.checkpoint import checkpoint

    cotangent = randn(6, 5, seed=69)
    plain = leaves([x, z])
    (_op_through_silu(*plain, recompute=False) * cotangent).sum().backward()
    for reentrant in (False, True):
        xs = leaves([x, z])
        (checkpoint(_op_through_silu, *xs, use_reentrant=reentrant) * cotangent).sum().backward()
        for a, b in zip(xs, plain):
            assert torch.equal(a.grad, b.grad), reentrant


def test_recompute_saved_is_off_with_plain_layers():
    x, z = randn(6, 5, seed=67), randn(6, 5, seed=68)
    with use_fused(False):
        saved, _ = saved_storages(_op_through_silu, [x, z])
    assert len(saved) == 3


def test_recompute_saved_works_with_the_hook_stack_query_without_argument(monkeypatch):
    """Some torch versions' `_top_saved_tensors_default_hooks` takes no argument: recomputation must still happen."""
    real = torch._C._autograd._top_saved_tensors_default_hooks
    monkeypatch.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda: real(False))
    x, z = randn(5, 7, seed=30), randn(5, 7, seed=31)
    saved, _ = saved_storages(lambda x, z: _op_through_silu(x, z, True), [x, z])
    assert len(saved) == 2


@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_inference_path_equals_the_functions_forward(triton, autocast):
    """Without autograd recording (generate()), the Functions are skipped: the values must be the same bits."""
    if triton and not pytest.importorskip("gsa.layers.fused_triton").KERNELS_AVAILABLE:
        pytest.skip("triton is not installed")
    # the kernels natively on a GPU, in the interpreter on CPU tensors otherwise
    device = "cuda" if triton and torch.cuda.is_available() else "cpu"
    x, w = randn(2, 9, 24, seed=70, dtype=torch.float32), randn(24, seed=71, dtype=torch.float32)
    linears = [randn(8, 24, seed=72 + i, dtype=torch.float32) for i in range(2)]
    gate, up, down = (randn(*shape, seed=80 + i, dtype=torch.float32) for i, shape in
                      enumerate([(2, 9, 16), (2, 9, 16), (24, 16)]))
    context = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def outputs(record: bool):
        args = [t.to(device, copy=True).requires_grad_(record) for t in (x, w, *linears, gate, up, down)]
        xs, ws, l0, l1, gs, us, ds = args
        with use_triton_kernels(triton), context, torch.set_grad_enabled(record):
            return [*rms_norm_linear(xs, ws, 1e-6, [l0, l1], pre_silu=True), rms_norm(xs, ws, 1e-6),
                    swiglu_linear(gs, us, ds)]

    recorded, inference = outputs(True), outputs(False)
    assert all(r.grad_fn is not None for r in recorded) and all(i.grad_fn is None for i in inference)
    for a, b in zip(recorded, inference):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b)


def test_recompute_saved_ignores_outputs_that_do_not_fill_their_storage():
    """A recipe whose output is part of a larger buffer is not used: other tensors on that storage are kept as they
    are, and the gradients are those of plain autograd."""
    a, w = randn(10, seed=90), randn(5, seed=91)

    def fn(a, w, recipes_of):
        buf = F.silu(a)
        with recompute_saved(recipes_of(buf, a)):
            return ((buf[5:] * w).sum() + (buf[:5] * w).sum()).reshape(1)

    want = run(lambda a, w: fn(a, w, lambda buf, a: []), [a, w])
    got = run(lambda a, w: fn(a, w, lambda buf, a: [(buf[:5], F.silu, a[:5])]), [a, w])
    for x, y in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(x, y)


def test_swiglu_triton_path_is_not_taken_for_broadcast_inputs():
    if not pytest.importorskip("gsa.layers.fused_triton").KERNELS_AVAILABLE:
        pytest.skip("triton is not installed")
    gate, up, down = randn(2, 5, 16, seed=92, dtype=torch.float32), randn(1, 5, 16, seed=93, dtype=torch.float32), \
        randn(8, 16, seed=94, dtype=torch.float32)
    want = plain_swiglu_linear(gate, up, down)
    for record in (False, True):
        with use_triton_kernels(True), torch.set_grad_enabled(record):
            got = swiglu_linear(gate.clone().requires_grad_(record), up, down)
        assert rel_err(got.detach(), want) < 1e-6


def test_layers_call_modules_that_have_hooks_or_wrap_linear():
    """A forward hook on a projection, or a Linear subclass (as a LoRA wrapper is), is honoured: the layers then
    call the modules (the plain composition) instead of reading their weights."""
    from gsa.layers import GatedSlotAttention, RMSNorm
    from gsa.layers.mlp import SwiGLU

    class ScaledLinear(torch.nn.Linear):  # stands for an adapter: its forward is not F.linear(x, weight)
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    layer, mlp, norm = GatedSlotAttention(16, num_heads=2, num_slots=4), SwiGLU(16, 32), RMSNorm(16)
    x = torch.randn(2, 7, 16)

    def outputs():
        return layer(x, norm=norm)[0], mlp(x, norm=norm)

    with use_fused(False):
        plain = outputs()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(), plain))
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
               for m in (layer.q_proj, mlp.down_proj, norm)]
    outputs()
    assert {"Linear", "RMSNorm"} <= set(seen) and len(seen) >= 4, seen
    for handle in handles:
        handle.remove()
    for owner, name in ((layer, "q_proj"), (mlp, "down_proj"), (mlp, "up_proj")):
        old = getattr(owner, name)
        new = ScaledLinear(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        setattr(owner, name, new)
    # the same computations with every module called explicitly
    want_layer = layer(norm(x))[0]
    h = norm(x)
    want_mlp = mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    got_layer, got_mlp = outputs()
    assert torch.allclose(got_layer, want_layer, atol=1e-6) and torch.allclose(got_mlp, want_mlp, atol=1e-6)
    # with a residual addition too (the pre-norm block's): the hooked or wrapped modules are called on the sum
    residual = torch.randn(2, 7, 16)
    hooked = norm.register_forward_hook(lambda m, i, o: seen.append("norm"))
    seen.clear()
    got_layer, _, h_layer = layer(x, norm=norm, residual=residual)
    got_mlp, h_mlp = mlp(x, norm=norm, residual=residual)
    hooked.remove()
    assert seen == ["norm", "norm"] and torch.equal(h_layer, residual + x) and torch.equal(h_mlp, residual + x)
    h = norm(residual + x)
    want_mlp = mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    assert torch.allclose(got_layer, layer(h)[0], atol=1e-6) and torch.allclose(got_mlp, want_mlp, atol=1e-6)
    with pytest.raises(ValueError, match="pass norm with it"):
        layer(x, residual=residual)
    with pytest.raises(ValueError, match="pass norm with it"):
        mlp(x, residual=residual)
