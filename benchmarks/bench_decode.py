"""GPU: decoding latency at batch 1 (and throughput at batch 64), 1.3B size, after prompts of 2K..16K tokens.

    python benchmarks/bench_decode.py

Ours through HF generate() and through the CUDA-graph decoder (gsa.generation.GraphDecoder), HF Llama (SDPA,
KV cache) through generate(). ms/token = (time of N+1 new tokens - time of 1 new token) / N, greedy.
Prints one table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
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


def per_token_ms(generate, prompt, new_tokens):
    generate(prompt, 2)  # warm-up (compiles, captures)
    one = timed(lambda: generate(prompt, 1))
    many = timed(lambda: generate(prompt, new_tokens + 1))
    return 1e3 * (many - one) / new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="*", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch64", action="store_true", help="also tokens/s at batch 64 after a 2K prompt")
    parser.add_argument("--models", nargs="+", default=["ours", "llama"], choices=["ours", "llama", "fla"],
                        help="fla: flash-linear-attention's GSAForCausalLM through generate() (autotunes on first use)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "decode_h200.json"))
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "new_tokens": args.new_tokens, "ms_per_token": {}}
    for kind in args.models:
        model = cuda_model(kind).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def hf_generate(prompt, n):
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)

        decoder = GraphDecoder(model) if kind == "ours" else None
        for length in args.prompts:
            prompt = torch.randint(0, 32000, (1, length), device="cuda")
            row = {"hf_generate": per_token_ms(hf_generate, prompt, args.new_tokens)}
            if decoder is not None:
                row["cuda_graph"] = per_token_ms(lambda p, n: decoder.generate(p, n), prompt, args.new_tokens)
            results["ms_per_token"][f"{kind}@{length}"] = row
            print(kind, length, row, flush=True)
        if args.batch64:
            prompt = torch.randint(0, 32000, (64, 2048), device="cuda")
            generate = (lambda p, n: decoder.generate(p, n)) if decoder is not None else hf_generate
            ms = per_token_ms(generate, prompt, args.new_tokens)
            results.setdefault("batch64_tokens_per_s", {})[kind] = 64 * 1e3 / ms
        del model, decoder
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nDecoding, batch 1, greedy, 1.3B bf16 on {results['device']} (ms per token)")
    columns = [(kind, method) for kind in args.models for method in ("hf_generate", "cuda_graph")
               if method == "hf_generate" or kind == "ours"]
    print(f"{'prompt':>7} " + " ".join(f"{kind + ' ' + method:>18}" for kind, method in columns))
    for length in args.prompts:
        rows = results["ms_per_token"]
        print(f"{length:>7} " + " ".join(f"{rows[f'{kind}@{length}'][method]:>18.2f}" for kind, method in columns))
    if "batch64_tokens_per_s" in results:
        print("batch 64 tokens/s:", {k: round(v) for k, v in results["batch64_tokens_per_s"].items()})


if __name__ == "__main__":
    main()
