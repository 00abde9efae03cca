"""The paper's MQAR sweep (Fig. 3a) on a GPU machine, without installing the package.

    python3 benchmarks/mqar_sweep.py --profile gpu --workers 8 --output-dir $OUT/mqar

Same options as `gsa eval mqar` (see docs/evaluation.md); this entry point only puts src/ on the path (also for the
worker processes) and does not go through the top-level `gsa` command, so it needs nothing but the eval package.
Prints one line per finished run, then the accuracy table by width next to the paper's; writes mqar.json and
mqar.png.
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
