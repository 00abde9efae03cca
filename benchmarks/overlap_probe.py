"""Does a weight-gradient product on a second CUDA stream hide the row kernels of backward (issue 8)?

One SwiGLU block's backward at the 1.3B model's step (16K rows, d 2048, intermediate 5632, bf16), repeated as a
stack of layers: on the critical path the input-gradient products and the row kernels (SwiGLU's and the norm's
backward), off it the two weight-gradient products. Times the stack with everything on one stream (today's order)
against the weight-gradient products on a side stream that waits only for their inputs (an event after SwiGLU's
backward), the variants alternating round by round, and prints one table.

    PYTHONPATH=src python benchmarks/overlap_probe.py [--layers 8] [--repeats 10] [--rounds 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from gsa.layers.fused import joined_columns
from gsa.layers.fused_triton import rms_norm_rows_bwd, swiglu_rows_bwd


def build(rows: int, d: int, inter: int, layers: int):
    dev, dt = "cuda", torch.bfloat16

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt)

    return [dict(gate=r(rows, inter), up=r(rows, inter), grad=r(rows, d), h=r(rows, d), y=r(rows, d),
                 w_down=r(d, inter, scale=0.02), w_gate_up=r(2 * inter, d, scale=0.02), norm_w=r(d),
                 rstd=torch.rand(rows, 1, device=dev) + 0.5) for _ in range(layers)]


def critical(p, ready: torch.cuda.Event | None = None):
    """The input-gradient side of one block's backward: (hidden, joined gradient) for the weight products; `ready`
    is recorded once those two exist (before the rest of the critical path)."""
    dh = p["grad"] @ p["w_down"]
    hidden, dg, du = swiglu_rows_bwd(p["gate"], p["up"], dh, joined=True)
    joined = joined_columns([dg, du])
    if ready is not None:
        ready.record()
    dy = joined @ p["w_gate_up"]
    rms_norm_rows_bwd(p["h"], p["norm_w"], p["rstd"], dy, False, None)
    return hidden, joined


def weight_products(p, hidden, joined):
    p["dw_down"] = p["grad"].t() @ hidden
    p["dw_gate_up"] = joined.t() @ p["y"]


def run(stack, side: torch.cuda.Stream, main: torch.cuda.Stream):
    """The stack's backward with the critical path on `main` and the weight products on `side` (in order on one
    stream when side is main)."""
    serial = side is main
    caller = torch.cuda.current_stream()
    main.wait_stream(caller)
    with torch.cuda.stream(main):
        for p in stack:
            ready = None if serial else torch.cuda.Event()
            hidden, joined = critical(p, ready)
            if serial:
                weight_products(p, hidden, joined)
                continue
            side.wait_event(ready)  # the weight products wait for their inputs only, not the rest of the block
            with torch.cuda.stream(side):
                weight_products(p, hidden, joined)
            for t in (hidden, joined):
                t.record_stream(side)
        main.wait_stream(side)
    caller.wait_stream(main)


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    stack = build(args.rows, 2048, 5632, args.layers)
    default = torch.cuda.current_stream()
    rows = []
    variants = (
        ("one stream", default, default),
        ("side stream", default, torch.cuda.Stream()),
        ("side stream, critical path high priority", torch.cuda.Stream(priority=-1), torch.cuda.Stream()),
    )
    for round_ in range(args.rounds):  # the variants alternate, so a clock drift reaches each of them alike
        for label, main_stream, side in variants:
            ms = timed(lambda: run(stack, side, main_stream), args.repeats)
            rows.append(dict(variant=label, round=round_ + 1, ms_per_layer=ms / args.layers))
    inputs = [critical(p) for p in stack]  # the weight products' inputs, formed once for timing them alone
    parts = {
        "critical path alone": lambda: [critical(p) for p in stack],
        "weight products alone": lambda: [weight_products(p, *made) for p, made in zip(stack, inputs)],
    }
    for label, fn in parts.items():
        rows.append(dict(variant=label, ms_per_layer=timed(fn, args.repeats) / args.layers))
    print(f"{'variant':45s} round ms a layer")
    for row in rows:
        print(f"{row['variant']:45s} {row.get('round', ''):>5} {row['ms_per_layer']:.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
