"""GPU: whole-model training throughput and memory, 1.3B size, 16K tokens a step (paper Fig. 4a protocol).

    python benchmarks/bench_train.py                     # ours vs HF Llama (SDPA); --with-fla adds FLA's model
    python benchmarks/bench_train.py --models ours ours-plain --contexts 2048   # fused layers against plain PyTorch

Forward + backward + fused AdamW step, bf16 weights, random tokens, contexts 2K x 8, 4K x 4, 8K x 2, 16K x 1.
Prints one table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from gsa.layers.fused import use_fused
from gsa.models import GSAForCausalLM, preset_config

CONTEXTS = (2048, 4096, 8192, 16384)
TOKENS_PER_STEP = 16384


def build(kind: str):
    if kind in ("ours", "ours-plain"):
        return GSAForCausalLM(preset_config("gsa-1.3b"))
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                             intermediate_size=5632, vocab_size=32000, max_position_embeddings=16384,
                             rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    if kind == "fla":
        from fla.models import GSAConfig as FLAConfig
        from fla.models import GSAForCausalLM as FLAModel

        return FLAModel(FLAConfig(hidden_size=2048, num_hidden_layers=24, num_heads=4, num_slots=64,
                                  vocab_size=32000))
    raise ValueError(kind)


def measure(kind: str, context: int, steps: int, warmup: int, checkpointing: bool):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build(kind).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    batch = TOKENS_PER_STEP // context
    data = torch.randint(0, 32000, (warmup + steps, batch, context), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with use_fused(kind != "ours-plain"):  # ours-plain: the layers' plain PyTorch compositions
            loss = model(input_ids=data[i], labels=data[i]).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": TOKENS_PER_STEP * steps / elapsed, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "loss": float(loss)}
    del model, optimizer, data, loss
    gc.collect()
    torch.cuda.empty_cache()
    return result


def count_saved(kind: str, context: int) -> dict:
    """Bytes autograd keeps for backward over one forward + loss (unique storages, parameters left out), per token
    per block: the GPU-side check of benchmarks/activation_memory.py's CPU count."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build(kind).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = TOKENS_PER_STEP // context
    data = torch.randint(0, 32000, (batch, context), device="cuda")
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with use_fused(kind != "ours-plain"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=data, labels=data).loss
    blocks = model.config.num_hidden_layers
    result = {"saved_gib": sum(storages.values()) / 2**30,
              "bytes_per_token_per_block": sum(storages.values()) / TOKENS_PER_STEP / blocks}
    del model, loss, data
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ours", "llama"])
    parser.add_argument("--with-fla", action="store_true")
    parser.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--count-saved", action="store_true", help="also count the bytes saved for backward")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "train_h200.json"))
    args = parser.parse_args()
    models = args.models + (["fla"] if args.with_fla else [])
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens_per_step": TOKENS_PER_STEP,
               "runs": {}}
    for kind in models:
        for context in args.contexts:
            key = f"{kind}@{context}"
            try:
                results["runs"][key] = measure(kind, context, args.steps, args.warmup, args.checkpointing)
            except torch.OutOfMemoryError:
                results["runs"][key] = {"error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            if args.count_saved and kind != "fla":
                results["runs"][key].update(count_saved(kind, context))
            print(key, results["runs"][key], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n1.3B training, {TOKENS_PER_STEP} tokens/step, bf16, fused AdamW on {results['device']}")
    print(f"{'context':>8} " + " ".join(f"{m + ' tok/s':>14} {m + ' GiB':>10}" for m in models))
    for context in args.contexts:
        cells = []
        for kind in models:
            r = results["runs"].get(f"{kind}@{context}", {})
            cells += [f"{r.get('tokens_per_s', 0):>14.0f}", f"{r.get('peak_gib', 0):>10.1f}"]
        print(f"{context:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
