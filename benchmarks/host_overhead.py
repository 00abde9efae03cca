"""The host's time per operator call on one GPU: what a user's eager loop pays when the GPU is not the bottleneck.

From Python the operator's time is the larger of its GPU time and the host's time to enqueue it (argument checks,
allocations, Triton's per-launch specialisation and the launches). This script measures the second alone: it
enqueues `--calls` forward (or forward+backward) calls behind a long GPU sleep, so that the queue never drains
while the host works, and divides the host's wall time by the calls; it also counts the kernels each call
launches (torch.profiler) and times one bare Triton launch of a trivial kernel for scale.

    python benchmarks/host_overhead.py --shapes paper-2k paper-16k --passes walk64 segment
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench_ops import SHAPES, make_inputs
from tune_ops import state_pass

from gsa.ops import gated_slot_attention


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_us(fn, calls: int) -> float:
    """Host microseconds per fn() with the GPU kept busy (a sleep enqueued first), the queue never draining."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles ahead of the calls
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    if elapsed > 0.5:  # the host waited on the GPU (a full queue, or the sleep ran out): not the host's time
        raise RuntimeError(f"enqueueing {calls} calls took {elapsed:.2f} s: the queue drained or filled; "
                           "use fewer --calls")
    return 1e6 * elapsed / calls


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(event.count for event in prof.key_averages() if event.device_type.name == "CUDA")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["paper-2k", "paper-16k"], choices=list(SHAPES))
    parser.add_argument("--passes", nargs="+", default=["walk64", "segment"])
    # CUDA queues ~1024 launches before the host blocks: 50 forward+backward calls of ~15 kernels stay below that
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/host_overhead.json")
    args = parser.parse_args()
    x = torch.zeros(16, device="cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "bare_launch_us": host_us(lambda: _noop[(1,)](x, 16, BLOCK=16), args.calls), "ops": {}}
    print(f"one bare Triton launch: {results['bare_launch_us']:.1f} us of host time")
    for shape in args.shapes:
        B, T, H, D, M = SHAPES[shape]
        inputs = make_inputs(B, T, H, D, M)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

        def forward():
            with torch.no_grad():
                gated_slot_attention(*inputs, D**-0.5, output_final_state=True, backend="triton",
                                     check_gate_values=False)

        def forward_backward():
            for t in inputs:
                t.grad = None
            gated_slot_attention(*inputs, D**-0.5, output_final_state=True, backend="triton",
                                 check_gate_values=False)[0].backward(do)

        for name in args.passes:
            state_pass(name)
            row = {"forward_host_us": host_us(forward, args.calls),
                   "forward_backward_host_us": host_us(forward_backward, args.calls),
                   "forward_kernels": kernels_per_call(forward),
                   "forward_backward_kernels": kernels_per_call(forward_backward)}
            results["ops"][f"{shape}/{name}"] = row
            print(f"{shape:<10} {name:<8} host fwd {row['forward_host_us']:7.1f} us ({row['forward_kernels']} kernels)"
                  f"  f+b {row['forward_backward_host_us']:7.1f} us ({row['forward_backward_kernels']} kernels)",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
