"""Sweep the decoding step's launch settings (gsa/ops/triton/recurrent.py, STEP_LAUNCH) on one GPU.

For every (rows a program, warps, state tiles streamed or not): the step's GPU time replayed from a CUDA graph at
batch 1 and 64 (the paper's layer: H=4, K=V=512, M=64; float32 states), its bandwidth against the bytes a step must
move (both states read and written), and its largest relative error against the PyTorch step: the step on prepared
q, k, v, s, g (the model's fused step, from raw projections and gate logits, runs the same two kernels with a few
more loads and exps). Then the 1.3B model's decoding (GraphDecoder, batch 1 and 64) with the settings in the code
and with the sweep's best at batch 64. The JSON is rewritten after every setting, so a run cut short keeps its rows.

    python benchmarks/tune_decode.py --out benchmarks/results/tune_decode_h200.json
    PYTHONPATH=<checkout>/src:benchmarks python benchmarks/tune_decode.py --in-code-only --label base --out ab.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import time
from pathlib import Path

import torch
import triton

from bench_decode import per_token_ms
from bench_ops import make_inputs
from bench_train import cuda_model
from gsa.generation import GraphDecoder
from gsa.ops import gated_slot_attention_decode, gated_slot_attention_step
from gsa.ops.triton import recurrent

H, D, M = 4, 512, 64


def step_inputs(batch: int, seed: int = 0):
    """One token per sequence of bench_ops' inputs (the same q, k, v, s, g as its decode row), and float32 states."""
    q, k, v, s, g = (t.detach()[:, 0].contiguous() for t in make_inputs(batch, 1, H, D, M, seed=seed))
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    state = (torch.randn(batch, H, D, M, device="cuda", generator=gen),
             torch.randn(batch, H, M, D, device="cuda", generator=gen))
    return (q, k, v, s, g), state


def largest_relative_error(got_o, want_o, got_state, want_state) -> float:
    """Of the output and both states, the largest relative (Frobenius) error against the torch step's."""
    pairs = [(got_o.float(), want_o.float()), *zip(got_state, want_state)]
    return max(((a - b).norm() / b.norm()).item() for a, b in pairs)


def step_error(batch: int) -> float:
    """Largest relative error of output and both states after one kernel step, against the torch backend's."""
    inputs, state = step_inputs(batch, seed=1)
    want_o, want_state = gated_slot_attention_step(*inputs, state, inplace=False, backend="torch")
    got_o, got_state = gated_slot_attention_step(*inputs, (state[0].clone(), state[1].clone()), inplace=False,
                                                 backend="triton")
    return largest_relative_error(got_o, want_o, got_state, want_state)


def decode_error(batch: int) -> float:
    """The same from raw projections and gate logits (the model's fused step: feature maps and gates formed in the
    kernels), the states updated in place, against the torch backend's."""
    (q, k, v, _, f), state = step_inputs(batch, seed=2)  # the log gates serve as gate logits: any reals do
    kwargs = dict(gate_logit_normalizer=8.0, feature_map="swish", clamp_min=None)
    want_state = (state[0].clone(), state[1].clone())
    want_o = gated_slot_attention_decode(q, k, v, f, want_state, D**-0.5, **kwargs, backend="torch")
    got_o = gated_slot_attention_decode(q, k, v, f, state, D**-0.5, **kwargs, backend="triton")
    return largest_relative_error(got_o, want_o, state, want_state)


def step_us(batch: int) -> float:
    inputs, state = step_inputs(batch)
    return 1e3 * triton.testing.do_bench_cudagraph(
        lambda: gated_slot_attention_step(*inputs, state, inplace=True, backend="triton"), rep=100,
        return_mode="median")


def model_decoding(prompt_length: int, new_tokens: int, batches=(1, 64)) -> dict[str, float]:
    """ms a token of the 1.3B model from CUDA graphs at these batch sizes with the launch settings in place now
    (tune_gemv.py uses it too)."""
    model = cuda_model("ours").eval()
    decoder = GraphDecoder(model)
    row = {}
    for batch in batches:
        prompt = torch.randint(0, 32000, (batch, prompt_length), device="cuda")
        row[f"batch{batch}_ms"] = per_token_ms(decoder.generate, prompt, new_tokens, 3, new_tokens + 1)
    del model, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return row


def measure_in_code(args) -> None:
    """One A/B side: the step and the model with the launch settings of whichever checkout is on PYTHONPATH."""
    row = {"label": args.label, "src": recurrent.__file__, "max_err": step_error(64),
           "max_err_from_logits": decode_error(64), **{f"batch{b}_us": step_us(b) for b in (1, 16, 64)},
           **model_decoding(args.prompt, args.new_tokens)}
    print(json.dumps(row), flush=True)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "runs": []}
    results["runs"].append(row)
    save(results, args.out)


def add_model_arguments(parser, out_name: str) -> None:
    """The model run's options (prompt, new tokens) and the JSON's path, default $OUT/out_name."""
    parser.add_argument("--prompt", type=int, default=512, help="the model's prompt (the state does not grow)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), out_name))


def record(results: dict, rows: str, entry: dict, measure, out: str, started: float) -> None:
    """measure(entry) fills a sweep's row; a setting the GPU cannot hold is reported in it, not the sweep lost. The
    row joins results[rows] and the JSON is rewritten, so a run cut short keeps what it measured."""
    try:
        measure(entry)
    except Exception as error:
        entry["error"] = str(error)[:200]
    results[rows].append(entry)
    save(results, out)
    print(json.dumps(entry), f"[{time.time() - started:.0f}s]", flush=True)


def save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--warps", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--in-code-only", action="store_true",
                        help="no sweep (--rows / --warps unused): the step in the code's setting at batch 1, 16 and 64 "
                             "and the model at 1 and 64, printed as one JSON line and appended to --out's runs (A/B "
                             "runs of two checkouts through PYTHONPATH, alternating)")
    parser.add_argument("--label", default="", help="with --in-code-only: the A/B side, kept in the row")
    add_model_arguments(parser, "tune_decode_h200.json")
    args = parser.parse_args()
    if args.in_code_only:
        measure_in_code(args)
        return
    started = time.time()
    in_code = dict(recurrent.STEP_LAUNCH)
    moved = {batch: 2 * 2 * batch * H * D * M * 4 for batch in (1, 64)}  # both states, read and written, float32
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "in_code": in_code, "steps": [], "model": {}}
    for rows, warps, stream in itertools.product(args.rows, args.warps, (False, True)):
        recurrent.STEP_LAUNCH = dict(BK=rows, BV=rows, num_warps=warps, STREAM=stream)

        def measure(entry):
            entry["max_err"] = step_error(64)
            for batch in (1, 64):
                entry[f"batch{batch}_us"] = step_us(batch)

        record(results, "steps", dict(recurrent.STEP_LAUNCH), measure, args.out, started)
    fine = [e for e in results["steps"] if "error" not in e and e["max_err"] < 1e-4]
    if not fine:
        raise SystemExit("no setting ran within 1e-4 of the PyTorch step: see the errors above")
    best = min(fine, key=lambda e: e["batch64_us"])
    chosen = {key: best[key] for key in in_code}
    for name, setting in (("in_code", in_code), ("best_at_64", chosen)):
        recurrent.STEP_LAUNCH = dict(setting)
        results["model"][name] = {**setting, **model_decoding(args.prompt, args.new_tokens)}
        save(results, args.out)
        print(name, json.dumps(results["model"][name]), f"[{time.time() - started:.0f}s]", flush=True)

    print(f"\nDecoding step on {results['device']} (H={H}, K=V={D}, M={M}; us from a CUDA graph; GB/s of the bytes "
          f"a step must move)")
    print(f"{'rows':>5} {'warps':>5} {'stream':>6} {'batch 1':>8} {'batch 64':>9} {'GB/s @64':>9} {'max err':>8}")
    for e in sorted(results["steps"], key=lambda e: e.get("batch64_us", float("inf"))):
        if "error" in e:
            print(f"{e['BK']:>5} {e['num_warps']:>5} {e['STREAM']!s:>6}  failed: {e['error'][:60]}")
            continue
        print(f"{e['BK']:>5} {e['num_warps']:>5} {e['STREAM']!s:>6} {e['batch1_us']:>8.1f} {e['batch64_us']:>9.1f} "
              f"{moved[64] / e['batch64_us'] / 1e3:>9.0f} {e['max_err']:>8.1e}")
    print("\n1.3B model, ms a token from CUDA graphs")
    for name, row in results["model"].items():
        print(f"  {name:<11} rows {row['BK']} warps {row['num_warps']} stream {row['STREAM']}: "
              f"batch 1 {row['batch1_ms']:.3f}, batch 64 {row['batch64_ms']:.3f}")


if __name__ == "__main__":
    main()
