"""Sweep the one-row linear kernel's launch settings (gsa/layers/fused_gemv.py, GEMV_LAUNCH) on one GPU.

The four groups of products a 1.3B layer runs per decoding step (d 2048, MLP 5632, bf16, one row): the GSA
input (RMSNorm, then q, k, v and f), its output (RMSNorm of swish(o), then o_proj), the MLP's input (RMSNorm, then
gate and up) and its down projection (of silu(gate) * up). For each: GPU time from a CUDA graph of the unfused
path (the Triton norm or SwiGLU kernel, then one cuBLAS product per weight) and of the fused kernel at every
setting, the bandwidth against the weight bytes, the largest error against the unfused path. Then the 1.3B
model's decoding (GraphDecoder) at batch 1, unfused, and fused with the settings in the code and with the
sweep's best for the wide launches (more than NARROW outputs) and the narrow ones. The JSON is rewritten after
every setting, so a run cut short keeps its rows.

    python benchmarks/tune_gemv.py --out benchmarks/results/tune_gemv_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton

from gsa.layers import fused_gemv
from gsa.layers.fused import _rms_norm_linear_values, _swiglu_linear_values
from tune_decode import add_model_arguments, model_decoding, record, save

D, INTER, SLOTS = 2048, 5632, 256  # the 1.3B preset: hidden, MLP width, 4 heads x 64 slots
GROUPS = {  # name: (prologue, input width, output widths)
    "gsa_in": ("norm", D, (D, D, D, SLOTS)),
    "gsa_out": ("silu_norm", D, (D,)),
    "mlp_in": ("norm", D, (INTER, INTER)),
    "mlp_out": ("swiglu", INTER, (D,)),
}


def group_inputs(name: str):
    prologue, width, outs = GROUPS[name]
    gen = torch.Generator(device="cuda").manual_seed(list(GROUPS).index(name))
    x = torch.randn(1, 1, width, device="cuda", generator=gen).bfloat16()
    up = torch.randn(1, 1, width, device="cuda", generator=gen).bfloat16() if prologue == "swiglu" else None
    weights = [(torch.randn(n, width, device="cuda", generator=gen) / width**0.5).bfloat16() for n in outs]
    norm_weight = (1 + 0.1 * torch.randn(width, device="cuda", generator=gen)).bfloat16()
    return prologue, x, up, weights, norm_weight


def unfused(prologue, x, up, weights, norm_weight):
    if prologue == "swiglu":
        return (_swiglu_linear_values(x, up, weights[0], True),)
    return _rms_norm_linear_values(x, norm_weight, 1e-6, prologue == "silu_norm", weights, [None] * len(weights),
                                   True)[0]


def fused(prologue, x, up, weights, norm_weight):
    return fused_gemv.row_linear(x, weights, prologue, norm_weight if prologue != "swiglu" else None, 1e-6, up)


def graph_us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def max_error(name: str) -> float:
    args = group_inputs(name)
    pairs = zip(fused(*args), unfused(*args))
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bn", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--bk", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--warps", nargs="+", type=int, default=[4])
    add_model_arguments(parser, "tune_gemv_h200.json")
    args = parser.parse_args()
    started = time.time()
    in_code = dict(fused_gemv.GEMV_LAUNCH)
    weight_bytes = {name: 2 * width * sum(outs) for name, (_, width, outs) in GROUPS.items()}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "in_code": in_code, "unfused_us": {}, "settings": [], "model": {}}
    for name in GROUPS:
        inputs = group_inputs(name)
        results["unfused_us"][name] = graph_us(lambda: unfused(*inputs))
    print("unfused", json.dumps(results["unfused_us"]), flush=True)
    for bn, bk, warps in itertools.product(args.bn, args.bk, args.warps):
        if bn * bk > 2048 * warps:  # float32 partial sums past ~64 registers a thread
            continue
        setting = dict(BN=bn, BK=bk, num_warps=warps)
        fused_gemv.GEMV_LAUNCH = {"wide": setting, "narrow": setting}

        def measure(entry):
            entry["max_err"] = max(max_error(name) for name in GROUPS)
            for name in GROUPS:
                inputs = group_inputs(name)
                entry[f"{name}_us"] = graph_us(lambda: fused(*inputs))
            entry["total_us"] = sum(entry[f"{name}_us"] for name in GROUPS)

        record(results, "settings", dict(setting), measure, args.out, started)
    fine = [e for e in results["settings"] if "error" not in e and e["max_err"] < 1e-2]
    runs = [("unfused", None), ("in_code", in_code)]
    if fine:  # the best setting for the wide launches (more than NARROW outputs) and for the narrow ones
        kinds = {kind: [name for name, (_, _, outs) in GROUPS.items() if (sum(outs) <= fused_gemv.NARROW) == narrow]
                 for kind, narrow in (("wide", False), ("narrow", True))}
        best = {kind: min(fine, key=lambda e: sum(e[f"{name}_us"] for name in names)) for kind, names in kinds.items()}
        runs.append(("best", {kind: {key: e[key] for key in ("BN", "BK", "num_warps")} for kind, e in best.items()}))
    for name, setting in runs:
        fused_gemv.ENABLED = setting is not None
        if setting is not None:
            fused_gemv.GEMV_LAUNCH = setting
        results["model"][name] = {"launch": setting, **model_decoding(args.prompt, args.new_tokens, batches=(1,))}
        save(results, args.out)
        print(name, json.dumps(results["model"][name]), f"[{time.time() - started:.0f}s]", flush=True)

    def cells(times: dict) -> str:
        return " ".join(f"{times[name]:>7.1f} {weight_bytes[name] / times[name] / 1e3:>5.0f}" for name in GROUPS)

    print(f"\nOne-row products of a 1.3B layer on {results['device']} (bf16, one row; us from a CUDA graph and GB/s "
          "of its weights)")
    print(f"{'BN':>3} {'BK':>5} {'warps':>5} " + " ".join(f"{name:>13}" for name in GROUPS) + f" {'total':>7} "
          f"{'max err':>8}")
    unfused_us = results["unfused_us"]
    print(f"{'unfused':<15} {cells(unfused_us)} {sum(unfused_us.values()):>7.1f}")
    for e in sorted(results["settings"], key=lambda e: e.get("total_us", float("inf"))):
        if "error" in e:
            print(f"{e['BN']:>3} {e['BK']:>5} {e['num_warps']:>5}  failed: {e['error'][:60]}")
            continue
        times = {name: e[f"{name}_us"] for name in GROUPS}
        print(f"{e['BN']:>3} {e['BK']:>5} {e['num_warps']:>5} {cells(times)} {e['total_us']:>7.1f} "
              f"{e['max_err']:>8.1e}")
    print("\n1.3B model, ms a token from CUDA graphs")
    for name, row in results["model"].items():
        launch = row["launch"]
        described = "cuBLAS" if launch is None else ", ".join(
            f"{kind} {s['BN']} / {s['BK']} / {s['num_warps']}" for kind, s in launch.items())
        print(f"  {name:<8} {described:<46} batch 1 {row['batch1_ms']:.3f}")


if __name__ == "__main__":
    main()
