"""Training throughput and peak memory of finished `gsa train` runs, from their metrics.jsonl: one table.

    python benchmarks/train_throughput.py runs/fsdp-1.3b-2gpu runs/fsdp-1.3b-1gpu

The first quarter of the logged windows is left out (kernel compilation, autotuning, allocator warm-up); the
median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    if not train:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no training records yet")
    steady = train[len(train) // 4:]
    config = json.loads((run_dir / "train_config.json").read_text())
    per_process = sorted(r["tokens_per_s_per_process"] for r in steady)
    total = sorted(r["tokens_per_s"] for r in steady)
    return {
        "run": run_dir.name, "model": config["init_from"] or config["model"], "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"], "processes": round(total[len(total) // 2] / per_process[len(per_process) // 2]),
        "tokens_per_s": total[len(total) // 2], "tokens_per_s_per_process": per_process[len(per_process) // 2],
        "peak_gib": max(r["memory_gib"] for r in train), "last_loss": train[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    rows = [summarize(run) for run in parser.parse_args().runs]
    print(f"{'run':<28} {'model':<12} {'procs':>5} {'steps':>6} {'tokens/s':>12} {'tok/s/proc':>12} {'peak GiB':>9} "
          f"{'loss':>7}")
    for r in rows:
        print(f"{r['run']:<28} {r['model']:<12} {r['processes']:>5} {r['steps']:>6} {r['tokens_per_s']:>12,.0f} "
              f"{r['tokens_per_s_per_process']:>12,.0f} {r['peak_gib']:>9.1f} {r['last_loss']:>7.3f}")


if __name__ == "__main__":
    main()
