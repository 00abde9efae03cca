"""`gsa generate`: streams exactly what greedy generate() produces, decoded."""

from __future__ import annotations

import pytest
import torch

from gsa.cli import main
from gsa.data import ByteTokenizer
from gsa.models import GSAForCausalLM, preset_config


def test_generate_command_streams_greedy_continuation(tmp_path, capsys):
    torch.manual_seed(0)
    model = GSAForCausalLM(preset_config("gsa-tiny", num_hidden_layers=1, hidden_size=64, num_slots=8)).eval()
    model.save_pretrained(tmp_path)
    tokenizer = ByteTokenizer()
    tokenizer.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("To be")]])
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=tokenizer.eos_id)
    continuation = want[0, prompt.shape[1]:].tolist()
    if tokenizer.eos_id in continuation:
        continuation = continuation[: continuation.index(tokenizer.eos_id)]
    assert continuation, "the model should generate something before an end token"
    assert printed == "To be" + tokenizer.decode(continuation) + "\n"


def test_commands_report_a_missing_model_folder_in_one_line(tmp_path, capsys, monkeypatch):
    """The model folder named wrong: one line naming it (not a traceback, not a tokenizer error), exit code 2."""
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "To be"]) == 2
    assert capsys.readouterr().err.strip() == (f"gsa generate: error: model {str(tmp_path / 'missing')!r} is not a "
                                               "folder; expected a folder with config.json and weights "
                                               "(GSA_TRACEBACK=1 shows where)")
    assert main(["generate", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("gsa convert: error: source checkpoint folder")
    assert main(["eval", "ppl", "--model", str(tmp_path / "missing"), "--corpus", "shakespeare"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    monkeypatch.setenv("GSA_TRACEBACK", "1")  # the traceback kept on request
    with pytest.raises(ValueError, match="is not a folder"):
        main(["generate", str(tmp_path / "missing")])
