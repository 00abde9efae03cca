"""The few-row linear kernel (gsa.layers.fused_gemv) against the unfused path it replaces in decoding.

On CPU it runs in Triton's interpreter (tests/conftest.py) at small shapes; on a GPU natively, and at the 1.3B
layer's shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

fused_gemv = pytest.importorskip("gsa.layers.fused_gemv")
if not fused_gemv.KERNELS_AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

from gsa.layers.fused import plain_rms_norm, rms_norm_linear, swiglu_linear, use_triton_kernels  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def expected(x, weights, prologue, norm_weight, up, eps=1e-6):
    """The unfused composition in float64: the prologue rounded to x's dtype as the layers round it."""
    if prologue == "none":
        u = x
    elif prologue == "swiglu":
        u = (F.silu(x.double()).to(x.dtype).double() * up.double()).to(x.dtype)
    else:
        u = plain_rms_norm(x.double(), norm_weight.double(), eps, prologue == "silu_norm").to(x.dtype)
    return [F.linear(u.double(), w.double()) for w in weights]


# Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest), which shrinks every
# rounded value a little and fails a fair tolerance: float16 (rounded to nearest there too) stands in on the CPU.
HALF = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


PROLOGUES = ["none", "norm", "silu_norm", "swiglu"]
CASES = [(p, 1, dtype) for p in PROLOGUES for dtype in (torch.float32, *HALF)]


@pytest.mark.parametrize("prologue, rows, dtype", CASES, ids=str)
def test_products_match_the_unfused_composition(prologue, rows, dtype):
    """Every output of a launch with four weights of uneven widths (some not a multiple of the output block) and
    an input width that is not a multiple of the input block."""
    K = 300
    x = randn(rows, 1, K, seed=rows, dtype=dtype)
    up = randn(rows, 1, K, seed=7, dtype=dtype) if prologue == "swiglu" else None
    weights = [randn(n, K, seed=10 + n, dtype=dtype, scale=K**-0.5) for n in (37, 64, 5, 129)]
    norm_weight = randn(K, seed=2, dtype=dtype, scale=0.3) + 1 if prologue in ("norm", "silu_norm") else None
    with use_triton_kernels(True):
        assert fused_gemv.fits(x, weights)
        got = fused_gemv.rows_linear(x, weights, prologue, norm_weight, 1e-6, up)
    want = expected(x, weights, prologue, norm_weight, up)
    assert len(got) == len(weights)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == (rows, 1, weights[i].shape[0])
        assert rel_err(a.double(), b) < TOL[dtype], (prologue, i)


def test_block_settings_do_not_change_the_result(monkeypatch):
    """Each launch setting (output block, input block) covers every output once: a block loop that skipped or
    doubled a tile would show against another setting."""
    x = randn(1, 200, seed=3)
    weights = [randn(n, 200, seed=n, scale=0.07) for n in (33, 16)]
    results = []
    for BN, BK in [(16, 256), (4, 64), (2, 32)]:
        launch = dict(BN=BN, BK=BK, num_warps=4)
        monkeypatch.setattr(fused_gemv, "GEMV_LAUNCH", {"wide": launch, "narrow": launch})
        with use_triton_kernels(True):
            results.append(fused_gemv.rows_linear(x, weights, "norm", None, 1e-6))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert rel_err(a, b) < 1e-6


def test_narrow_launches_take_their_own_setting(monkeypatch):
    """Launches of at most NARROW output features take GEMV_LAUNCH["narrow"], wider ones "wide"."""
    seen = []
    real = fused_gemv._rows_linear_kernel
    monkeypatch.setattr(fused_gemv, "NARROW", 40)
    monkeypatch.setattr(fused_gemv, "GEMV_LAUNCH", {"wide": dict(BN=16, BK=64, num_warps=4),
                                                    "narrow": dict(BN=4, BK=32, num_warps=4)})

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid[0], kwargs["BN"], kwargs["BK"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fused_gemv, "_rows_linear_kernel", Recorder())
    x = randn(1, 1, 50)
    with use_triton_kernels(True):
        narrow = fused_gemv.rows_linear(x, [randn(24, 50), randn(16, 50)])
        wide = fused_gemv.rows_linear(x, [randn(24, 50), randn(17, 50)])
    assert seen == [(6 + 4, 4, 32), (2 + 2, 16, 64)]
    assert narrow[1].shape == (1, 1, 16) and wide[1].shape == (1, 1, 17)


def test_fits_only_what_it_computes_exactly():
    x = randn(1, 1, 64)
    w = randn(32, 64)
    with use_triton_kernels(True):
        assert fused_gemv.fits(x, [w])
        assert not fused_gemv.fits(randn(fused_gemv.MAX_ROWS + 1, 64), [w])  # a matrix product: cuBLAS
        assert not fused_gemv.fits(x, [w] * (fused_gemv.MAX_WEIGHTS + 1))
        assert not fused_gemv.fits(x, [w], [randn(32)])  # biases
        assert not fused_gemv.fits(x, [w.bfloat16()])  # the unfused path would refuse mixed dtypes
        assert not fused_gemv.fits(x, [randn(32, 63)])
        assert not fused_gemv.fits(x, [w.t().contiguous().t()])
        assert not fused_gemv.fits(x, [w.clone().requires_grad_()])  # training records autograd: the Functions
        with torch.no_grad():
            assert fused_gemv.fits(x, [w.clone().requires_grad_()])
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert not fused_gemv.fits(x, [w])
    with use_triton_kernels(False):
        assert not fused_gemv.fits(x, [w])


def test_bad_arguments_are_named():
    x = randn(1, 1, 16)
    with pytest.raises(ValueError, match="unknown prologue"):
        fused_gemv.rows_linear(x, [randn(8, 16)], "layernorm")
    with pytest.raises(ValueError, match="needs up"):
        fused_gemv.rows_linear(x, [randn(8, 16)], "swiglu")


def test_the_layers_decoding_path_takes_the_kernel(monkeypatch):
    """rms_norm_linear and swiglu_linear without autograd at one row go through rows_linear (the decoding
    path) and give the Triton row kernels' unfused results; with autograd they do not."""
    calls = []
    real = fused_gemv.rows_linear
    monkeypatch.setattr(fused_gemv, "rows_linear", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    x, gate, up = randn(1, 1, 96, seed=1), randn(1, 1, 160, seed=2), randn(1, 1, 160, seed=3)
    weights = [randn(n, 96, seed=n, scale=0.1) for n in (96, 40)]
    norm_weight, down = randn(96, seed=9) + 1, randn(96, 160, seed=4, scale=0.08)
    outputs = {}
    for kernel in (True, False):
        monkeypatch.setattr(fused_gemv, "MAX_ROWS", 1 if kernel else 0)
        with use_triton_kernels(True), torch.no_grad():
            outputs[kernel] = (*rms_norm_linear(x, norm_weight, 1e-6, weights, pre_silu=True),
                               swiglu_linear(gate, up, down))
    assert calls == ["silu_norm", "swiglu"]
    for a, b in zip(outputs[True], outputs[False]):
        assert rel_err(a, b) < 2e-6
    calls.clear()
    with use_triton_kernels(True):
        rms_norm_linear(x, norm_weight, 1e-6, [w.clone().requires_grad_() for w in weights])
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 1.3B layer's shapes natively in bf16")
def test_gpu_real_shapes_bf16():
    """The four groups of a 1.3B layer's decoding step (d 2048, MLP 5632), against the float64 composition."""
    groups = [("norm", 2048, (2048, 2048, 2048, 256)), ("silu_norm", 2048, (2048,)), ("norm", 2048, (5632, 5632)),
              ("swiglu", 5632, (2048,))]
    for i, (prologue, K, widths) in enumerate(groups):
        x = randn(1, 1, K, seed=i, dtype=torch.bfloat16)
        up = randn(1, 1, K, seed=50 + i, dtype=torch.bfloat16) if prologue == "swiglu" else None
        weights = [randn(n, K, seed=n + i, dtype=torch.bfloat16, scale=K**-0.5) for n in widths]
        norm_weight = randn(K, seed=90, dtype=torch.bfloat16, scale=0.2) + 1 if prologue != "swiglu" else None
        assert fused_gemv.fits(x, weights)
        got = fused_gemv.rows_linear(x, weights, prologue, norm_weight, 1e-6, up)
        for a, b in zip(got, expected(x, weights, prologue, norm_weight, up)):
            assert rel_err(a.double(), b) < 1e-2, (prologue, rel_err(a.double(), b))
