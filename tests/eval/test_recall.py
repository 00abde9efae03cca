"""The recall suite: examples fit their lengths and hold their answers; scoring and the command run on tiny models."""

import json
import random

import pytest

from gsa.eval.recall import (
    NEEDLE_QUESTION, RecallSettings, build_examples, evaluate_recall, format_tables, needle_example, phonebook_example,
)
from tests.eval.conftest import run_eval, tiny_model


def tokens(tokenizer, text):
    return len(tokenizer.encode(text))


@pytest.mark.parametrize("length", [128, 512])
def test_phonebook_prompts_fit_and_ask_for_an_entry_of_the_book(tokenizer, length):
    example = phonebook_example(tokenizer, length, random.Random(0))
    assert tokens(tokenizer, example.prompt + example.answer) <= length
    asked = example.prompt.rsplit("\n", 1)[1]
    assert f"{asked}{example.answer}\n" in example.prompt  # the entry is in the book, with this number
    assert tokens(tokenizer, example.prompt + example.answer) > length - 60  # less room left than two entries


def test_needles_sit_at_their_depth_inside_a_haystack_of_the_right_length(tokenizer):
    haystack = [f"line {i} of the play" for i in range(5000)]
    for depth in (0.0, 0.5, 1.0):
        example = needle_example(tokenizer, 512, depth, haystack, random.Random(1))
        assert 400 < tokens(tokenizer, example.prompt + example.answer) <= 512
        body = example.prompt.removesuffix(NEEDLE_QUESTION)
        where = body.index("The secret number is") / len(body)
        assert abs(where - depth) < 0.1
        assert f"The secret number is{example.answer}." in body


def test_examples_are_seeded_so_models_see_the_same_ones(tokenizer):
    settings = RecallSettings(lengths=(128,), examples=3, depths=(0.5,))
    first = build_examples("needle", tokenizer, settings)
    assert first == build_examples("needle", tokenizer, settings)
    with pytest.raises(ValueError, match="unknown recall task 'copying'"):
        build_examples("copying", tokenizer, settings)
    with pytest.raises(ValueError, match="lengths must be"):
        RecallSettings(lengths=(16,))


def test_scores_are_fractions_for_each_length_and_depth(gsa_model, tokenizer):
    settings = RecallSettings(lengths=(96, 128), examples=2, depths=(0.0, 1.0), batch_size=2)
    result = evaluate_recall(gsa_model, tokenizer, settings)
    assert len(result["results"]["phonebook"]) == 2 and len(result["results"]["needle"]) == 4
    for rows in result["results"].values():
        for row in rows:
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["token_accuracy"] <= 1 and row["examples"] == 2
    table = format_tables({"gsa": result, "copy": result})
    assert "phonebook (len)" in table and "needle (len)" in table


def test_recall_command_compares_two_models_side_by_side(model_dir, tmp_path, capsys):
    attention_dir = tmp_path / "tiny-attention"
    tiny_model(attention=True).save_pretrained(attention_dir)
    output = tmp_path / "out"
    argv = ["recall", "--model", str(model_dir), "--model", str(attention_dir), "--tokenizer", "bytes",
            "--label", "gsa", "--label", "attention", "--lengths", "96", "--examples", "2", "--depths", "0.5",
            "--device", "cpu", "--output-dir", str(output)]
    assert run_eval(argv) == 0
    assert "attention" in capsys.readouterr().out
    report = json.loads((output / "recall.json").read_text())
    assert set(report["models"]) == {"gsa", "attention"}
    for name in ("recall.png", "needle_gsa.png", "needle_attention.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert run_eval(["recall", "--model", "a", "--model", "b", "--model", "c", "--tokenizer", "bytes",
                     "--tokenizer", "x"]) == 2
    assert "gsa eval recall: error: give --tokenizer once or once per --model (3), got 2" in capsys.readouterr().err
