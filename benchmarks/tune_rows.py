"""GPU: launch settings of the row kernels around the operator (gsa.layers.fused_triton), in GPU time.

    python benchmarks/tune_rows.py                    # the 1.3B model's shapes: 16K rows of 2048, SwiGLU's of 5632
    python benchmarks/tune_rows.py --step-forms-only  # SwiGLU / gate backward as the training step runs them
    PYTHONPATH=.cache/ab-base/src:benchmarks python benchmarks/tune_rows.py --step-forms-only  # another checkout's

The RMSNorm kernels run ~150 times a 1.3B training step (forward, the rebuild in backward, backward): each variant of
`NORM_LAUNCH` (rows a program takes at a time, warps, backward programs per multiprocessor) is timed as CUDA-graph
replays and checked against the torch composition; SwiGLU and the slot gates are timed at their one setting for
reference, and in the training step's forms (joined gradients). Prints GB/s against the H200's ~4.8 TB/s; writes
JSON (--out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import triton.testing

from gsa.layers import fused_triton as ft

ROWS, WIDTH, HIDDEN = 16384, 2048, 5632


def gpu_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def with_launch(settings: dict):
    """Sets NORM_LAUNCH to the defaults updated by settings; returns the previous table."""
    previous = dict(ft.NORM_LAUNCH)
    ft.NORM_LAUNCH.update(settings)
    return previous


def check_norm(x, w, dy) -> float:
    """Largest relative error of y, dx, dw against the float32 torch composition."""
    xf = x.float().requires_grad_()
    wf = w.float().requires_grad_()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * wf
    ref.backward(dy.float())
    y, rstd = ft.rms_norm_rows_fwd(x, w, 1e-6, False)
    dx, dw = ft.rms_norm_rows_bwd(x, w, rstd, dy, False)
    pairs = [(y, ref), (dx, xf.grad), (dw, wf.grad)]
    return max(float((a.float() - b.detach()).norm() / b.detach().norm()) for a, b in pairs)


def time_step_forms(gate, up, f) -> dict:
    """The training step's forms of the SwiGLU and gate backward kernels: SwiGLU's gradients as halves of one
    buffer, the gates' df into a column block of a [rows, 6400] gradient (the features' joined layout) and dense.
    (Run it once on each of two checkouts' src folders, through PYTHONPATH, to compare their kernels.)"""
    wide = torch.empty(f.shape[0], 6400, device=f.device, dtype=f.dtype)  # f [tokens, heads, slots]: 256 a row
    forms = {"swiglu_bwd joined": (lambda: ft.swiglu_rows_bwd(gate, up, gate, joined=True), 6 * gate.numel() * 2),
             "slot_gates_bwd joined": (lambda: ft.slot_gates_bwd(f, 8.0, None, None, 1, f, f, out=wide[:, 6144:]),
                                       4 * f.numel() * 2),
             "slot_gates_bwd dense": (lambda: ft.slot_gates_bwd(f, 8.0, None, None, 1, f, f), 4 * f.numel() * 2)}
    out = {}
    for name, (fn, nbytes) in forms.items():
        us = gpu_us(fn)
        out[name] = {"us": us, "gb_s": nbytes / us / 1e3}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                      "tune_rows_h200.json"))
    parser.add_argument("--step-forms-only", action="store_true",
                        help="only the SwiGLU / gate backward kernels in the training step's (joined) forms")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.step_forms_only:
        gate, up = (torch.randn(ROWS, HIDDEN, device="cuda", generator=gen).bfloat16() for _ in range(2))
        f = torch.randn(ROWS, 4, 64, device="cuda", generator=gen).bfloat16()  # [tokens, heads, slots]
        forms = time_step_forms(gate, up, f)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "forms": forms}, indent=2))
        for name, r in forms.items():
            print(f"{name:>28} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s")
        return
    x = torch.randn(ROWS, WIDTH, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(ROWS, WIDTH, device="cuda", generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=gen)).bfloat16()
    y, rstd = ft.rms_norm_rows_fwd(x, w, 1e-6, False)
    norm_bytes = {"fwd": 2 * x.numel() * 2, "bwd": 3 * x.numel() * 2}
    default = dict(ft.NORM_LAUNCH)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "default": default, "fwd": {}, "bwd": {}}

    for rows, warps in itertools.product((1, 2, 4), (4, 8)):
        previous = with_launch({"fwd_rows": rows, "fwd_warps": warps})
        us = gpu_us(lambda: ft.rms_norm_rows_fwd(x, w, 1e-6, False))
        results["fwd"][f"rows{rows}-w{warps}"] = {"us": us, "gb_s": norm_bytes["fwd"] / us / 1e3,
                                                  "err": check_norm(x, w, dy)}
        ft.NORM_LAUNCH.update(previous)
    for rows, warps, per_sm, stages in itertools.product((1, 2, 4), (4, 8), (2, 4, 8), (1, 2, 3)):
        previous = with_launch({"bwd_rows": rows, "bwd_warps": warps, "bwd_programs_per_sm": per_sm,
                                "bwd_stages": stages})
        us = gpu_us(lambda: ft.rms_norm_rows_bwd(x, w, rstd, dy, False))
        results["bwd"][f"rows{rows}-w{warps}-p{per_sm}-s{stages}"] = {"us": us, "gb_s": norm_bytes["bwd"] / us / 1e3,
                                                            "err": check_norm(x, w, dy)}
        ft.NORM_LAUNCH.update(previous)
    results["default_us"] = {"fwd": gpu_us(lambda: ft.rms_norm_rows_fwd(x, w, 1e-6, False)),
                             "bwd": gpu_us(lambda: ft.rms_norm_rows_bwd(x, w, rstd, dy, False))}

    gate, up = (torch.randn(ROWS, HIDDEN, device="cuda", generator=gen).bfloat16() for _ in range(2))
    f = torch.randn(ROWS, 4, 64, device="cuda", generator=gen).bfloat16()  # [tokens, heads, slots]
    others = {
        "swiglu_fwd": (lambda: ft.swiglu_rows_fwd(gate, up), 3 * gate.numel() * 2),
        "swiglu_bwd": (lambda: ft.swiglu_rows_bwd(gate, up, gate), 6 * gate.numel() * 2),
        "slot_gates_fwd": (lambda: ft.slot_gates_fwd(f, 8.0, None, None, 1, torch.bfloat16), 3 * f.numel() * 2),
        "slot_gates_bwd": (lambda: ft.slot_gates_bwd(f, 8.0, None, None, 1, f, f), 4 * f.numel() * 2),
    }
    results["others"] = {}
    for name, (fn, nbytes) in others.items():
        us = gpu_us(fn)
        results["others"][name] = {"us": us, "gb_s": nbytes / us / 1e3}
    results["step_forms"] = time_step_forms(gate, up, f)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nrow kernels on {results['device']}, {ROWS} rows, GPU time (CUDA graph); default {default}")
    for kind in ("fwd", "bwd"):
        ranked = sorted(results[kind].items(), key=lambda kv: kv[1]["us"])
        print(f"rms_norm {kind}: default {results['default_us'][kind]:.1f} us; best five:")
        for name, r in ranked[:5]:
            print(f"  {name:>16} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s  err {r['err']:.1e}")
    for name, r in {**results["others"], **results["step_forms"]}.items():
        print(f"{name:>28} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s")


if __name__ == "__main__":
    main()
