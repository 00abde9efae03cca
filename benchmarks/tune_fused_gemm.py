"""GPU: can a Triton matrix product with SwiGLU in its epilogue beat cuBLAS's product plus our SwiGLU row kernel?

    python benchmarks/tune_fused_gemm.py     # one H200 call, ~2 minutes; prints one table, writes JSON (--out)

The question behind it (issue 8, benchmarks/NOTES.md session 24): the 1.3B step's row kernels run at the memory's
rate, so the only way to make them cheaper is to stop moving their bytes: form SwiGLU where the products' tiles
are still in registers. Forward, gate and up come out of one product whose epilogue also writes the hidden
silu(gate) * up (the row kernel's read of gate and up, 369 MB a layer at 16K tokens, is gone); backward, the
hidden gradient's product (grad @ W_down) finishes SwiGLU's backward in its epilogue (its 185 MB write and read are
gone). That pays only if the Triton product runs at cuBLAS's rate, which this measures first: a persistent
Triton product over TMA descriptors, plain and with each epilogue, against torch.mm at the step's shapes.

Every result's largest error against cuBLAS's (and the row kernels') is checked against two bf16 steps of the
largest value (`check`); the tables stop at the first that fails.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

T, D, INTER = 16384, 2048, 5632

PLAIN, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2


@triton.jit
def _tile_of(tile, tiles_m, tiles_n, GROUP: tl.constexpr):
    """Tile index -> (row tile, column tile), GROUP row tiles walked together so that their weight tiles are
    shared in L2."""
    in_group = GROUP * tiles_n
    first_m = (tile // in_group) * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + (tile % in_group) % rows, (tile % in_group) // rows


@triton.jit
def _product(
    a_desc, b_desc, b2_desc, c_desc, c2_desc, c3_desc, e1_desc, e2_desc, M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr,
    A_ROWS_ARE_K: tl.constexpr, B_ROWS_ARE_N: tl.constexpr, EPILOGUE: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Persistent C = A B over TMA descriptors; A is [M, K] or [K, M] (A_ROWS_ARE_K: a weight gradient's dyᵀ);
    B is [N, K] (a Linear weight, B_ROWS_ARE_N) or [K, N].
    EPILOGUE PLAIN: c = A B. SWIGLU_FWD: c = A B (gate), c2 = A B2 (up), c3 = silu(gate) up, from the rounded gate
    and up (what the backward's recomputation sees). SWIGLU_BWD: A B is the hidden gradient dh (rounded), e1 / e2
    the forward's gate / up: c = silu(gate) up (the hidden, for the weight gradient), c2 = d gate, c3 = d up."""
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    steps = tl.cdiv(K, BK)
    dtype = c_desc.dtype
    for tile in tl.range(start, tiles_m * tiles_n, PROGRAMS, flatten=FLATTEN):
        pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP)
        om = pm * BM
        on = pn * BN
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc2 = tl.zeros([BM, BN], dtype=tl.float32)
        for step in range(steps):
            ok = step * BK
            if A_ROWS_ARE_K:
                a = a_desc.load([ok, om]).T
            else:
                a = a_desc.load([om, ok])
            if B_ROWS_ARE_N:
                acc = tl.dot(a, b_desc.load([on, ok]).T, acc)
                if EPILOGUE == 1:
                    acc2 = tl.dot(a, b2_desc.load([on, ok]).T, acc2)
            else:
                acc = tl.dot(a, b_desc.load([ok, on]), acc)
        if EPILOGUE == 0:
            c_desc.store([om, on], acc.to(dtype))
        elif EPILOGUE == 1:
            gate = acc.to(dtype)
            up = acc2.to(dtype)
            c_desc.store([om, on], gate)
            c2_desc.store([om, on], up)
            g = gate.to(tl.float32)
            c3_desc.store([om, on], (g * tl.sigmoid(g) * up.to(tl.float32)).to(dtype))
        else:
            dh = acc.to(dtype).to(tl.float32)
            g = e1_desc.load([om, on]).to(tl.float32)
            u = e2_desc.load([om, on]).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            c_desc.store([om, on], (silu * u).to(dtype))
            c2_desc.store([om, on], (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dtype))
            c3_desc.store([om, on], (dh * silu).to(dtype))


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, block)


def launch(a, b, outs, config, rows_are_n, epilogue=PLAIN, b2=None, extra=(None, None), programs=None,
           a_rows_are_k=False):
    """One product through `_product` (b [N, K] when rows_are_n, else [K, N]; a [K, M] when a_rows_are_k, else
    [M, K]); outs are the one or three outputs the epilogue writes."""
    BM, BN, BK, stages, warps, flatten = (config[k] for k in ("BM", "BN", "BK", "stages", "warps", "flatten"))
    K, M = a.shape if a_rows_are_k else a.shape[::-1]
    N = b.shape[0] if rows_are_n else b.shape[1]
    b_block = [BN, BK] if rows_are_n else [BK, BN]
    out_descs = [_desc(o, [BM, BN]) for o in outs] + [None] * (3 - len(outs))
    out_descs = [d if d is not None else out_descs[0] for d in out_descs]
    extra_descs = [_desc(e, [BM, BN]) if e is not None else out_descs[0] for e in extra]
    a_desc, b_desc = _desc(a, [BK, BM] if a_rows_are_k else [BM, BK]), _desc(b, b_block)
    b2_desc = _desc(b2, b_block) if b2 is not None else b_desc
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    programs = min(programs or torch.cuda.get_device_properties(a.device).multi_processor_count, tiles)
    _product[(programs,)](
        a_desc, b_desc, b2_desc, *out_descs, *extra_descs, M, N, K,
        BM=BM, BN=BN, BK=BK, GROUP=8, PROGRAMS=programs, A_ROWS_ARE_K=a_rows_are_k, B_ROWS_ARE_N=rows_are_n,
        EPILOGUE=epilogue,
        FLATTEN=flatten, num_stages=stages, num_warps=warps,
    )


def configs(epilogue: int) -> list[dict]:
    if epilogue == SWIGLU_FWD:  # two accumulators: a BN tile here is 2 BN of product
        shapes = [(128, 64, 64, 4), (128, 128, 64, 3), (128, 128, 64, 4), (64, 128, 64, 4)]
    else:  # (128, 256, 64) at 4 stages and (256, 128, 64) at 3 ask for more than the H200's 227 KB of shared memory
        shapes = [(128, 128, 64, 4), (128, 128, 64, 5), (128, 256, 64, 3), (128, 128, 128, 3), (256, 128, 64, 2)]
    return [dict(BM=bm, BN=bn, BK=bk, stages=st, warps=8, flatten=fl) for bm, bn, bk, st in shapes
            for fl in (True, False)]


def gpu_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def check(name: str, err: float, largest: float) -> None:
    """err within two bf16 steps (2^-7 of the value each) of the largest reference value, or stop."""
    if not err <= largest * 2 ** -6:
        raise AssertionError(f"{name}: largest error {err:.3e} against a reference of magnitude {largest:.3e}")


def compared(name: str, outs, refs) -> float:
    """The largest error of outs against refs (`check`ed)."""
    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, refs))
    check(name, err, max(r.float().abs().max().item() for r in refs))
    return err


def best(fn_of_config, epilogue) -> tuple[float, dict]:
    """The fastest config (a config that does not fit or compile is skipped)."""
    results = []
    for config in configs(epilogue):
        try:
            fn_of_config(config)
            torch.cuda.synchronize()
            results.append((gpu_ms(lambda: fn_of_config(config)), config))
        except Exception as error:  # OutOfResources and compile failures of one config
            print(f"  skipped {config}: {type(error).__name__}: {str(error)[:120]}")
    if not results:
        raise RuntimeError("no config of the Triton product fits or compiles here")
    return min(results, key=lambda r: r[0])


def step_products(rand, rounds: int) -> list[dict]:
    """Every bf16 product shape of the 1.3B training step at 16K tokens (all but the LM head's weight gradient, which
    accumulates in float32), as the layers issue it (forward F.linear,
    input gradients dy @ W over the joined gradients, weight gradients dyᵀ x, q / k / v / f by column view):
    cuBLAS against the Triton product's best config, then `rounds` alternating rounds of the two."""
    x, h, g6400, g11264, g2048 = rand(T, D), rand(T, INTER), rand(T, 6400), rand(T, 2 * INTER), rand(T, D)
    w2048, w256, w5632, wd = rand(D, D), rand(256, D), rand(INTER, D), rand(D, INTER)
    w6400, w11264 = rand(6400, D), rand(2 * INTER, D)
    head_x, head_w, head_g = rand(4096, D), rand(32000, D), rand(4096, 32000)
    # (name, per layer, a, b, a [K, M], b [N, K])
    shapes = [
        ("fwd q/k/v/o  N 2048 K 2048", 4, x, w2048, False, True),
        ("fwd f        N 256 K 2048", 1, x, w256, False, True),
        ("fwd gate/up  N 5632 K 2048", 2, x, w5632, False, True),
        ("fwd down     N 2048 K 5632", 1, h, wd, False, True),
        ("dx q/k/v/f   N 2048 K 6400", 1, g6400, w6400, False, False),
        ("dx o         N 2048 K 2048", 1, g2048, w2048, False, False),
        ("dx gate/up   N 2048 K 11264", 1, g11264, w11264, False, False),
        ("dx down      N 5632 K 2048", 1, g2048, wd, False, False),
        ("dw q/k/v     2048x2048 view", 3, g6400[:, :D], x, True, False),
        ("dw f         256x2048 view", 1, g6400[:, 3 * D:], x, True, False),
        ("dw o         2048x2048", 1, g2048, x, True, False),
        ("dw gate/up   11264x2048", 1, g11264, x, True, False),
        ("dw down      2048x5632", 1, g2048, h, True, False),
        ("head fwd     4096 rows N 32000", 4 / 24, head_x, head_w, False, True),
        ("head dx      4096 rows N 2048 K 32000", 4 / 24, head_g, head_w, False, False),
    ]
    rows = []
    for name, per_layer, a, b, a_km, b_nk in shapes:
        A = a.t() if a_km else a
        B = b.t() if b_nk else b
        out = torch.empty(A.shape[0], B.shape[1], device="cuda", dtype=torch.bfloat16)

        def cublas():
            return A @ B

        ms, config = best(lambda cfg: launch(a, b, [out], cfg, b_nk, a_rows_are_k=a_km), PLAIN)

        def ours():
            launch(a, b, [out], config, b_nk, a_rows_are_k=a_km)

        ours()
        want = cublas()
        err = compared(name, [out], [want]) / want.float().abs().max().item()
        times = {"cublas": [], "triton": []}
        for _ in range(rounds):
            times["cublas"].append(gpu_ms(cublas))
            times["triton"].append(gpu_ms(ours))
        c_ms, t_ms = (sum(v) / len(v) for v in times.values())
        flops = 2 * A.shape[0] * A.shape[1] * B.shape[1]
        rows.append(dict(name=name, per_step=per_layer * 24, cublas_ms=c_ms, triton_ms=t_ms, rounds=times,
                         cublas_tflops=flops / c_ms / 1e9, triton_tflops=flops / t_ms / 1e9, config=config,
                         rel_err=err, tuned_ms=ms))
        print(f"{name:<38} cuBLAS {c_ms:.3f} ({flops / c_ms / 1e9:.0f})  Triton {t_ms:.3f} ({flops / t_ms / 1e9:.0f})"
              f"  x{per_layer * 24:g}  saves {max(0.0, per_layer * 24 * (c_ms - t_ms)):.2f} ms a step", flush=True)
    return rows


def fused_rows(rand) -> list[dict]:
    """The plain Triton product at the gate and hidden-gradient shapes, then SwiGLU in its epilogue forward and
    backward, each against cuBLAS (and our row kernels)."""
    from gsa.layers.fused_triton import swiglu_rows_bwd, swiglu_rows_fwd

    x, wg, wu = rand(T, D), rand(INTER, D, scale=D ** -0.5), rand(INTER, D, scale=D ** -0.5)
    wd, grad = rand(D, INTER, scale=INTER ** -0.5), rand(T, D)
    rows = []

    # plain products: Triton against cuBLAS at the step's shapes
    for name, a, b, rows_are_n in (("gate (x Wgᵀ)", x, wg, True), ("d hidden (grad W_down)", grad, wd, False)):
        n = b.shape[0] if rows_are_n else b.shape[1]
        c = torch.empty(T, n, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(a, b) if rows_are_n else a @ b
        ms, config = best(lambda cfg: launch(a, b, [c], cfg, rows_are_n), PLAIN)
        launch(a, b, [c], config, rows_are_n)
        err = compared(name, [c], [ref])
        cublas = gpu_ms(lambda: F.linear(a, b)) if rows_are_n else gpu_ms(lambda: a @ b)
        flops = 2 * T * a.shape[1] * n
        rows.append(dict(name=name, ours_ms=ms, cublas_ms=cublas, ours_tflops=flops / ms / 1e9,
                         cublas_tflops=flops / cublas / 1e9, config=config, max_err=err))

    # forward: gate and up products, then the SwiGLU row kernel (the model now) against one fused launch
    gate, up, hidden = (torch.empty(T, INTER, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def unfused_fwd():
        g, u = F.linear(x, wg), F.linear(x, wu)
        return g, u, swiglu_rows_fwd(g, u)

    ref = unfused_fwd()
    ms, config = best(lambda cfg: launch(x, wg, [gate, up, hidden], cfg, True, SWIGLU_FWD, b2=wu), SWIGLU_FWD)
    launch(x, wg, [gate, up, hidden], config, True, SWIGLU_FWD, b2=wu)
    err = compared("SwiGLU forward", (gate, up, hidden), ref)
    rows.append(dict(name="gate, up + SwiGLU forward", ours_ms=ms, cublas_ms=gpu_ms(unfused_fwd), config=config,
                     max_err=err, cublas_parts_ms=[gpu_ms(lambda: F.linear(x, wg)), gpu_ms(lambda: F.linear(x, wu)),
                                                   gpu_ms(lambda: swiglu_rows_fwd(ref[0], ref[1]))]))

    # backward: the hidden gradient's product, then SwiGLU's backward row kernel, against one fused launch
    g, u = ref[0], ref[1]
    joined = torch.empty(T, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    d_gate, d_up = joined[:, :INTER], joined[:, INTER:]

    def unfused_bwd():
        dh = grad @ wd
        return swiglu_rows_bwd(g, u, dh, joined=True)

    ref = unfused_bwd()
    ms, config = best(lambda cfg: launch(grad, wd, [hidden, d_gate, d_up], cfg, False, SWIGLU_BWD, extra=(g, u)),
                      SWIGLU_BWD)
    launch(grad, wd, [hidden, d_gate, d_up], config, False, SWIGLU_BWD, extra=(g, u))
    err = compared("SwiGLU backward", (hidden, d_gate, d_up), ref)
    dh = grad @ wd
    rows.append(dict(name="d hidden + SwiGLU backward", ours_ms=ms, cublas_ms=gpu_ms(unfused_bwd), config=config,
                     max_err=err, cublas_parts_ms=[gpu_ms(lambda: grad @ wd),
                                                   gpu_ms(lambda: swiglu_rows_bwd(g, u, dh, joined=True))]))

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: tune_products.json with --products, else "
                        "tune_fused_gemm.json")
    parser.add_argument("--products", action="store_true", help="only every product of the step, plain")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.out = args.out or ("tune_products.json" if args.products else "tune_fused_gemm.json")

    torch.manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).bfloat16()

    if args.products:
        rows = step_products(rand, args.rounds)
        saved = sum(max(0.0, r["per_step"] * (r["cublas_ms"] - r["triton_ms"])) for r in rows)
        total = sum(r["per_step"] * r["cublas_ms"] for r in rows)
        print(f"step products: cuBLAS {total:.1f} ms; the faster of the two each: {total - saved:.1f} ms "
              f"(-{saved:.1f})")
    else:
        rows = fused_rows(rand)
        print(f"\n{'what':<30} {'Triton ms':>10} {'cuBLAS(+rows) ms':>17} {'ratio':>6}  max err  config")
        for r in rows:
            c = r["config"]
            tag = f"{c['BM']}x{c['BN']}x{c['BK']} s{c['stages']} flat={c['flatten']}"
            print(f"{r['name']:<30} {r['ours_ms']:>10.3f} {r['cublas_ms']:>17.3f} "
                  f"{r['ours_ms'] / r['cublas_ms']:>6.3f}  {r['max_err']:.2e}  {tag}")
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       tokens=T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
