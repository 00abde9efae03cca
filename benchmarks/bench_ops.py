"""GPU: the GSA operator against FLA's chunk_gsa / chunk_gla and SDPA flash attention, same run, same inputs.

    python benchmarks/bench_ops.py                  # all shapes, FLA when importable
    python benchmarks/bench_ops.py --shapes paper-2k --skip-fla

Checks correctness first (relative errors of output, final state and every gradient against the float32 PyTorch
path), then times forward and forward+backward (triton.testing.do_bench, median; with --graph also replayed from a
CUDA graph, without the host's launch gaps), peak extra memory, and the decoding step at batch 1 and 64. Prints
one table (two with --graph); writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from gsa.ops import gated_slot_attention, gated_slot_attention_step

SHAPES = {  # name: (B, T, H, K=V, M) with B*T = 16K tokens
    "paper-2k": (8, 2048, 4, 512, 64),
    "paper-8k": (2, 8192, 4, 512, 64),
    "paper-16k": (1, 16384, 4, 512, 64),
    "h16-d128": (8, 2048, 16, 128, 64),
    "h32-d64": (8, 2048, 32, 64, 64),
}


def make_inputs(B, T, H, D, M, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    g = F.logsigmoid(randn(B, T, H, M)) / 8
    s = 1 - g.exp()
    return [t.to(dtype).requires_grad_() for t in (q, k, v, s, g)]


def flops_forward(B, T, H, D, M, C=64):
    """Chunk-form FLOPs: states, inter-chunk reads, and full (unmasked) intra-chunk products."""
    per_token = 2 * (2 * D) * M + 2 * D * M + 2 * M * D + 2 * C * (D + 2 * M + D)
    return B * T * H * per_token


def bytes_forward(B, T, H, D, M, itemsize=2):
    return B * T * H * (3 * D + 2 * M + D) * itemsize


def operator_case(name: str):
    """One SHAPES entry's bf16 inputs, output and final-state gradients, scale, and the two callables timed and
    compared: ours (the Triton kernels) and the float32 PyTorch path (the truth errors are measured against)."""
    B, T, H, D, M = SHAPES[name]
    inputs = make_inputs(B, T, H, D, M)
    scale = D**-0.5
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    dstate = (torch.randn(B, H, D, M, device="cuda"), torch.randn(B, H, M, D, device="cuda"))

    def ours(q, k, v, s, g):
        return gated_slot_attention(q, k, v, s, g, scale, output_final_state=True, backend="triton",
                                    check_gate_values=False)

    def truth(q, k, v, s, g):
        return gated_slot_attention(q, k, v, s, g, scale, output_final_state=True, backend="torch")

    return inputs, do, dstate, scale, ours, truth


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_and_grads(fn, inputs, do, dstate):
    for t in inputs:
        t.grad = None
    o, state = fn(*inputs)
    loss = (o.float() * do).sum() + sum((x.float() * d).sum() for x, d in zip(state, dstate))
    loss.backward()
    return [o.detach(), *(x.detach() for x in state), *(t.grad.detach() for t in inputs)]


def bench(fn, inputs, do):
    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for t in inputs:
            t.grad = None
        o = fn(*inputs)[0]
        o.backward(do)

    fwd = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
    total = triton.testing.do_bench(forward_backward, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return fwd, total, peak


def bench_graph(fn, inputs, do) -> dict[str, float]:
    """Forward and forward+backward replayed from a CUDA graph (triton.testing.do_bench_cudagraph): GPU time without
    the host's launch gaps, which move plain timings by 25-35 % between machines. Empty when capture fails."""
    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        fn(*inputs)[0].backward(do)

    try:
        return {"forward_graph": triton.testing.do_bench_cudagraph(forward, rep=100, return_mode="median"),
                "forward_backward_graph": triton.testing.do_bench_cudagraph(
                    forward_backward, rep=100, grad_to_none=inputs, return_mode="median")}
    except RuntimeError as error:  # an operator that syncs with the host cannot be captured
        print(f"  CUDA graph capture failed: {str(error)[:200]}")
        return {}


def decode_timings(who: str, step, loop_steps: int = 200) -> dict[str, float]:
    """One decoding step three ways, in us: `do_bench` (L2 flushed before each call, which hides up to ~80 us of
    host time behind the flush), back to back in a plain loop (what an eager decode loop pays a token, host and
    GPU pipelined), and replayed from a CUDA graph (the GPU's time; absent when capture fails)."""
    timings = {f"{who}_us": 1e3 * triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")}
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(loop_steps):
        step()
    torch.cuda.synchronize()
    timings[f"{who}_loop_us"] = 1e6 * (time.perf_counter() - started) / loop_steps
    try:
        timings[f"{who}_graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(step, rep=50, return_mode="median")
    except RuntimeError as error:
        print(f"  {who}: decode step not capturable ({str(error)[:120]})")
    return timings


def kernel_breakdown(fn, inputs, do, repeats: int = 5) -> dict[str, float]:
    """GPU microseconds per forward+backward spent in each kernel (torch.profiler, averaged over repeats)."""
    from torch.profiler import ProfilerActivity, profile

    def forward_backward():
        for t in inputs:
            t.grad = None
        fn(*inputs)[0].backward(do)

    forward_backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            forward_backward()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:  # kernels only: CPU-side ops would count their kernels twice
            continue
        fields = ("device_time_total", "self_device_time_total", "cuda_time_total", "self_cuda_time_total")
        device_us = max((getattr(event, field, 0.0) or 0.0) for field in fields)  # names vary across torch versions
        totals[event.key] = totals.get(event.key, 0.0) + device_us / repeats
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--profile", action="store_true", help="also print our per-kernel time of a forward+backward")
    parser.add_argument("--skip-fla", action="store_true")
    parser.add_argument("--graph", action="store_true", help="also time every peer replayed from a CUDA graph")
    parser.add_argument("--fla-budget-s", type=float, default=1e9, help="stop timing FLA after this many seconds")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "ops_h200.json"))
    args = parser.parse_args()

    fla_gsa = fla_gla = fla_recurrent = None
    if not args.skip_fla:
        try:
            from fla.ops.gla import chunk_gla as fla_gla
            from fla.ops.gsa import chunk_gsa as fla_gsa
            from fla.ops.gsa import fused_recurrent_gsa as fla_recurrent
        except ImportError as error:
            print(f"FLA not importable ({error}); measuring without it")
    started = time.time()

    def progress(message):
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "shapes": {}, "decode": {}}
    for name in args.shapes:
        B, T, H, D, M = SHAPES[name]
        inputs, do, dstate, scale, ours, truth = operator_case(name)
        row = {"B": B, "T": T, "H": H, "K": D, "V": D, "M": M,
               "gflop_forward": flops_forward(B, T, H, D, M) / 1e9, "gb_forward": bytes_forward(B, T, H, D, M) / 1e9}

        names = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"]
        progress(f"{name}: float32 PyTorch truth")
        want = run_and_grads(truth, [t.detach().float().requires_grad_() for t in inputs], do.float(), dstate)
        progress(f"{name}: ours (first call compiles)")
        got = run_and_grads(ours, inputs, do, dstate)
        row["ours_err"] = {n: rel(a, b) for n, a, b in zip(names, got, want)}
        row["ours_ms"] = dict(zip(("forward", "forward_backward", "peak_gib"), bench(ours, inputs, do)))
        if args.graph:
            row["ours_ms"].update(bench_graph(ours, inputs, do))
        del got

        if args.profile:
            row["ours_kernels_us"] = kernel_breakdown(ours, inputs, do)
            print(f"{name}: our kernels, us per forward+backward:")
            for kernel, us in list(row["ours_kernels_us"].items())[:14]:
                print(f"  {us:9.1f}  {kernel[:90]}")
        progress(f"{name}: ours timed")
        if fla_gsa is not None and time.time() - started < args.fla_budget_s:
            progress(f"{name}: FLA (first call autotunes)")
            def theirs(q, k, v, s, g):
                o, state = fla_gsa(q, k, v, s, g, scale=scale, output_final_state=True)
                return o, (state[0], state[1])

            got = run_and_grads(theirs, inputs, do, dstate)
            row["fla_gsa_err"] = {n: rel(a, b) for n, a, b in zip(names, got, want)}
            row["fla_gsa_ms"] = dict(zip(("forward", "forward_backward", "peak_gib"), bench(theirs, inputs, do)))
            if args.graph:
                row["fla_gsa_ms"].update(bench_graph(theirs, inputs, do))
            del got
            gk = [t.detach().requires_grad_() for t in make_inputs(B, T, H, D, D)[:3]]
            gate = (F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16).bfloat16().requires_grad_()

            def gla(q, k, v, g_k):
                return fla_gla(q, k, v, g_k, scale=scale)[0], ()

            row["fla_gla_ms"] = dict(zip(("forward", "forward_backward", "peak_gib"), bench(gla, gk + [gate], do)))
        # flash attention with the same hidden width: 32 heads x 128 at the paper shape
        heads, width = max(1, H * D // 128), 128
        qa, ka, va = (torch.randn(B, heads, T, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(3))
        doa = torch.randn(B, heads, T, width, device="cuda", dtype=torch.bfloat16)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), ()

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            row["sdpa_ms"] = dict(zip(("forward", "forward_backward", "peak_gib"), bench(sdpa, [qa, ka, va], doa)))
            if args.graph:
                row["sdpa_ms"].update(bench_graph(sdpa, [qa, ka, va], doa))
        results["shapes"][name] = row
        print(json.dumps({name: row}), flush=True)

    for batch in (1, 64):
        H, D, M = 4, 512, 64
        q, k, v, s, g = (t.detach()[:, 0].contiguous() for t in make_inputs(batch, 1, H, D, M))
        state = (torch.randn(batch, H, D, M, device="cuda"), torch.randn(batch, H, M, D, device="cuda"))
        initial = (state[0].clone(), state[1].clone())
        steps = {"ours": lambda: gated_slot_attention_step(q, k, v, s, g, state, D**-0.5, inplace=True,
                                                           backend="triton")}
        if fla_recurrent is not None:
            steps["fla"] = lambda: fla_recurrent(*(t[:, None] for t in (q, k, v, s, g)), scale=D**-0.5,
                                                 initial_state=initial, output_final_state=True)
        entry = {}
        for who, step in steps.items():
            entry.update(decode_timings(who, step))
        results["decode"][f"batch{batch}"] = entry

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nGSA operator on {results['device']} (bf16; ms, median of do_bench; ratio = ours / FLA chunk_gsa)")
    print(f"{'shape':<10} {'ours fwd':>9} {'FLA fwd':>8} {'ratio':>6} {'ours f+b':>9} {'FLA f+b':>8} {'ratio':>6} "
          f"{'GLA f+b':>8} {'SDPA f+b':>9} {'mem ours/FLA GiB':>17} {'TFLOP/s':>8} {'max err':>8}")
    for name, r in results["shapes"].items():
        o, f = r["ours_ms"], r.get("fla_gsa_ms", {})
        ratio = lambda key: f"{o[key] / f[key]:.2f}" if key in f else "-"  # noqa: E731
        fmt = lambda d, key: f"{d[key]:.3f}" if key in d else "-"  # noqa: E731
        tflops = r["gflop_forward"] / o["forward"]  # GFLOP / ms = TFLOP/s
        print(f"{name:<10} {o['forward']:>9.3f} {fmt(f, 'forward'):>8} {ratio('forward'):>6} "
              f"{o['forward_backward']:>9.3f} {fmt(f, 'forward_backward'):>8} {ratio('forward_backward'):>6} "
              f"{fmt(r.get('fla_gla_ms', {}), 'forward_backward'):>8} {r['sdpa_ms']['forward_backward']:>9.3f} "
              f"{o['peak_gib']:>8.2f}/{fmt(f, 'peak_gib'):>8} {tflops:>8.1f} {max(r['ours_err'].values()):>8.1e}")
    if args.graph:
        print("\nReplayed from a CUDA graph (GPU time without launch gaps; ms, median)")
        print(f"{'shape':<10} {'ours fwd':>9} {'FLA fwd':>8} {'ratio':>6} {'ours f+b':>9} {'FLA f+b':>8} {'ratio':>6} "
              f"{'SDPA f+b':>9}")
        for name, r in results["shapes"].items():
            o, f, a = r["ours_ms"], r.get("fla_gsa_ms", {}), r["sdpa_ms"]
            cell = lambda d, key: f"{d[key]:.3f}" if key in d else "-"  # noqa: E731
            ratio = lambda key: f"{o[key] / f[key]:.2f}" if key in o and key in f else "-"  # noqa: E731
            print(f"{name:<10} {cell(o, 'forward_graph'):>9} {cell(f, 'forward_graph'):>8} "
                  f"{ratio('forward_graph'):>6} {cell(o, 'forward_backward_graph'):>9} "
                  f"{cell(f, 'forward_backward_graph'):>8} "
                  f"{ratio('forward_backward_graph'):>6} {cell(a, 'forward_backward_graph'):>9}")
    print("\nDecoding step, us: do_bench (L2 flushed) / plain back-to-back loop / CUDA graph replay")
    for name, d in results["decode"].items():
        cells = [f"{who} " + " / ".join(f"{d[key]:.1f}" if key in d else "-"
                                         for key in (f"{who}_us", f"{who}_loop_us", f"{who}_graph_us"))
                 for who in ("ours", "fla") if f"{who}_us" in d]
        print(f"{name:<8} " + "   ".join(cells))


if __name__ == "__main__":
    main()
