"""`gsa eval ppl` end to end (files, bundled corpora, a model saved with a bare SentencePiece tokenizer.model), and
what the eval command says about bad input."""

import importlib.util
import json
import math

import pytest
import torch

from gsa.data import load_tokenizer
from gsa.models import GSAConfig, GSAForCausalLM
from tests.eval.conftest import run_eval

has_mistral = importlib.util.find_spec("mistral_common") is not None


def test_ppl_command_scores_files_and_writes_per_document_json(model_dir, tmp_path, capsys):
    files = []
    for name, text in (("a.txt", "Shall I compare thee to a summer's day?\n" * 3), ("b.txt", "Thou art more lovely")):
        files.append(tmp_path / name)
        files[-1].write_text(text)
    lines = tmp_path / "c.jsonl"  # JSON lines: one document a line, as gsa train --data reads them
    lines.write_text(json.dumps({"text": "And summer's lease"}) + "\n" + json.dumps({"text": "hath all too short"}))
    output = tmp_path / "ppl.json"
    argv = ["ppl", "--model", str(model_dir), "--files", *map(str, files), str(lines), "--max-length", "32",
            "--stride", "16", "--device", "cpu", "--output", str(output)]
    assert run_eval(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads(output.read_text())
    in_lines = len("And summer's lease") + len("hath all too short")
    assert report["tokens"] == report["bytes"] == sum(len(f.read_bytes()) for f in files) + in_lines
    assert report["stride"] == 16 and report["documents"] == 4 and len(report["per_document"]) == 4
    assert report["bits_per_byte"] == pytest.approx(math.log2(report["perplexity"]))


def test_ppl_command_reads_a_bundled_corpus_in_part(model_dir, capsys):
    argv = ["ppl", "--model", str(model_dir), "--corpus", "shakespeare", "--max-documents", "2", "--max-chars", "300",
            "--max-length", "128", "--device", "cpu"]
    assert run_eval(argv) == 0
    assert "600 tokens, 600 bytes, 2 documents" in capsys.readouterr().out


@pytest.mark.skipif(not has_mistral, reason="mistral-common not installed")
def test_ppl_of_a_model_saved_with_only_a_sentencepiece_tokenizer_model(tmp_path, capsys):
    """`gsa train --tokenizer mistral` saves tokenizer.model alone beside the weights; eval reads it as it is."""
    tokenizer = load_tokenizer("mistral")
    torch.manual_seed(0)
    config = GSAConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_heads=1, num_slots=4,
                       intermediate_size=32)
    GSAForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    text = tmp_path / "verse.txt"
    text.write_text("Double, double toil and trouble; fire burn and cauldron bubble.")
    output = tmp_path / "ppl.json"
    assert run_eval(["ppl", "--model", str(tmp_path), "--files", str(text), "--device", "cpu",
                     "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["tokens"] == len(tokenizer.encode(text.read_text())) < report["bytes"]
    # a random model over 32000 tokens: about uniform
    assert 0.5 * tokenizer.vocab_size < report["perplexity"] < 2 * tokenizer.vocab_size


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ppl", "--corpus", "wiki"], "gsa eval ppl: error: unknown corpus 'wiki'; expected one of shakespeare"),
        (["ppl", "--files", "absent.txt"], "data source 'absent.txt' is neither a bundled corpus"),
        (["ppl", "--corpus", "shakespeare", "--tokenizer", "nonsense"], "unknown tokenizer 'nonsense'"),
        (["mqar", "--profile", "tpu"], "gsa eval mqar: error: unknown MQAR profile 'tpu'"),
    ],
)
def test_bad_input_is_one_line_naming_it(model_dir, capsys, argv, message):
    if argv[0] == "ppl":
        argv = [*argv, "--model", str(model_dir), "--device", "cpu"]
    assert run_eval(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_without_an_evaluation_prints_its_usage(capsys):
    assert run_eval([]) == 2
    assert "gsa eval {ppl,mqar,harness,recall}" in capsys.readouterr().out
