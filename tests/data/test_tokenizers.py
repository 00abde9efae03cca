"""Tokenizers: the byte vocabulary, the Mistral SentencePiece model, Hugging Face folders, and what they save."""

from __future__ import annotations

import importlib.util

import pytest

from gsa.data import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer
from gsa.models import PRESETS

TEXT = "O Romeo, Romeo! wherefore art thou Romeo?\n\tCafé — naïve 🙂 <s></s>"
has_mistral = importlib.util.find_spec("mistral_common") is not None


def test_bytes_layout_matches_the_tiny_preset():
    tokenizer = load_tokenizer("bytes")
    assert tokenizer.vocab_size == PRESETS["gsa-tiny"]["vocab_size"]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    ids = tokenizer.encode(TEXT)
    assert ids == [b + 4 for b in TEXT.encode("utf-8")]  # one token per UTF-8 byte, after 4 special tokens
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == TEXT


def test_bytes_saved_as_a_hugging_face_tokenizer_gives_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(TEXT)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    # and gsa.data reads the folder back as a Hugging Face tokenizer with the same ids
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer) and again.encode(TEXT) == ByteTokenizer().encode(TEXT)
    assert again.fingerprint != ByteTokenizer().fingerprint


@pytest.mark.skipif(not has_mistral, reason="mistral-common not installed")
def test_mistral_tokenizer(tmp_path):
    import sentencepiece

    tokenizer = load_tokenizer("mistral")
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    assert tokenizer.encode(TEXT) == reference.encode(TEXT)
    assert tokenizer.encode_batch([TEXT, "x"]) == [reference.encode(TEXT), reference.encode("x")]
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    # the same model as a file path, or saved into a model folder, reads back identically
    from_file = load_tokenizer(str(tokenizer.model_file))
    tokenizer.save(tmp_path / "model")
    from_folder = load_tokenizer(tmp_path / "model")
    assert isinstance(from_folder, SentencePieceTokenizer)
    assert from_file.encode(TEXT) == from_folder.encode(TEXT) == tokenizer.encode(TEXT)
    assert from_file.fingerprint == from_folder.fingerprint == tokenizer.fingerprint


@pytest.mark.parametrize("spec, message", [("nonsense", "unknown tokenizer 'nonsense'"), ("EMPTY", "has none of")])
def test_bad_tokenizer_specs(tmp_path, spec, message):
    if spec == "EMPTY":
        spec = str(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(spec)


def test_a_file_that_is_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "x.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "x.model")
