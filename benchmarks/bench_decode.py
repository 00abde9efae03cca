"""GPU: decoding latency at batch 1 and 64 after prompts of 2K..16K tokens, and a long generation's throughput, 1.3B.

    python benchmarks/bench_decode.py --batch64 --long-tokens 1024

Ours through HF generate() and through the CUDA-graph decoder (gsa.generation.GraphDecoder), HF Llama (SDPA,
KV cache) and FLA's GSA (--models fla) through generate(). ms/token = (time of N+1 new tokens - time of 1 new
token) / N, greedy. At batch 64 each model runs its fastest way (ours: the graph decoder) after every prompt
length; a cell that does not fit in memory (Llama's KV cache at 64 x 16K: ~200 GB) is recorded as such. The long
generation: --long-tokens new tokens after a prompt of the first length, at batch 1 and 64, as tokens/s.
Prints the tables; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from bench_train import cuda_model
from gsa.generation import GraphDecoder


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def per_token_ms(generate, prompt, new_tokens, repeats: int = 1, warmup_tokens: int = 2):
    """ms a generated token: a generation of new_tokens + 1 less one of 1 (the prefill cancels), the median of
    `repeats` such pairs (the host's time per call varies by tens of ms beside another job on the host, which a
    single pair spreads over the tokens). The warm-up compiles, and for GraphDecoder captures a graph whose token
    buffer the timed calls then reuse: warmup_tokens = new_tokens + 1 for it."""
    generate(prompt, warmup_tokens)
    spans = []
    for _ in range(repeats):
        one = timed(lambda: generate(prompt, 1))
        many = timed(lambda: generate(prompt, new_tokens + 1))
        spans.append(many - one)
    return 1e3 * sorted(spans)[len(spans) // 2] / new_tokens


def fitting(measure):
    """measure() or None when the GPU runs out of memory (the cell is reported, not the run lost)."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def measure_model(kind: str, args, results: dict):
    """One model's rows of every table, into results."""
    model = cuda_model(kind).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def hf_generate(prompt, n):
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)

    decoder = GraphDecoder(model) if kind == "ours" else None
    fastest = (lambda p, n: decoder.generate(p, n)) if decoder is not None else hf_generate

    def timing(new_tokens: int, repeats: int) -> tuple[int, int]:
        """(repeats, warm-up tokens) of the fastest way: the CUDA-graph decoder's after a warm-up of the timed length
        (its kept graph then fits every timed call); generate() (Llama, FLA) once, after 2 tokens."""
        return (repeats, new_tokens + 1) if decoder is not None else (1, 2)

    for length in args.prompts:
        prompt = torch.randint(0, 32000, (1, length), device="cuda")
        row = {"hf_generate": per_token_ms(hf_generate, prompt, args.new_tokens)}
        if decoder is not None:
            row["cuda_graph"] = per_token_ms(fastest, prompt, args.new_tokens, *timing(args.new_tokens, args.repeats))
        results["ms_per_token"][f"{kind}@{length}"] = row
        print(kind, length, row, flush=True)
    if args.batch64:
        for length in args.prompts:
            prompt = torch.randint(0, 32000, (64, length), device="cuda")
            ms = fitting(lambda: per_token_ms(fastest, prompt, args.new_tokens,
                                              *timing(args.new_tokens, args.repeats)))
            cell = {"out_of_memory": True} if ms is None else {"ms_per_token": ms, "tokens_per_s": 64e3 / ms}
            results.setdefault("batch64", {})[f"{kind}@{length}"] = cell
            print(kind, "batch 64", length, cell, flush=True)
    if args.long_tokens:
        for batch in (1, 64):
            prompt = torch.randint(0, 32000, (batch, args.prompts[0]), device="cuda")
            ms = fitting(lambda: per_token_ms(fastest, prompt, args.long_tokens, *timing(args.long_tokens, 1)))
            cell = {"out_of_memory": True} if ms is None else {"ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms}
            long = results.setdefault("long", {"prompt": args.prompts[0], "new_tokens": args.long_tokens})
            long[f"{kind}@{batch}"] = cell
            print(kind, "long generation, batch", batch, cell, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="*", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="CUDA-graph decoding: the median of this many timed pairs (see per_token_ms)")
    parser.add_argument("--batch64", action="store_true", help="also batch 64 after every prompt length")
    parser.add_argument("--long-tokens", type=int, default=0,
                        help="also a generation of this many tokens at batch 1 and 64 (its tokens/s)")
    parser.add_argument("--models", nargs="+", default=["ours", "llama"], choices=["ours", "llama", "fla"],
                        help="fla: flash-linear-attention's GSAForCausalLM through generate() (autotunes on first use)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "decode_h200.json"))
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "new_tokens": args.new_tokens, "ms_per_token": {},
               "cuda_graph_repeats": args.repeats}
    for kind in args.models:
        measure_model(kind, args, results)
        gc.collect()
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_tables(results, args.models, args.prompts)


def print_tables(results, models, prompts):
    print(f"\nDecoding, batch 1, greedy, 1.3B bf16 on {results['device']} (ms per token)")
    columns = [(kind, method) for kind in models for method in ("hf_generate", "cuda_graph")
               if method == "hf_generate" or kind == "ours"]
    print(f"{'prompt':>7} " + " ".join(f"{kind + ' ' + method:>18}" for kind, method in columns))
    rows = results["ms_per_token"]
    for length in prompts:
        print(f"{length:>7} " + " ".join(f"{rows[f'{kind}@{length}'][method]:>18.2f}" for kind, method in columns))

    def tokens_per_s(cell):
        return f"{'out of memory':>14}" if "out_of_memory" in cell else f"{cell['tokens_per_s']:>14.0f}"

    if "batch64" in results:
        print("\nBatch 64, each model's fastest way (tokens/s)")
        print(f"{'prompt':>7} " + " ".join(f"{kind:>14}" for kind in models))
        for length in prompts:
            print(f"{length:>7} " + " ".join(tokens_per_s(results["batch64"][f"{kind}@{length}"]) for kind in models))
    if "long" in results:
        long = results["long"]
        print(f"\nLong generation: {long['new_tokens']} new tokens after {long['prompt']} (tokens/s)")
        print(f"{'batch':>7} " + " ".join(f"{kind:>14}" for kind in models))
        for batch in (1, 64):
            print(f"{batch:>7} " + " ".join(tokens_per_s(long[f"{kind}@{batch}"]) for kind in models))


if __name__ == "__main__":
    main()
