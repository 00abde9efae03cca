"""CPU: the chunked PyTorch operator against the step-by-step reference, forward + backward, float32.

    python benchmarks/bench_cpu_op.py            # B=1, T=2048, H=4, K=V=64, M=64 (issue's shape)

Prints one table and writes benchmarks/results/cpu_op.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gsa.ops import gated_slot_attention


def make_inputs(B, T, H, K, V, M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen)) / 8
    s = 1 - torch.exp(g)
    return [t.requires_grad_() for t in (q, k, v, s, g)]


def time_fwd_bwd(backend, tensors, repeats):
    times_fwd, times_total = [], []
    for _ in range(repeats):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        o, _ = gated_slot_attention(*tensors, backend=backend)
        mid = time.perf_counter()
        o.sum().backward()
        end = time.perf_counter()
        times_fwd.append(mid - start)
        times_total.append(end - start)
    return min(times_fwd), min(times_total)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=64, help="K = V")
    parser.add_argument("--M", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_op.json"))
    args = parser.parse_args()

    tensors = make_inputs(args.B, args.T, args.H, args.D, args.D, args.M)
    rows = {}
    for backend, repeats in (("torch", args.repeats), ("reference", max(1, args.repeats // 3))):
        time_fwd_bwd(backend, tensors, 1)  # warm-up
        fwd, total = time_fwd_bwd(backend, tensors, repeats)
        rows[backend] = {"forward_s": fwd, "forward_backward_s": total}
    speedup = rows["reference"]["forward_backward_s"] / rows["torch"]["forward_backward_s"]
    result = {
        "shape": dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, M=args.M, dtype="float32"),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backends": rows,
        "speedup_forward_backward": speedup,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"GSA operator on CPU ({torch.get_num_threads()} threads), B={args.B} T={args.T} H={args.H} "
          f"K=V={args.D} M={args.M} float32")
    print(f"{'backend':<10} {'forward (ms)':>13} {'fwd+bwd (ms)':>13}")
    for name, r in rows.items():
        print(f"{name:<10} {r['forward_s'] * 1e3:>13.1f} {r['forward_backward_s'] * 1e3:>13.1f}")
    print(f"chunked torch is {speedup:.1f}x faster than the step-by-step reference (target >= 20x)")


if __name__ == "__main__":
    main()
