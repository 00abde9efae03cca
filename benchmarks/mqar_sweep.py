"""The paper's MQAR sweep (Fig. 3a) on a GPU machine, without installing the package.

    python3 benchmarks/mqar_sweep.py --profile gpu --models gsa attention --widths 64 128 256 512 \
        --seq-len 512 --num-pairs 64 --vocab-size 8192 --lrs 3e-3 1e-2 --seeds 0 \
        --time-budget 300 --workers 8 --device cuda --output-dir results/mqar

(2 layers; 16 runs, 8 at a time, 150 s of training each, after a warm-up that is not counted: an estimated 7
minutes on one H200.) Same options as `gsa eval mqar` (see docs/evaluation.md); this entry point only puts src/
on the path (also for the spawned worker processes) and does not go through the top-level `gsa` command. Prints
one line per finished run (accuracy, steps taken of those planned, steps/s, warm-up seconds), then the accuracy
table by width with the paper's values (GSA 28 / 98 / 99 / 99 % at widths 64 / 128 / 256 / 512) and the check of
the target against them; writes mqar.json, mqar.md (that table) and mqar.png to --output-dir.
"""

import argparse
import os
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))  # spawned workers

if __name__ == "__main__":
    from gsa.eval import cli

    parser = argparse.ArgumentParser(prog="mqar_sweep.py")
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(["mqar", *sys.argv[1:]])))
