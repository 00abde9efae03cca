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

from gsa.layers.fused import (  # noqa: E402
    _rms_norm_linear_values,
    _swiglu_linear_values,
    rms_norm_linear,
    swiglu_linear,
    use_triton_kernels,
)
from tests.helpers import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest), which shrinks every
# rounded value a little: float16 (rounded to nearest there too) stands in for the half types on the CPU.
HALF = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
PROLOGUES = ["none", "norm", "silu_norm", "swiglu"]


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def unfused(x, weights, prologue, norm_weight, up, eps=1e-6):
    """What the layers computed before, in x's dtype: the Triton norm / SwiGLU row kernels, then one product per
    weight (the kernel rounds where they round, so a dropped or extra rounding shows)."""
    with use_triton_kernels(True):
        if prologue == "none":
            return [F.linear(x, w) for w in weights]
        if prologue == "swiglu":
            return [_swiglu_linear_values(x, up, w, True) for w in weights]
        return list(_rms_norm_linear_values(x, norm_weight, eps, prologue == "silu_norm", weights,
                                            [None] * len(weights), True)[0])


def group(prologue, K, widths, dtype, seed=0):
    """x, up (for swiglu), weights and a norm weight (for the norms) of one launch."""
    x = randn(1, 1, K, seed=seed, dtype=dtype)
    up = randn(1, 1, K, seed=seed + 1, dtype=dtype) if prologue == "swiglu" else None
    weights = [randn(n, K, seed=seed + 10 + n, dtype=dtype, scale=K**-0.5) for n in widths]
    norm_weight = randn(K, seed=seed + 2, dtype=dtype, scale=0.3) + 1 if "norm" in prologue else None
    return x, up, weights, norm_weight


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("prologue", PROLOGUES)
def test_products_match_the_unfused_path(prologue, dtype):
    """Every output of a launch with four weights of uneven widths (some not a multiple of the output block) and
    an input width that is not a multiple of the input block, against the unfused path in the same dtype: equal up
    to the order of the float32 sums (a rounding of the prologue dropped moves half-precision results by ~3e-4)."""
    x, up, weights, norm_weight = group(prologue, 300, (37, 64, 5, 129), dtype)
    with use_triton_kernels(True):
        assert fused_gemv.fits(x, weights, (), norm_weight, up)
        got = fused_gemv.row_linear(x, weights, prologue, norm_weight, 1e-6, up)
    want = unfused(x, weights, prologue, norm_weight, up)
    assert len(got) == len(weights)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == (1, 1, weights[i].shape[0])
        error = rel_err(a.double(), b.double())
        assert error < (1e-6 if dtype == torch.float32 else 1e-4), (prologue, i, error)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_norm_with_residual_adds_in_the_same_launch(dtype):
    """The residual addition inside the norm's launch: h = residual + x bitwise as torch adds it (rounded to x's
    dtype), every product as the unfused path's on that h."""
    x, _, weights, norm_weight = group("norm", 300, (37, 64, 5, 129), dtype, seed=5)
    residual = randn(1, 1, 300, seed=7, dtype=dtype, scale=3.0)
    with use_triton_kernels(True):
        assert fused_gemv.fits(x, weights, (), norm_weight, residual=residual)
        h, *got = fused_gemv.row_linear(x, weights, "norm", norm_weight, 1e-6, residual=residual)
    assert h.dtype == dtype and torch.equal(h, residual + x)
    for i, (a, b) in enumerate(zip(got, unfused(residual + x, weights, "norm", norm_weight, None))):
        assert rel_err(a.double(), b.double()) < (1e-6 if dtype == torch.float32 else 1e-4), (i, dtype)


def test_block_settings_do_not_change_the_result(monkeypatch):
    """Each launch setting (output block, input block) covers every output once: a block loop that skipped or
    doubled a tile would show against another setting."""
    x, up, weights, norm_weight = group("swiglu", 200, (33, 16), torch.float32, seed=3)
    results = []
    for BN, BK in [(16, 256), (4, 64), (2, 32)]:
        launch = dict(BN=BN, BK=BK, num_warps=4)
        monkeypatch.setattr(fused_gemv, "GEMV_LAUNCH", {"wide": launch, "narrow": launch})
        with use_triton_kernels(True):
            results.append(fused_gemv.row_linear(x, weights, "swiglu", up=up))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert rel_err(a, b) < 1e-6


def test_narrow_launches_take_their_own_setting(monkeypatch):
    """Launches of at most NARROW output features take GEMV_LAUNCH["narrow"], wider ones "wide"."""
    seen = []
    real = fused_gemv._row_linear_kernel
    monkeypatch.setattr(fused_gemv, "NARROW", 40)
    monkeypatch.setattr(fused_gemv, "GEMV_LAUNCH", {"wide": dict(BN=16, BK=64, num_warps=4),
                                                    "narrow": dict(BN=4, BK=32, num_warps=4)})

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid[0], kwargs["BN"], kwargs["BK"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fused_gemv, "_row_linear_kernel", Recorder())
    x = randn(1, 1, 50)
    with use_triton_kernels(True):
        narrow = fused_gemv.row_linear(x, [randn(24, 50), randn(16, 50)])
        wide = fused_gemv.row_linear(x, [randn(24, 50), randn(17, 50)])
    assert seen == [(6 + 4, 4, 32), (2 + 2, 16, 64)]
    assert narrow[1].shape == (1, 1, 16) and wide[1].shape == (1, 1, 17)


def test_fits_only_what_it_computes_exactly():
    x, w, nw = randn(1, 1, 64), randn(32, 64), randn(64)
    with use_triton_kernels(True):
        assert fused_gemv.fits(x, [w], (), nw, randn(1, 1, 64))
        refused = {
            "two rows (a matrix product: cuBLAS)": fused_gemv.fits(randn(2, 1, 64), [w]),
            "a 0-dim x": fused_gemv.fits(randn(()), [randn(32, 1)]),
            "a non-contiguous row": fused_gemv.fits(randn(1, 128)[:, ::2], [w]),
            "a float64 row": fused_gemv.fits(x.double(), [w.double()]),
            "too many weights": fused_gemv.fits(x, [w] * (fused_gemv.MAX_WEIGHTS + 1)),
            "a bias": fused_gemv.fits(x, [w], [randn(32)]),
            "weights of another dtype (the unfused path refuses)": fused_gemv.fits(x, [w.half()]),
            "weights of another width": fused_gemv.fits(x, [randn(32, 63)]),
            "non-contiguous weights": fused_gemv.fits(x, [w.t().contiguous().t()]),
            "weights on another device": fused_gemv.fits(x, [w.to("meta")]),
            "a non-contiguous norm weight": fused_gemv.fits(x, [w], (), randn(128)[::2]),
            "a norm weight of another shape": fused_gemv.fits(x, [w], (), randn(1)),
            "an up of another shape": fused_gemv.fits(x, [w], up=randn(1, 64, 1)),
            "an up of another dtype": fused_gemv.fits(x, [w], up=randn(1, 1, 64).half()),
            "a non-contiguous up": fused_gemv.fits(x, [w], up=randn(1, 1, 128)[..., ::2]),
            "a residual of another dtype (a float32 stream)": fused_gemv.fits(x.half(), [w.half()],
                                                                            residual=randn(1, 1, 64)),
            "a residual of another shape": fused_gemv.fits(x, [w], residual=randn(1, 64)),
            "autograd to record (training: the Functions)": fused_gemv.fits(x, [w.clone().requires_grad_()]),
        }
        assert not any(refused.values()), [why for why, taken in refused.items() if taken]
        with torch.no_grad():
            assert fused_gemv.fits(x, [w.clone().requires_grad_()])
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert not fused_gemv.fits(x, [w])
    with use_triton_kernels(False):
        assert not fused_gemv.fits(x, [w])


def test_bad_arguments_are_named():
    x, w = randn(1, 1, 16), randn(8, 16)
    with use_triton_kernels(True):
        with pytest.raises(ValueError, match="unknown prologue"):
            fused_gemv.row_linear(x, [w], "layernorm")
        with pytest.raises(ValueError, match="needs up"):
            fused_gemv.row_linear(x, [w], "swiglu")
        with pytest.raises(ValueError, match="residual goes with the 'norm' prologue"):
            fused_gemv.row_linear(x, [w], "silu_norm", randn(16), residual=randn(1, 1, 16))
        with pytest.raises(ValueError, match="one contiguous row"):
            fused_gemv.row_linear(randn(2, 1, 16), [w])
        with pytest.raises(ValueError, match="one contiguous row"):
            fused_gemv.row_linear(x, [randn(8, 15)])


def test_the_layers_decoding_path_takes_the_kernel(monkeypatch):
    """rms_norm_linear (with and without a residual addition) and swiglu_linear without autograd at one row go
    through row_linear (the decoding path) and give the unfused path's results in half precision; with autograd
    they do not take it."""
    calls = []
    real = fused_gemv.row_linear
    monkeypatch.setattr(fused_gemv, "row_linear", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    half = torch.float16
    x, gate, up = (randn(1, 1, width, seed=seed, dtype=half) for width, seed in ((96, 1), (160, 2), (160, 3)))
    weights = [randn(n, 96, seed=n, scale=0.1, dtype=half) for n in (96, 40)]
    norm_weight, down = randn(96, seed=9, dtype=half) + 1, randn(96, 160, seed=4, scale=0.08, dtype=half)
    outputs = {}
    for kernel in (True, False):
        monkeypatch.setattr(fused_gemv, "ENABLED", kernel)
        with use_triton_kernels(True), torch.no_grad():
            outputs[kernel] = (*rms_norm_linear(x, norm_weight, 1e-6, weights, pre_silu=True),
                               swiglu_linear(gate, up, down),
                               *rms_norm_linear(x, norm_weight, 1e-6, weights, residual=up[..., :96]))
    assert calls == ["silu_norm", "swiglu", "norm"]
    for a, b in zip(outputs[True], outputs[False]):
        assert a.dtype == half and rel_err(a.double(), b.double()) < 1e-4
    calls.clear()
    with use_triton_kernels(True):
        rms_norm_linear(x, norm_weight, 1e-6, [w.clone().requires_grad_() for w in weights])
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 1.3B layer's shapes natively in bf16")
def test_gpu_real_shapes_bf16():
    """The four groups of a 1.3B layer's decoding step (d 2048, MLP 5632), against the unfused path."""
    groups = [("norm", 2048, (2048, 2048, 2048, 256)), ("silu_norm", 2048, (2048,)), ("norm", 2048, (5632, 5632)),
              ("swiglu", 5632, (2048,))]
    for i, (prologue, K, widths) in enumerate(groups):
        x, up, weights, norm_weight = group(prologue, K, widths, torch.bfloat16, seed=100 * i)
        assert fused_gemv.fits(x, weights, (), norm_weight, up)
        got = fused_gemv.row_linear(x, weights, prologue, norm_weight, 1e-6, up)
        for a, b in zip(got, unfused(x, weights, prologue, norm_weight, up)):
            assert rel_err(a.double(), b.double()) < 1e-3, (prologue, rel_err(a.double(), b.double()))
