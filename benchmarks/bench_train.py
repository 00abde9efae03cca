"""GPU: whole-model training throughput and memory, 1.3B size, 16K tokens a step (paper Fig. 4a protocol).

    python benchmarks/bench_train.py                     # ours vs HF Llama (SDPA); --with-fla adds FLA's model
    python benchmarks/bench_train.py --models ours ours-plain --contexts 2048   # fused layers against plain PyTorch
    python benchmarks/bench_train.py --models ours ours-graph   # eager against the whole step in one CUDA graph
    python benchmarks/bench_train.py --models ours ours-autocast ours-packed   # what `gsa train` does differently
    python benchmarks/bench_train.py --models ours ours-kept   # GSA features kept for backward, not recomputed
    python benchmarks/bench_train.py --models ours-kept ours-kept-states   # chunk states kept too (ours-states: alone)
    python benchmarks/bench_train.py --models ours-kept-states ours-norms-states   # norms' outputs and states kept

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


KINDS = ("ours", "ours-plain", "ours-graph", "ours-autocast", "ours-packed", "ours-kept", "ours-states",
         "ours-kept-states", "ours-norms-states", "llama", "fla")


def build(kind: str):
    if kind.startswith("ours"):
        # ours-kept: φ(q), φ(k), swish(v) and the norms' outputs kept for backward (fewer row passes, more memory);
        # -norms: the norms' outputs only; -states: the operator's chunk states kept too (no state walk in backward)
        return GSAForCausalLM(preset_config("gsa-1.3b", recompute_features="kept" not in kind,
                                            recompute_states="states" not in kind,
                                            recompute_norms=False if "norms" in kind else None))
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


def cuda_model(kind: str):
    """The model, seeded, built on the GPU in bf16 (`ours-autocast`: float32, run under bf16 autocast)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build(kind)
    return model if kind == "ours-autocast" else model.to(torch.bfloat16)


def packed_boundaries(context: int, seed: int = 0) -> torch.Tensor:
    """cu_seqlens of the step's tokens as `gsa train` packs them: every row start, and document starts inside the
    rows (documents of 64 to 4096 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    cuts, position = {0, TOKENS_PER_STEP}, 0
    while position < TOKENS_PER_STEP:
        position += int(torch.randint(64, 4097, (1,), generator=gen))
        cuts.add(min(position, TOKENS_PER_STEP))
    cuts |= set(range(0, TOKENS_PER_STEP, context))
    return torch.tensor(sorted(cuts), device="cuda")


def measure(kind: str, context: int, steps: int, warmup: int, checkpointing: bool):
    """tokens/s and peak memory of forward + backward + AdamW steps. `ours-graph` replays the whole step (forward,
    backward, optimizer) as one CUDA graph: the same GPU work without the host's launches, which shows how much
    of the eager step is the host's (where the GPU waits for launches)."""
    model = cuda_model(kind)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    graphed = kind == "ours-graph"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True, capturable=graphed)
    batch = TOKENS_PER_STEP // context
    data = torch.randint(0, 32000, (warmup + steps, batch, context), device="cuda")
    step = make_step(kind, model, optimizer, context)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if graphed:
        run = graphed_step(step, data[0], max(warmup, 3))
    else:
        run = step
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = run(data[i])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": TOKENS_PER_STEP * steps / elapsed, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "loss": float(loss.detach())}
    del model, optimizer, data, loss, run
    gc.collect()
    torch.cuda.empty_cache()
    return result


def make_step(kind: str, model, optimizer, context: int):
    """step(ids): forward + backward + optimizer step of one batch as `kind` runs it; returns the loss.
    ours-autocast: the float32 weights and bf16 autocast of `gsa train` on one process; ours-packed: its documents
    packed with cu_seqlens (the step's tokens as one sequence of documents); ours-plain: the layers' plain PyTorch
    compositions."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=kind == "ours-autocast")
    cu_seqlens = packed_boundaries(context) if kind == "ours-packed" else None

    def step(ids):
        packing = {}
        if cu_seqlens is not None:
            ids, packing = ids.reshape(1, -1), {"cu_seqlens": cu_seqlens}
        with use_fused(kind != "ours-plain"), autocast:
            loss = model(input_ids=ids, labels=ids, **packing).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # captured too: backward then makes the gradients in the graph
        return loss

    return step


def graphed_step(step, example_ids: torch.Tensor, warmup: int):
    """step(ids) captured in a CUDA graph after `warmup` eager steps on a side stream (kernels compiled, launch
    configurations settled, gradients allocated); returns a function that copies ids into the graph's input
    and replays it, returning the graph's loss tensor."""
    static_ids = example_ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static_ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(static_ids)

    def replay(ids):
        static_ids.copy_(ids)
        graph.replay()
        return static_loss

    return replay


def count_saved(kind: str, context: int) -> dict:
    """Bytes autograd keeps for backward over one forward + loss (unique storages, parameters left out), per token
    per block: the GPU-side check of benchmarks/activation_memory.py's CPU count."""
    model = cuda_model(kind)
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


OPERATOR_KERNELS = ("_local_states", "_local_dstates", "_scan_slots", "_gate_factors", "_walk_states", "_walk_dstates",
                    "_join_segments", "_output_fwd", "_intra_bwd", "_state_grads_bwd")
ROW_KERNELS = ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
               "_slot_gates_fwd_kernel", "_slot_gates_bwd_kernel", "_swish_fwd_kernel", "_swish_bwd_kernel",
               "_cross_entropy_kernel")


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if any(k in name for k in OPERATOR_KERNELS):
        return "GSA operator (Triton)"
    if any(k in name for k in ROW_KERNELS):
        return "norm / SwiGLU / swish / gate / loss rows (Triton)"
    if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul")):
        return "matrix products"
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention (SDPA)"
    if "adam" in lowered or "multi_tensor" in lowered or "foreach" in lowered:
        return "optimizer"
    return "other (elementwise, copies, reductions)"


def profile_step(kind: str, context: int, steps: int = 2) -> dict:
    """GPU time per training step by kernel group, next to the wall time: where a step's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = cuda_model(kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    data = torch.randint(0, 32000, (steps + 1, TOKENS_PER_STEP // context, context), device="cuda")
    step = make_step(kind, model, optimizer, context)
    step(data[steps])  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(data[i])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    groups: dict[str, float] = {}
    kernels: dict[str, float] = {}
    ops: dict[str, float] = {}  # the torch operators that launched the kernels (aten::copy_, aten::add_, ...)
    fields = ("device_time_total", "self_device_time_total", "cuda_time_total", "self_cuda_time_total")
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False) or event.key.startswith("Optimizer."):
            continue  # a range on the GPU's timeline (the optimizer step's), not a kernel: its kernels count already
        if event.device_type != DeviceType.CUDA:
            self_fields = ("self_device_time_total", "self_cuda_time_total")
            own = max((getattr(event, field, 0.0) or 0.0) for field in self_fields) / 1e3 / steps
            if own > 0:
                ops[event.key[:60]] = ops.get(event.key[:60], 0.0) + own
            continue
        ms = max((getattr(event, field, 0.0) or 0.0) for field in fields) / 1e3 / steps
        groups[kernel_group(event.key)] = groups.get(kernel_group(event.key), 0.0) + ms
        kernels[event.key[:90]] = kernels.get(event.key[:90], 0.0) + ms
    del model, optimizer, data
    gc.collect()
    torch.cuda.empty_cache()
    # the elementwise operators by input shapes: which tensors the copies and additions run over
    shaped: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.device_type == DeviceType.CUDA or not event.key.startswith(("aten::copy_", "aten::add", "aten::mul")):
            continue
        own = max((getattr(event, field, 0.0) or 0.0) for field in ("self_device_time_total", "self_cuda_time_total"))
        if own > 0:
            shaped[f"{event.key} {str(event.input_shapes)[:70]}"] = own / 1e3 / steps
    busy = sum(groups.values())
    return {"wall_ms_profiled": wall * 1e3, "gpu_busy_ms": busy, "gpu_idle_ms": wall * 1e3 - busy,
            "gpu_ms_by_group": dict(sorted(groups.items(), key=lambda x: -x[1])),
            "top_kernels_ms": dict(sorted(kernels.items(), key=lambda x: -x[1])[:40]),
            "top_ops_ms": dict(sorted(ops.items(), key=lambda x: -x[1])[:30]),
            "elementwise_by_shape_ms": dict(sorted(shaped.items(), key=lambda x: -x[1])[:20])}


def save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ours", "llama"])
    parser.add_argument("--with-fla", action="store_true")
    parser.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--count-saved", action="store_true",
                        help="also count the bytes saved for backward (at the first context)")
    parser.add_argument("--profile", action="store_true",
                        help="also print GPU time per step by kernel group (at the first context)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "train_h200.json"))
    args = parser.parse_args()
    models = args.models + (["fla"] if args.with_fla else [])
    unknown = [m for m in models if m not in KINDS]
    if unknown:  # the ours-* settings are read off the name: a misspelt one would run another setting
        parser.error(f"unknown model kinds {unknown}; expected some of {list(KINDS)}")
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
            if args.count_saved and kind != "fla" and context == args.contexts[0]:
                results["runs"][key].update(count_saved(kind, context))
            print(key, results["runs"][key], flush=True)
            save(results, args.out)  # after every run: a capped call still brings back what it measured
    if args.profile:
        # profile_step runs these as measured
        for kind in [m for m in models if m not in ("fla", "ours-graph")]:
            result = profile_step(kind, args.contexts[0])
            results.setdefault("profile", {})[f"{kind}@{args.contexts[0]}"] = result
            print(f"\n{kind} @ {args.contexts[0]}: {result['wall_ms_profiled']:.1f} ms a step (wall, profiled), "
                  f"GPU busy {result['gpu_busy_ms']:.1f}; GPU ms by kernel group:")
            for group, ms in result["gpu_ms_by_group"].items():
                print(f"  {ms:8.1f}  {group}")
            for name, ms in list(result["top_kernels_ms"].items())[:8]:
                print(f"  {ms:8.1f}    {name}")
            print("  GPU ms by the torch operator that launched it:")
            for name, ms in list(result["top_ops_ms"].items())[:10]:
                print(f"  {ms:8.1f}    {name}")
    save(results, args.out)
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
