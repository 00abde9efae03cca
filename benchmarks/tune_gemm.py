"""GPU: the 1.3B training step's matrix products as the layers issue them, against merged forms, and the operator's
backward beside a weight-gradient product on a second stream.

    python benchmarks/tune_gemm.py        # ~1 minute on an H200; prints one table, writes JSON (--out)

Three questions for issue 8 (training at 1.25x FLA):
1. Do the q / k / v / f projections (N = 2048, 2048, 2048, 256) and SwiGLU's gate / up (N = 5632 twice) run faster
   as one product each (N = 6400, 11264), forward, input gradient (one product over the joined gradients instead of
   a product and beta = 1 accumulations) and weight gradient? The merged forms need the weights joined: that copy is
   timed too.
2. The operator's backward leaves multiprocessors idle in its walks over chunks: how much of a weight-gradient
   product (which no later kernel of the layer's backward needs) hides behind it on a second stream?
3. Why the long products run at fewer TFLOP/s than the short ones: the SM clock nvidia-smi reports under each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn.functional as F
import triton.testing

from gsa.ops import gated_slot_attention

T, D, INTER, F_WIDTH, VOCAB, HEADS, SLOTS = 16384, 2048, 5632, 256, 32000, 4, 64


def gpu_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def products(gen) -> list[dict]:
    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).bfloat16()

    y = rand(T, D)
    rows = []
    for name, widths in (("q/k/v/f", (D, D, D, F_WIDTH)), ("gate/up", (INTER, INTER)), ("o", (D,)),
                         ("down", None), ("lm head", (VOCAB,))):
        if name == "down":
            x, w, g = rand(T, INTER), rand(D, INTER), rand(T, D)
            flops = 2 * T * INTER * D
            rows.append(dict(name=name, form="one", fwd=gpu_ms(lambda: F.linear(x, w)),
                             dx=gpu_ms(lambda: g @ w), dw=gpu_ms(lambda: g.t() @ x), flops=flops))
            continue
        ws = [rand(n, D) for n in widths]
        gs = [rand(T, n) for n in widths]
        flops = 2 * T * D * sum(widths)

        def separate_dx():
            dy = gs[0] @ ws[0]
            for g, w in zip(gs[1:], ws[1:]):
                dy.addmm_(g, w)
            return dy

        rows.append(dict(
            name=name, form="separate" if len(ws) > 1 else "one", flops=flops,
            fwd=gpu_ms(lambda: [F.linear(y, w) for w in ws]),
            dx=gpu_ms(separate_dx),
            dw=gpu_ms(lambda: [g.t() @ y for g in gs]),
        ))
        if len(ws) > 1:
            wcat, gcat = torch.cat(ws), torch.cat(gs, 1)
            rows.append(dict(
                name=name, form="merged", flops=flops,
                fwd=gpu_ms(lambda: F.linear(y, wcat)), dx=gpu_ms(lambda: gcat @ wcat),
                dw=gpu_ms(lambda: gcat.t() @ y), join=gpu_ms(lambda: torch.cat(ws)),
            ))
            # what rms_norm_linear's backward does with a joined gradient of blocks of unequal widths: one dy
            # product, the weight gradients per block over the joined gradient's column views
            widths_ = list(widths)
            rows.append(dict(
                name=name, form="blocks", flops=flops, fwd=None, dx=rows[-1]["dx"],
                dw=gpu_ms(lambda: [g.t() @ y for g in gcat.split(widths_, -1)]),
            ))
    for row in rows:
        row["tflops"] = {k: row["flops"] / row[k] / 1e9 if row[k] else None for k in ("fwd", "dx", "dw")}
    return rows


def overlap(gen, batch: int) -> dict:
    """The operator's backward (paper layer, batch x (16384 / batch) tokens) alone, a weight-gradient product alone,
    and both at once, the product on a second stream."""
    seq = T // batch

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).bfloat16().requires_grad_()

    q, k, v = (rand(batch, seq, HEADS, D // HEADS) for _ in range(3))
    f = torch.randn(batch, seq, HEADS, SLOTS, device="cuda", generator=gen)
    g = (F.logsigmoid(f) / 8).bfloat16().requires_grad_()
    s = (1 - g.detach().float().exp()).bfloat16().requires_grad_()
    inputs = (F.silu(q.detach()).requires_grad_(), F.silu(k.detach()).requires_grad_(), v, s, g)
    o, _ = gated_slot_attention(*inputs, backend="triton", check_gate_values=False)
    do = torch.randn_like(o)

    def backward():
        torch.autograd.grad(o, inputs, do, retain_graph=True)

    x, gd = torch.randn(T, INTER, device="cuda", generator=gen).bfloat16(), torch.randn(
        T, D, device="cuda", generator=gen).bfloat16()
    side = torch.cuda.Stream()
    result = {"batch": batch, "operator_bwd": gpu_ms(backward)}
    for name, product in (("down dW", lambda: gd.t() @ x), ("o dW", lambda: gd.t() @ gd)):
        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                product()
            backward()
            torch.cuda.current_stream().wait_stream(side)

        alone = gpu_ms(product)
        together = gpu_ms(both)
        result[name] = dict(alone=alone, together=together,
                            saved=result["operator_bwd"] + alone - together)
    return result


def clocks_under_load(gen) -> list[dict]:
    """The SM clock and power nvidia-smi reports while one product runs back to back (~1 s queued ahead): whether
    the long products' lower TFLOP/s is the clock falling under the power limit (read only; nothing is set)."""
    y = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    readings = []
    for name, width in (("q (N = 2048)", D), ("gate / up (N = 11264)", 2 * INTER)):
        w = torch.randn(width, D, device="cuda", generator=gen).bfloat16()
        ms = gpu_ms(lambda: F.linear(y, w))
        for _ in range(int(1500 / ms)):  # ~1.5 s of GPU work queued
            F.linear(y, w)
        time.sleep(0.5)
        samples = []
        for _ in range(4):
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks.max.sm",
                                       "--format=csv,noheader,nounits", "-i", str(torch.cuda.current_device())],
                                      capture_output=True, text=True, timeout=10).stdout.strip()
                samples.append([float(x) for x in line.split(",")])
            except (OSError, ValueError, subprocess.SubprocessError):
                break
            time.sleep(0.2)
        torch.cuda.synchronize()
        readings.append(dict(product=name, ms=ms, tflops=2 * T * D * width / ms / 1e9, samples=samples))
    return readings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                      "tune_gemm_h200.json"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = products(gen)
    overlaps = [overlap(gen, batch) for batch in (8, 2)]
    loaded = clocks_under_load(gen)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=T, products=rows,
                  overlap=overlaps, clocks=loaded)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"{'product':9} {'form':9} {'fwd ms':>7} {'dx ms':>7} {'dw ms':>7} {'join':>6}  TFLOP/s fwd / dx / dw")
    for r in rows:
        t = r["tflops"]
        ms = " ".join(f"{r[k]:7.3f}" if r[k] else "      -" for k in ("fwd", "dx", "dw"))
        rates = " / ".join(f"{t[k]:.0f}" if t[k] else "-" for k in ("fwd", "dx", "dw"))
        print(f"{r['name']:9} {r['form']:9} {ms} {r.get('join', 0):6.3f}  {rates}")
    for o in overlaps:
        parts = "  ".join(f"{n}: alone {o[n]['alone']:.3f} both {o[n]['together']:.3f} saved {o[n]['saved']:.3f}"
                          for n in ("down dW", "o dW"))
        print(f"operator bwd {o['batch']} x {T // o['batch']}: {o['operator_bwd']:.3f} ms  {parts}")
    for c in loaded:
        print(f"{c['product']}: {c['tflops']:.0f} TFLOP/s; SM MHz, W, max MHz under load: {c['samples']}")


if __name__ == "__main__":
    main()
