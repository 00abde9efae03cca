"""Plots for docs/performance.md from the JSON files the GPU benchmarks wrote (benchmarks/results/*_h200.json).

    python benchmarks/plot_results.py        # writes docs/img/*.png

The operator and training plots have FLA from the same process (training's Transformer++ too); the decoding plot's
FLA points come from session 15's run of FLA's model beside ours on the other GPU of the same machine
(decode_h200_fla.json), or from the spec's anchor when that file is missing, its Llama points and "products unfused"
line from session 16's run (decode_h200_v5.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

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
    """Every model of one bench_train.py run (ours in its variants, FLA's GSA and Llama in one process); FLA's
    anchors from the spec where the run has no FLA."""
    runs = data["runs"]
    contexts = sorted({int(k.split("@")[1]) for k in runs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    kinds = [("ours", "gsa"), ("ours-kept", "gsa, features kept"),
             ("ours-kept-states", "gsa, features and chunk states kept"),
             ("ours-norms-states", "gsa, norms' outputs and chunk states kept"), ("ours-plain", "gsa, plain layers"),
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
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3)  # below: no line hidden
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(IMAGES / "train_h200.png", dpi=120)


def with_cells(data, other, tables, kinds, rename=None):
    """data with another run's cells of these kinds (keys "kind@...") added to each of the tables they both have,
    a kind renamed where rename says (e.g. an earlier run's "ours" drawn as "unfused")."""
    rename = rename or {}
    for table in tables:
        if table not in data or table not in other:
            continue
        for key, value in other[table].items():
            kind, at, rest = key.partition("@")
            if at and kind in kinds:
                data[table][f"{rename.get(kind, kind)}@{rest}"] = value
    return data


def plot_decode(data):
    """Batch 1 ms/token by prompt length; beside it, when the run has them, batch 64 tokens/s by prompt length and a
    long generation's tokens/s at batch 1 and 64. A model is drawn at the prompt lengths it ran."""
    rows = data["ms_per_token"]
    prompts = sorted({int(k.split("@")[1]) for k in rows})
    batch64, long = data.get("batch64"), data.get("long")
    panels = 1 + bool(batch64) + bool(long)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    kinds = (("ours", "gsa, CUDA graph"), ("llama", "Llama SDPA, generate()"), ("fla", "FLA GSA, generate()"))
    # one colour a series in every panel
    colors = {"ours": "C0", "ours-hf": "C1", "llama": "C2", "fla": "C3", "unfused": "C4"}

    def cells(table, kind, key):  # (prompt, value) where the run has the cell (not out of memory, not skipped)
        found = [(p, table.get(f"{kind}@{p}", {}).get(key)) for p in prompts]
        return [(p, v) for p, v in found if v is not None]

    ax = axes[0]
    ax.plot(*zip(*cells(rows, "ours", "cuda_graph")), "o-", color=colors["ours"], label="gsa, CUDA graph")
    if unfused := cells(rows, "unfused", "cuda_graph"):
        ax.plot(*zip(*unfused), "o--", color=colors["unfused"], label="gsa, CUDA graph, products unfused (earlier)")
    ax.plot(*zip(*cells(rows, "ours", "hf_generate")), "o-", color=colors["ours-hf"], label="gsa, HF generate()")
    for kind, label in kinds[1:]:
        if found := cells(rows, kind, "hf_generate"):
            ax.plot(*zip(*found), "o-", color=colors[kind], label=label)
    if not any(k.startswith("fla@") for k in rows):
        ax.plot([2048], [FLA_ANCHORS["decode_2k_ms"]], "s", label="FLA GSA generate() (anchor)")
    ax.set_ylabel("ms per generated token")
    ax.set_title("1.3B decoding, batch 1, H200")
    if batch64:
        ax = axes[1]
        for kind, label in kinds:
            if found := cells(batch64, kind, "tokens_per_s"):
                ax.plot(*zip(*found), "o-", color=colors[kind], label=label)
        ax.set_ylabel("tokens / s")
        ax.set_title("1.3B decoding, batch 64, H200")
    for ax in axes[:1 + bool(batch64)]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(prompts, [f"{p // 1024}K" for p in prompts])
        ax.set_xlabel("prompt length")
    if long:
        ax = axes[-1]
        present = [(kind, label) for kind, label in kinds if f"{kind}@1" in long or f"{kind}@64" in long]
        width = 0.8 / len(present)
        for i, (kind, label) in enumerate(present):
            speeds = [long.get(f"{kind}@{b}", {}).get("tokens_per_s", 0) for b in (1, 64)]
            ax.bar([j + (i - (len(present) - 1) / 2) * width for j in range(2)], speeds, width, color=colors[kind],
                   label=label)
        ax.set_xticks([0, 1], ["batch 1", "batch 64"])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{long['new_tokens']} new tokens after {long['prompt']}, H200", fontsize=10)
    for ax in axes:
        ax.set_yscale("log")  # plain numbers, the minor ticks at 2 and 5 labelled too
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" * (f"{v:.0e}"[0] in "25")))
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 10)  # room for the legend above the lines
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(IMAGES / "decode_h200.png", dpi=120)


def read(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main():
    IMAGES.mkdir(parents=True, exist_ok=True)
    # the paper's three contexts from session 16's run; H=16 / K=128 from session 7's and H=32 / K=64 from a call of
    # its own (FLA's autotune there takes ~8 minutes)
    ops = read("ops_h200_fla_v5.json")
    if ops is not None:
        for extra in (read("ops_h200_fla_graph_v2.json"), read("ops_h200_fla_h32.json")):
            for name, shape in (extra or {}).get("shapes", {}).items():
                ops["shapes"].setdefault(name, shape)
        plot_ops(ops)
        print("plotted the operator")
    # session 21's run: ours in four settings, FLA's model and Transformer++ in one process
    if (train := read("train_h200_fla_v6.json")) is not None:
        plot_train(train)
        print("plotted training")
    # session 17's run (batch 1, 64 and the long generation, every product fused at batch 1), Llama's generate() and
    # the unfused products from session 16's (decode_h200_v5.json), FLA's model from session 15's
    if (decode := read("decode_h200_v6.json")) is not None:
        tables = ("ms_per_token", "batch64", "long")
        if (earlier := read("decode_h200_v5.json")) is not None:
            decode = with_cells(decode, earlier, tables, {"llama"})
            decode = with_cells(decode, earlier, ["ms_per_token"], {"ours"}, {"ours": "unfused"})
        if (fla := read("decode_h200_fla.json")) is not None:
            decode = with_cells(decode, fla, tables, {"fla"})
        plot_decode(decode)
        print("plotted decoding")


if __name__ == "__main__":
    main()
