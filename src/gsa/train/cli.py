"""`gsa train`: pretrain or finetune a GSA model. With no arguments: gsa-tiny on Shakespeare bytes, on CPU, in a
few minutes. Under `torchrun --nproc_per_node=N` the same command shards the model over N processes (FSDP2)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import DEFAULT_RECIPE, FIELDS, RECIPES, TrainConfig, build_config

# settings that are not plain flags: a table (TOML only), and the two handled below
NOT_FLAGS = {"model_overrides", "recipe", "resume"}


def _flag_type(annotation: str):
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("list", list)):
        if annotation.startswith(name):
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Settings come from the recipe, then --config FILE, then flags. Examples:\n"
        "  gsa train                                        # the embedded default (CPU, a few minutes)\n"
        "  gsa train --recipe gsa-100m --data shakespeare bible-kjv --steps 3000\n"
        "  torchrun --nproc_per_node=2 -m gsa train --recipe paper-1.3b --data corpus/ --steps 200\n"
        "  gsa train --resume runs/NAME                     # continue exactly where a run stopped\n"
        "See docs/training.md."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (see docs/training.md)")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help=f"named starting settings (default {DEFAULT_RECIPE}, the embedded default)")
    parser.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="PATH",
                        help="continue a run from its newest checkpoint: a run folder, a checkpoint folder, or nothing "
                             "(the run named by --run-dir / --name); its settings are reused, flags change them")
    parser.add_argument("--show-config", action="store_true", help="print the resolved settings as TOML and exit")
    groups = {}
    for name, spec in FIELDS.items():
        if name in NOT_FLAGS:
            continue
        section = spec.metadata["section"]
        group = groups.setdefault(section, parser.add_argument_group(f"[{section}]"))
        kind = _flag_type(str(spec.type))
        flag = "--" + name.replace("_", "-")
        help_text = spec.metadata["help"]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="SOURCE", help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_as_toml(config: TrainConfig) -> str:
    """The settings as a TOML file `--config` reads back (unset optional settings are left out)."""
    lines, section = [], None
    for name, spec in FIELDS.items():
        value = getattr(config, name)
        if value is None or name == "resume":
            continue
        if name == "recipe":
            lines.insert(0, f"recipe = {_toml_value(value)}")
            continue
        if spec.metadata["section"] != section:
            section = spec.metadata["section"]
            lines.append(f"\n[{section}]")
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The run's settings from the parsed arguments (a resumed run starts from the settings it was saved with)."""
    from .trainer import RUNS_DIR, find_checkpoint, read_saved_settings, run_dir_of

    overrides = {name: value for name, value in vars(args).items() if name in FIELDS and name not in NOT_FLAGS}
    base = None
    resume = getattr(args, "resume", None)
    if resume is not None:
        run_dir = overrides.get("run_dir") or (RUNS_DIR / overrides["name"] if overrides.get("name") else None)
        checkpoint = find_checkpoint(resume, run_dir)
        base = read_saved_settings(checkpoint)
        base.pop("resume", None)
        overrides["resume"] = str(checkpoint)
        overrides.setdefault("run_dir", str(run_dir_of(checkpoint)))
    return build_config(recipe=args.recipe, file=args.config, overrides=overrides, base=base)


def _report(result) -> None:
    rule = "-" * 72
    print(rule)
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.4f} nats/token | perplexity {result.val_perplexity:.3f} "
              f"(step {result.step}, {result.tokens_seen:,} tokens seen, {result.train_seconds:.0f} s of training)")
    if result.sample is not None:
        print(f"sample:\n{rule}\n{result.sample}\n{rule}")
    print(f"run folder   {result.run_dir}")
    print(f"  model      {result.model_dir}  (GSAForCausalLM.from_pretrained; the tokenizer is saved beside it)")
    print(f"  checkpoints {result.run_dir / 'checkpoints'}")
    print(f"  metrics    {result.metrics_file}")
    if result.loss_plot is not None:
        print(f"  loss plot  {result.loss_plot}")
    print(f"continue with: gsa train --resume {result.run_dir} --steps N")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .trainer import TrainingInterrupted

    try:
        config = resolve(args)
        if args.show_config:
            print(config_as_toml(config), end="")
            return 0
        from .trainer import train

        result = train(config)
    except (ValueError, FileNotFoundError) as error:
        kind = "checkpoint error" if isinstance(error, CheckpointError) else "error"
        print(f"gsa train: {kind}: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"gsa train: {stop}", file=sys.stderr)
        return 130  # the shell's code for a run stopped by Ctrl-C
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
        print("gsa train: stopped by Ctrl-C; the newest checkpoint, if any, is where --resume continues",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        _report(result)
    return 0
