"""Tokenizer, model and corpus loading: the byte tokenizer is exact and survives a save; bad input is named."""

import pytest
from transformers import AutoTokenizer

from gsa.eval.loading import (
    BYTE_OFFSET, corpus_documents, file_documents, load_causal_lm, load_tokenizer, resolve_dtype, resolve_device,
)


def test_byte_tokenizer_maps_each_utf8_byte_to_one_id_and_back(tokenizer, tmp_path):
    text = "Héllo, wörld!\n\t  ends with €"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [b + BYTE_OFFSET for b in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 1, 2, 260)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids


def test_load_tokenizer_finds_the_model_folders_and_names_what_is_missing(model_dir, tmp_path):
    assert load_tokenizer(None, model_dir)("ab", add_special_tokens=False)["input_ids"] == [97 + 4, 98 + 4]
    assert len(load_tokenizer("bytes")) == 260
    with pytest.raises(ValueError, match="no tokenizer found .* --tokenizer bytes"):
        load_tokenizer(None, tmp_path)
    with pytest.raises(ValueError, match="neither 'bytes' nor a folder"):
        load_tokenizer("no/such/tokenizer")


def test_load_causal_lm_reads_a_saved_folder_and_rejects_others(model_dir, tmp_path):
    model = load_causal_lm(model_dir, "cpu", "float32")
    assert not model.training and model.config.model_type == "gsa"
    with pytest.raises(ValueError, match="is not a folder"):
        load_causal_lm(tmp_path / "missing", "cpu")
    with pytest.raises(ValueError, match="has no config.json"):
        load_causal_lm(tmp_path, "cpu")


def test_devices_and_dtypes_are_checked():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", resolve_device("cpu"))


def test_shakespeare_corpus_has_its_42_works_and_unknown_sources_are_errors(tmp_path):
    works = dict(corpus_documents("shakespeare"))
    assert len(works) == 42 and "hamlet" in works and "Elsinore" in works["hamlet"]
    with pytest.raises(ValueError, match="unknown corpus 'wikitext'; expected one of shakespeare"):
        next(corpus_documents("wikitext"))
    with pytest.raises(ValueError, match="text files not found"):
        next(file_documents([tmp_path / "absent.txt"]))
