"""Time the GSA operator's kernel variants on one GPU and print what to choose.

1. The state passes (gsa/ops/triton/chunk.py): "split", "walk" (whole sequences) at 64 and 32 state rows a
   program, "segment" (segments of the sequences walked, then joined) and "auto", at every shape of bench_ops.py:
   forward, forward+backward, and the largest relative error against the float32 PyTorch path (outputs, final
   states, all gradients).
2. num_warps / num_stages of each kernel at one shape, one kernel at a time (the others at their best so far):
   the measured table that `LAUNCH` in chunk.py is set from.

    python benchmarks/tune_ops.py --out benchmarks/results/tune_ops_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from bench_ops import SHAPES, bench, bench_graph, kernel_breakdown, make_inputs, rel, run_and_grads
from gsa.ops import gated_slot_attention
from gsa.ops.triton import chunk as kernels

CONFIGS = [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)]  # (num_warps, num_stages)
SWEPT = ("_gate_factors", "_walk_states", "_walk_dstates", "_output_fwd", "_intra_bwd", "_state_grads_bwd")
GRAD_NAMES = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"]


def state_pass(name: str):
    """Set the operator's state pass: 'split', 'walk64', 'walk32', 'segment' or 'auto'; '<pass>+factors' keeps the
    forward's gate factors for the backward (KEEP_GATE_FACTORS), '<pass>+formed' forms them again there, a bare pass
    takes the code's default (kept)."""
    name, _, extra = name.partition("+")
    if extra not in ("", "factors", "formed"):
        raise SystemExit(f"unknown pass suffix +{extra} in {name}+{extra}: expected +factors or +formed")
    kernels.KEEP_GATE_FACTORS = {"factors": True, "formed": False}.get(extra, ORIGINAL_KEEP_GATE_FACTORS)
    kernels.state_plan = ORIGINAL_STATE_PLAN
    if name.startswith("walk"):
        rows = int(name[4:])
        kernels.STATE_PASS = "walk"
        kernels.state_plan = lambda layout, H, K, V: (min(rows, kernels.next_power_of_2(max(K, V))), None)
    else:
        kernels.STATE_PASS = name


ORIGINAL_STATE_PLAN = kernels.state_plan
ORIGINAL_KEEP_GATE_FACTORS = kernels.KEEP_GATE_FACTORS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--passes", nargs="+", default=["split", "walk64", "segment", "auto"])
    parser.add_argument("--tune-shape", default="paper-2k", choices=list(SHAPES))
    parser.add_argument("--tune-pass", default="walk64")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--graph", action="store_true",
                        help="also time replayed from a CUDA graph, and sweep launch settings by that time")
    parser.add_argument("--out", default="benchmarks/results/tune_ops.json")
    args = parser.parse_args()
    started = time.time()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "passes": {}, "launch": {}}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    def case(name):
        B, T, H, D, M = SHAPES[name]
        inputs = make_inputs(B, T, H, D, M)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        dstate = (torch.randn(B, H, D, M, device="cuda"), torch.randn(B, H, M, D, device="cuda"))

        def ours(q, k, v, s, g):
            return gated_slot_attention(q, k, v, s, g, D**-0.5, output_final_state=True, backend="triton",
                                        check_gate_values=False)

        return inputs, do, dstate, ours

    for shape in args.shapes:
        inputs, do, dstate, ours = case(shape)
        truth = run_and_grads(
            lambda *t: gated_slot_attention(*t, SHAPES[shape][3] ** -0.5, output_final_state=True, backend="torch"),
            [t.detach().float().requires_grad_() for t in inputs], do.float(), dstate)
        for position, name in enumerate(args.passes):
            state_pass(name)
            # a pass given more than once (alternated to see the run's noise) keeps every row: "auto", "auto #2"
            repeat = args.passes[:position + 1].count(name)
            label = name if repeat == 1 else f"{name} #{repeat}"
            got = run_and_grads(ours, inputs, do, dstate)
            errors = {n: rel(a, b) for n, a, b in zip(GRAD_NAMES, got, truth)}
            fwd, total, peak = bench(ours, inputs, do)
            graph = bench_graph(ours, inputs, do) if args.graph else {}
            results["passes"].setdefault(shape, {})[label] = {"forward_ms": fwd, "forward_backward_ms": total,
                                                             "peak_gib": peak, "max_err": max(errors.values()),
                                                             "errors": errors, **graph}
            in_graph = "".join(f"  {key} {ms:.3f}" for key, ms in graph.items())
            print(f"{shape:<10} {label:<7} fwd {fwd:.3f} ms  f+b {total:.3f} ms{in_graph}  peak {peak:.2f} GiB  "
                  f"max err {max(errors.values()):.1e}  ({time.time() - started:.0f} s)", flush=True)
            del got
        del truth
        save()

    if not args.skip_tune:
        state_pass(args.tune_pass)
        inputs, do, _, ours = case(args.tune_shape)
        for kernel in SWEPT:
            timings = {}
            for warps, stages in CONFIGS:
                kernels.LAUNCH[kernel] = {"num_warps": warps, "num_stages": stages}
                kernels._STEPPED.discard(kernel)
                try:
                    if args.graph:
                        timings[f"{warps}w{stages}s"] = bench_graph(ours, inputs, do).get("forward_backward_graph")
                    else:
                        timings[f"{warps}w{stages}s"] = bench(ours, inputs, do)[1]
                except Exception as error:  # a config that does not fit (registers) or fails otherwise
                    timings[f"{warps}w{stages}s"] = None
                    print(f"  {kernel} {warps}w{stages}s failed: {type(error).__name__}: {str(error)[:120]}")
                if kernel in kernels._STEPPED:  # it ran, but stepped down from a config the GPU cannot hold
                    timings[f"{warps}w{stages}s"] = None
                    print(f"  {kernel} {warps}w{stages}s does not fit this GPU's shared memory")
            best = min((t, c) for c, t in timings.items() if t is not None)[1]
            warps, stages = (int(x) for x in best.rstrip("s").split("w"))
            kernels.LAUNCH[kernel] = {"num_warps": warps, "num_stages": stages}
            results["launch"][kernel] = {"fwd_bwd_ms": timings, "best": best}
            print(f"{kernel:<18} " + "  ".join(f"{c} {t:.3f}" if t else f"{c} -" for c, t in timings.items())
                  + f"  -> {best}  ({time.time() - started:.0f} s)", flush=True)
            save()
        fwd, total, peak = bench(ours, inputs, do)
        results["tuned"] = {"shape": args.tune_shape, "pass": args.tune_pass, "forward_ms": fwd,
                            "forward_backward_ms": total, "peak_gib": peak,
                            "kernels_us": kernel_breakdown(ours, inputs, do)}
        print(f"tuned {args.tune_shape} {args.tune_pass}: fwd {fwd:.3f} ms  f+b {total:.3f} ms")
        for kernel, us in list(results["tuned"]["kernels_us"].items())[:12]:
            print(f"  {us:9.1f} us  {kernel[:80]}")
        save()

    keys = ["forward_ms", "forward_backward_ms"] + (["forward_graph", "forward_backward_graph"] if args.graph else [])
    labels = {"forward_ms": "fwd", "forward_backward_ms": "f+b", "forward_graph": "fwd graph",
              "forward_backward_graph": "f+b graph"}
    print(f"\n{'shape':<10} {'pass':<16} " + " ".join(f"{labels[k]:>10}" for k in keys) + f" {'peak GiB':>9}  (ms)")
    for shape, row in results["passes"].items():
        for label, entry in row.items():
            print(f"{shape:<10} {label:<16} " + " ".join(f"{entry.get(k, float('nan')):>10.3f}" for k in keys)
                  + f" {entry['peak_gib']:>9.3f}")


if __name__ == "__main__":
    main()
