"""GPU: the 1.3B training step's matrix products as the layers issue them, against merged forms, and the operator's
backward beside a weight-gradient product on a second stream.

    python benchmarks/tune_gemm.py        # ~1 minute on an H200; prints one table, writes JSON (--out)

Two questions for issue 8 (training at 1.25x FLA), each answered in GPU time:
1. Do the q / k / v / f projections (N = 2048, 2048, 2048, 256) and SwiGLU's gate / up (N = 5632 twice) run faster
   as one product each (N = 6400, 11264), forward, input gradient (one product over the joined gradients instead of
   a product and beta = 1 accumulations) and weight gradient? The merged forms need the weights joined: that copy is
   timed too.
2. The operator's backward leaves multiprocessors idle in its walks over chunks: how much of a weight-gradient
   product (which no later kernel of the layer's backward needs) hides behind it on a second stream?
"""

from __future__ import annotations

import argparse
import json
import os

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
    for row in rows:
        row["tflops"] = {k: row["flops"] / row[k] / 1e9 for k in ("fwd", "dx", "dw")}
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                      "tune_gemm_h200.json"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = products(gen)
    overlaps = [overlap(gen, batch) for batch in (8, 2)]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=T, products=rows,
                  overlap=overlaps)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"{'product':9} {'form':9} {'fwd ms':>7} {'dx ms':>7} {'dw ms':>7} {'join':>6}  TFLOP/s fwd / dx / dw")
    for r in rows:
        t = r["tflops"]
        print(f"{r['name']:9} {r['form']:9} {r['fwd']:7.3f} {r['dx']:7.3f} {r['dw']:7.3f} {r.get('join', 0):6.3f}  "
              f"{t['fwd']:.0f} / {t['dx']:.0f} / {t['dw']:.0f}")
    for o in overlaps:
        parts = "  ".join(f"{n}: alone {o[n]['alone']:.3f} both {o[n]['together']:.3f} saved {o[n]['saved']:.3f}"
                          for n in ("down dW", "o dW"))
        print(f"operator bwd {o['batch']} x {T // o['batch']}: {o['operator_bwd']:.3f} ms  {parts}")


if __name__ == "__main__":
    main()
