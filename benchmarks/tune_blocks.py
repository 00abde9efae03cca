"""GPU: the operator's kernels with other key / value loop tiles (BK = BV = 16, 32, 128) and launch settings.

    python benchmarks/tune_blocks.py --out benchmarks/results/tune_blocks_h200.json

ptxas (sm_90, benchmarks/kernel_registers.py; the kernels as they were before session 24 formed dk and dv once)
says the narrower tiles cut the spills of the kernels that spill:
`_state_grads_bwd` at 4 warps 1828 -> 248 (32) / 44 (16) bytes a thread, `_intra_bwd` at 8 warps 824 -> 696 / 396,
`_output_fwd` at 4 warps 680 -> 536 / 284. Each kernel's tiles are set through its LAUNCH entry (a launch config
overrides the call's constants), one variant at a time, alternating with the current settings over `--rounds`;
GPU time from CUDA graphs, the kernels' own times from the profiler, and each variant's largest relative error
against the float32 PyTorch path (outputs, final states, every gradient).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from bench_ops import SHAPES, bench_graph, kernel_breakdown, operator_case, rel, run_and_grads
from gsa.ops.triton import chunk as kernels

VARIANTS = {  # name: {kernel: LAUNCH entry}
    "now": {},
    "state_grads 32 w4": {"_state_grads_bwd": {"num_warps": 4, "num_stages": 3, "BK": 32, "BV": 32}},
    "state_grads 16 w4": {"_state_grads_bwd": {"num_warps": 4, "num_stages": 3, "BK": 16, "BV": 16}},
    "state_grads 32 w8": {"_state_grads_bwd": {"num_warps": 8, "num_stages": 3, "BK": 32, "BV": 32}},
    "intra 32 w8": {"_intra_bwd": {"num_warps": 8, "num_stages": 3, "BK": 32, "BV": 32}},
    "output 32 w4": {"_output_fwd": {"num_warps": 4, "num_stages": 3, "BK": 32, "BV": 32}},
    "state_grads 64 w8": {"_state_grads_bwd": {"num_warps": 8, "num_stages": 3}},
    "state_grads 64 w4 s2": {"_state_grads_bwd": {"num_warps": 4, "num_stages": 2}},
    "intra 64 w8 s2": {"_intra_bwd": {"num_warps": 8, "num_stages": 2}},
    "intra 64 w4": {"_intra_bwd": {"num_warps": 4, "num_stages": 3}},
    # wider: half the loop's iterations, twice the bytes a load in flight
    "state_grads 128 w8": {"_state_grads_bwd": {"num_warps": 8, "num_stages": 3, "BK": 128, "BV": 128}},
    "state_grads 128 w8 s2": {"_state_grads_bwd": {"num_warps": 8, "num_stages": 2, "BK": 128, "BV": 128}},
    "intra 128 w8 s2": {"_intra_bwd": {"num_warps": 8, "num_stages": 2, "BK": 128, "BV": 128}},
    "output 128 w8": {"_output_fwd": {"num_warps": 8, "num_stages": 3, "BK": 128, "BV": 128}},
    "output 128 w8 s2": {"_output_fwd": {"num_warps": 8, "num_stages": 2, "BK": 128, "BV": 128}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["paper-2k", "paper-8k"], choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="tune_blocks.json")
    args = parser.parse_args()
    base = {name: dict(config) for name, config in kernels.LAUNCH.items()}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "rows": []}
    for shape in args.shapes:
        inputs, do, dstate, _, ours, truth = operator_case(shape)
        want = run_and_grads(truth, [t.detach().float().requires_grad_() for t in inputs], do.float(), dstate)
        for round_ in range(args.rounds):
            for variant in args.variants:
                kernels.LAUNCH.clear()
                kernels.LAUNCH.update({name: dict(config) for name, config in base.items()})
                kernels.LAUNCH.update(VARIANTS[variant])
                kernels._STEPPED.clear()  # a variant that does not fit steps down: recorded with its row
                kernels._FITTED.clear()
                try:
                    got = run_and_grads(ours, inputs, do, dstate)
                except (RuntimeError, triton.runtime.errors.OutOfResources) as error:  # the tiles do not fit
                    print(f"{shape:<9} {variant:<18} r{round_} failed: {str(error)[:150]}", flush=True)
                    continue
                err = max(rel(a, b) for a, b in zip(got, want))
                timing = bench_graph(ours, inputs, do)
                kernels_us = kernel_breakdown(ours, inputs, do)
                row = dict(shape=shape, variant=variant, round=round_, max_rel_err=err, **timing,
                           kernels_us=kernels_us, stepped_down={key[0]: fitted for key, fitted in
                                                                kernels._FITTED.items()})
                results["rows"].append(row)
                top = ", ".join(f"{k} {v:.0f}" for k, v in kernels_us.items() if k in
                                ("_intra_bwd", "_state_grads_bwd", "_output_fwd"))
                print(f"{shape:<9} {variant:<18} r{round_} f+b {timing.get('forward_backward_graph', 0):.4f} ms"
                      f"  err {err:.1e}  {top}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
