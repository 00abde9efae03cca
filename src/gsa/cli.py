"""`gsa <command>`: the command-line entry point (also `python -m gsa`).

Each command lives beside the code it drives, in a module with `add_arguments(parser)` and `run(args) -> int`;
this file only lists them, so importing the CLI stays cheap and a command's heavy imports happen when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

COMMANDS = {
    "train": ("gsa.train.cli", "pretrain or finetune a GSA model (no arguments: a tiny model on Shakespeare, CPU)"),
    "generate": ("gsa.generation", "stream a model's continuation of a prompt to the terminal"),
    "convert": ("gsa.models.t2r", "turn a pretrained Llama/Mistral checkpoint into a GSA checkpoint (T2R)"),
    "eval": ("gsa.eval.cli", "perplexity, MQAR recall, lm-eval-harness tasks, synthetic recall suite"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa",
                                     description="Gated Slot Attention: train, convert, evaluate, generate.")
    parser.add_argument("--version", action="version", version=f"gsa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
            continue  # a command whose module is not part of this installation
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Bad input (the library's checks raise ValueError or FileNotFoundError naming what was wrong
    and what was expected) is one line on stderr and exit code 2, as argparse reports its own errors; anything else
    keeps its traceback, and GSA_TRACEBACK=1 keeps it for these too (a ValueError from deeper down is not always
    bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        if os.environ.get("GSA_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"gsa {args.command}: error: {error} (GSA_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
