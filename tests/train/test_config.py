"""Settings: recipes, TOML files, flags, and the errors for settings that cannot describe a run."""

from __future__ import annotations

import argparse

import pytest

from gsa.cli import build_parser
from gsa.train.cli import config_as_toml, resolve
from gsa.train.config import RECIPES, TrainConfig, build_config


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_no_arguments_is_the_embedded_default():
    config = resolve(parse())
    assert config.recipe == "shakespeare-tiny"
    assert (config.model, config.tokenizer, config.data) == ("gsa-tiny", "bytes", ["shakespeare"])


def test_paper_recipe_is_the_papers_numbers():
    config = build_config("paper-1.3b")
    assert (config.model, config.tokenizer, config.seq_len) == ("gsa-1.3b", "mistral", 2048)
    assert (config.lr, config.min_lr, config.weight_decay) == (3e-4, 3e-5, 0.01)
    accum, global_batch = config.batch_layout(world_size=2)
    tokens_per_step = global_batch * config.seq_len
    assert config.warmup(tokens_per_step) * tokens_per_step == pytest.approx(1e9, rel=1e-3)  # 1B warm-up tokens
    assert config.steps * tokens_per_step == pytest.approx(100e9, rel=1e-3)  # 100B tokens
    assert accum * 2 * config.batch_size == global_batch


def test_file_sections_recipe_and_flags_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'recipe = "gsa-100m"\n[model]\nmodel_overrides = {num_slots = 32}\n[data]\ndata = "my.txt"\nseq_len = 512\n'
        "[optimizer]\nlr = 1\n[schedule]\nsteps = 40\n"
    )
    config = resolve(parse("--config", str(path), "--steps", "7", "--no-pack-documents"))
    assert config.recipe == "gsa-100m" and config.model == RECIPES["gsa-100m"]["model"]
    assert (config.seq_len, config.data, config.model_overrides) == (512, ["my.txt"], {"num_slots": 32})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.steps == 7 and config.pack_documents is False  # flags win over the file
    assert resolve(parse("--config", str(path), "--recipe", "t2r")).lr == 1.0  # the file wins over the recipe


def test_written_settings_read_back_unchanged(tmp_path):
    config = build_config("paper-1.3b", overrides={"sample_prompt": 'say "hi"\n', "model_overrides": {"num_slots": 8}})
    path = tmp_path / "out.toml"
    path.write_text(config_as_toml(config))
    assert build_config(file=path) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("[data]\nlr = 1\n", r"lr belong in \[optimizer\]"),
        ("[data]\nsequence_length = 1\n", "unknown training settings \\['sequence_length'\\]"),
        ("stepz = 3\n", "unknown training settings \\['stepz'\\]"),
        ("steps = \n", "not valid TOML"),
        ('recipe = "huge"\n', "unknown recipe 'huge'"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        build_config(file=path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr <= lr"),
        ({"precision": "fp8"}, "precision must be"),
        ({"parallel": "zero3"}, "parallel must be"),
        ({"warmup_steps": 3, "warmup_tokens": 100}, "not both"),
        ({"val_fraction": 1.5}, "val_fraction"),
    ],
)
def test_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=overrides)


def test_batch_layout():
    config = build_config(overrides={"batch_size": 4, "global_batch_size": 32})
    assert config.batch_layout(1) == (8, 32) and config.batch_layout(2) == (4, 32) and config.batch_layout(8) == (1, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        config.batch_layout(3)
    assert build_config(overrides={"batch_size": 4, "grad_accum": 3}).batch_layout(2) == (3, 24)
    with pytest.raises(ValueError, match="disagrees"):
        build_config(overrides={"batch_size": 4, "grad_accum": 3, "global_batch_size": 32}).batch_layout(1)


def test_a_later_layer_may_say_warmup_or_batch_the_other_way(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[schedule]\nwarmup_tokens = 5000\n")
    config = build_config("gsa-100m", file=path)  # the recipe gives warmup_steps
    assert (config.warmup_steps, config.warmup_tokens) == (None, 5000)
    config = build_config("paper-1.3b", overrides={"grad_accum": 2})  # the recipe gives global_batch_size
    assert config.global_batch_size is None and config.batch_layout(1) == (2, 2 * config.batch_size)
    with pytest.raises(ValueError, match="not both"):
        build_config(overrides={"warmup_steps": 3, "warmup_tokens": 100})  # one layer giving both is an error


def test_warmup_never_exceeds_the_run():
    assert build_config(overrides={"steps": 10, "warmup_steps": 30}).warmup(1000) == 10
    assert build_config(overrides={"steps": 100, "warmup_steps": None, "warmup_tokens": 2500}).warmup(1000) == 3


def test_every_flag_reaches_its_setting():
    """Each setting but the TOML-only table has a flag, and the flag sets it."""
    parser_actions = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert set(TrainConfig.__dataclass_fields__) - {"model_overrides", "recipe"} <= parser_actions
    assert resolve(parse("--data", "a", "b", "--seed", "5", "--eps", "1e-6")).data == ["a", "b"]


@pytest.mark.parametrize("parallel, world_size, cuda, precision, chosen", [
    ("auto", 1, False, "auto", "none"),   # one CPU process: nothing to manage
    ("auto", 1, True, "auto", "fsdp"),    # one GPU in bf16: FSDP2's mixed precision beats autocast (measured)
    ("auto", 1, True, "bf16", "fsdp"),
    ("auto", 1, True, "fp32", "none"),    # float32 on one GPU: no bf16 copies to make
    ("auto", 2, False, "auto", "fsdp"),
    ("ddp", 1, True, "auto", "none"),     # DDP of one process replicates nothing
    ("ddp", 2, True, "auto", "ddp"),
    ("none", 1, True, "auto", "none"),
    ("fsdp", 1, False, "auto", "fsdp"),
])
def test_parallel_auto_resolves_by_processes_device_and_precision(monkeypatch, parallel, world_size, cuda, precision,
                                                                  chosen):
    from gsa.train import trainer

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: cuda)
    config = build_config(overrides={"parallel": parallel, "precision": precision})
    assert trainer.choose_parallel(config) == chosen
