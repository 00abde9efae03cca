"""Tiny models and a byte tokenizer shared by the evaluation tests (random weights: fast, deterministic)."""

import pytest
import torch

from gsa.eval.loading import BYTE_VOCAB_SIZE, byte_tokenizer
from gsa.models import GSAConfig, GSAForCausalLM


def tiny_model(attention: bool = False, seed: int = 0, dtype=torch.float32) -> GSAForCausalLM:
    torch.manual_seed(seed)
    config = GSAConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8,
        intermediate_size=64, attn={"layers": [0, 1], "num_heads": 2} if attention else None,
    )
    return GSAForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def gsa_model():
    return tiny_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny GSA model with its tokenizer, as `gsa eval` commands read it."""
    folder = tmp_path_factory.mktemp("tiny-gsa")
    tiny_model(seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_eval(argv: list[str]) -> int:
    """`gsa eval ARGV...` through the eval command's own parser (the top-level CLI lists other commands too)."""
    import argparse

    from gsa.eval import cli

    parser = argparse.ArgumentParser(prog="gsa eval")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))
