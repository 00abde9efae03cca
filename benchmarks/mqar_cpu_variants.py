"""MQAR on the CPU at a size where the loss plateau shows within minutes: which GSA model variants leave it sooner.

The `cpu` profile's task (seq 64, 8 pairs, vocab 256, Zoology's mixture of sizes), GSA at width 64, a fixed
schedule (no time budget: reproducible), one thread a process. Each variant is a model option of the sweep:

    python benchmarks/mqar_cpu_variants.py --variant default --seeds 0 1 2 > default.jsonl &
    python benchmarks/mqar_cpu_variants.py --variant fla-conv --seeds 0 1 2 > fla-conv.jsonl &   # ~9 min a run

Prints one JSON line per run: test accuracy (%) and the validation accuracy every 100 steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gsa.eval.mqar_sweep import PROFILES, MQARRun, TrainSettings, train_and_test, with_overrides

VARIANTS = {
    "default": {},
    "fla-conv": {"conv_init_std": 0.02},  # FLA's draw of the short convolutions' weights
    "tau32": {"gate_damping": 32.0},  # slower forgetting at initialisation
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, default="default")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = with_overrides(PROFILES["cpu"], gsa_backend="torch", **VARIANTS[args.variant])
    settings = TrainSettings(steps=args.steps, batch_size=64, eval_every=100, test_examples=512, stop_accuracy=1.01)
    for seed in args.seeds:
        started = time.time()
        result = train_and_test(MQARRun("gsa", 64, args.lr, seed), sweep.task, settings, sweep.options, "cpu")
        history = [(h["step"], round(h["validation_accuracy"] * 100, 1)) for h in result["history"]]
        print(json.dumps({"variant": args.variant, "lr": args.lr, "seed": seed,
                          "accuracy": round(result["accuracy"] * 100, 1), "seconds": round(time.time() - started),
                          "validation": history}), flush=True)


if __name__ == "__main__":
    main()
