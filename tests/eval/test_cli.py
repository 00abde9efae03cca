"""`gsa eval ppl` end to end, and what the eval command says about bad input."""

import json
import math

import pytest

from tests.eval.conftest import run_eval


def test_ppl_command_scores_files_and_writes_per_document_json(model_dir, tmp_path, capsys):
    files = []
    for name, text in (("a.txt", "Shall I compare thee to a summer's day?\n" * 3), ("b.txt", "Thou art more lovely")):
        files.append(tmp_path / name)
        files[-1].write_text(text)
    output = tmp_path / "ppl.json"
    argv = ["ppl", "--model", str(model_dir), "--files", *map(str, files), "--max-length", "32", "--stride", "16",
            "--device", "cpu", "--output", str(output)]
    assert run_eval(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["tokens"] == report["bytes"] == sum(len(f.read_bytes()) for f in files)
    assert report["stride"] == 16 and report["documents"] == 2 and len(report["per_document"]) == 2
    assert report["bits_per_byte"] == pytest.approx(math.log2(report["perplexity"]))


def test_ppl_command_reads_a_bundled_corpus_in_part(model_dir, capsys):
    argv = ["ppl", "--model", str(model_dir), "--corpus", "shakespeare", "--max-documents", "2", "--max-chars", "300",
            "--max-length", "128", "--device", "cpu"]
    assert run_eval(argv) == 0
    assert "600 tokens, 600 bytes, 2 documents" in capsys.readouterr().out


def test_bad_input_is_named(model_dir, capsys):
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        run_eval(["ppl", "--model", str(model_dir), "--corpus", "wiki", "--device", "cpu"])
    with pytest.raises(ValueError, match="unknown MQAR profile 'tpu'"):
        run_eval(["mqar", "--profile", "tpu"])
    assert run_eval([]) == 2
    assert "gsa eval {ppl,mqar,harness,recall}" in capsys.readouterr().out
