"""Plots for docs/performance.md from the JSON files the GPU benchmarks wrote (benchmarks/results/*_h200.json).

    python benchmarks/plot_results.py        # writes docs/img/*.png

The operator and training plots have FLA from the same process; the decoding plot's FLA point is the spec's anchor
measured on the same GPU model and software.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMAGES = Path(__file__).parent.parent / "docs" / "img"
FLA_ANCHORS = {  # ../shared/spec/benchmarks.md, H200, FLA 0.6.0, torch 2.11, triton 3.6
    "train": {2048: 51_100, 8192: 53_900},
    "decode_2k_ms": 56.0,
}


def plot_ops(data):
    """Ours (the state pass `auto` picks), FLA chunk_gsa and SDPA replayed from CUDA graphs (GPU time without the
    host's launch gaps), one process, same inputs (bench_ops.py --graph with FLA installed)."""
    shapes = data["shapes"]
    names = list(shapes)
    peers = [("gsa (Triton)", "ours_ms"), ("FLA chunk_gsa", "fla_gsa_ms"), ("SDPA flash, causal", "sdpa_ms")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.27
    for ax, key, title in zip(axes, ("forward", "forward_backward"), ("forward", "forward + backward")):
        x = range(len(names))
        for i, (label, peer) in enumerate(peers):
            times = [shapes[s].get(peer, {}).get(f"{key}_graph", 0) for s in names]
            ax.bar([j + (i - 1) * width for j in x], times, width, label=label)
        ax.set_xticks(list(x), names, rotation=15)
        ax.set_ylabel("ms (CUDA graph replay)")
        ax.set_title(f"GSA operator, {title}, bf16, 16K tokens", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMAGES / "ops_h200.png", dpi=120)


def plot_train(data):
    """Every model of one bench_train.py run (train_h200_fla.json: ours, ours with features kept, Llama and FLA's
    GSA in one process); FLA's anchors from the spec where the run has no FLA."""
    runs = data["runs"]
    contexts = sorted({int(k.split("@")[1]) for k in runs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    kinds = [("ours", "gsa"), ("ours-kept", "gsa, features kept"), ("ours-plain", "gsa, plain layers"),
             ("llama", "Transformer++ (HF Llama, SDPA)"), ("fla", "FLA GSA")]
    for kind, label in kinds:
        if not all(f"{kind}@{c}" in runs for c in contexts):
            continue
        axes[0].plot(contexts, [runs[f"{kind}@{c}"]["tokens_per_s"] / 1e3 for c in contexts], "o-", label=label)
        axes[1].plot(contexts, [runs[f"{kind}@{c}"]["peak_gib"] for c in contexts], "o-", label=label)
    if not any(k.startswith("fla@") for k in runs):
        axes[0].plot(list(FLA_ANCHORS["train"]), [v / 1e3 for v in FLA_ANCHORS["train"].values()], "s--",
                     label="FLA GSA (anchor)")
        axes[1].axhline(37.0, ls="--", color="gray", label="FLA GSA at 2K (anchor)")
    for ax, ylabel in zip(axes, ("K tokens / s", "peak GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (16K tokens a step)")
        ax.set_ylabel(ylabel)
    axes[0].set_title("1.3B training throughput, H200")
    axes[1].set_title("1.3B training peak memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMAGES / "train_h200.png", dpi=120)


def plot_decode(data):
    """Batch 1 ms/token by prompt length; beside it, when the run has it, batch 64 tokens/s by prompt length."""
    rows = data["ms_per_token"]
    prompts = sorted({int(k.split("@")[1]) for k in rows})
    batch64 = data.get("batch64")
    fig, axes = plt.subplots(1, 2 if batch64 else 1, figsize=(11 if batch64 else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(prompts, [rows[f"ours@{p}"]["cuda_graph"] for p in prompts], "o-", label="gsa, CUDA graph")
    ax.plot(prompts, [rows[f"ours@{p}"]["hf_generate"] for p in prompts], "o-", label="gsa, HF generate()")
    for kind, label in (("llama", "Llama SDPA, generate()"), ("fla", "FLA GSA, generate()")):
        if all(f"{kind}@{p}" in rows for p in prompts):
            ax.plot(prompts, [rows[f"{kind}@{p}"]["hf_generate"] for p in prompts], "o-", label=label)
    if not any(k.startswith("fla@") for k in rows):
        ax.plot([2048], [FLA_ANCHORS["decode_2k_ms"]], "s", label="FLA GSA generate() (anchor)")
    ax.set_yscale("log")
    ax.set_ylabel("ms per generated token")
    ax.set_title("1.3B decoding, batch 1, H200")
    if batch64:
        ax = axes[0][1]
        for kind, label in (("ours", "gsa, CUDA graph"), ("llama", "Llama SDPA, generate()"),
                            ("fla", "FLA GSA, generate()")):
            cells = [(p, batch64.get(f"{kind}@{p}", {}).get("tokens_per_s")) for p in prompts]
            cells = [(p, v) for p, v in cells if v is not None]  # out of memory or not run
            if cells:
                ax.plot(*zip(*cells), "o-", label=label)
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s")
        ax.set_title("1.3B decoding, batch 64, H200")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMAGES / "decode_h200.png", dpi=120)


def read(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main():
    IMAGES.mkdir(parents=True, exist_ok=True)
    ops, heads = read("ops_h200_fla_graph_v2.json"), read("ops_h200_fla_h32.json")
    if ops is not None:
        if heads is not None:  # H=32 / K=64 came from a call of its own (FLA's autotune there takes ~8 minutes)
            ops["shapes"].update(heads["shapes"])
        plot_ops(ops)
        print("plotted the operator")
    if (train := read("train_h200_fla.json")) is not None:
        plot_train(train)
        print("plotted training")
    if (decode := read("decode_h200_v2.json")) is not None:
        plot_decode(decode)
        print("plotted decoding")


if __name__ == "__main__":
    main()
