"""Tiny models and the byte tokenizer shared by the evaluation tests (random weights: fast, deterministic)."""

import pytest
import torch

from gsa.data import BYTE_VOCAB_SIZE, ByteTokenizer
from gsa.models import GSAConfig, GSAForCausalLM


def tiny_model(attention: bool = False, seed: int = 0, dtype=torch.float32) -> GSAForCausalLM:
    torch.manual_seed(seed)
    config = GSAConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8,
        intermediate_size=64, attn={"layers": [0, 1], "num_heads": 2} if attention else None,
    )
    return GSAForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and a second thread that waits on a core other jobs hold makes
    every small op slow (30x seen on the shared 2-core machine); restored after the evaluation tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def gsa_model():
    return tiny_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny GSA model with its tokenizer, as `gsa eval` commands read it."""
    folder = tmp_path_factory.mktemp("tiny-gsa")
    tiny_model(seed=1).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def run_eval(argv: list[str]) -> int:
    """`gsa eval ARGV...` through the top-level CLI, as a user runs it: the exit status (errors go to stderr)."""
    from gsa.cli import main

    return main(["eval", *argv])
