"""The on-disk token cache (built once, keyed by text and tokenizer, never half-written) and the validation split."""

from __future__ import annotations

import numpy as np
import pytest

from gsa.data import ByteTokenizer, Corpus, open_tokenized, split_spans, tokenize_corpus
from gsa.data.tokenized import MIN_HELD_OUT_DOCUMENTS, TokenizedCorpus


def write_documents(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    return Corpus((str(folder),))


class CountingBytes(ByteTokenizer):
    """Bytes, counting how many documents it was asked to tokenise."""

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += len(texts)
        return super().encode_batch(texts)


class WideVocabulary(ByteTokenizer):
    """Bytes shifted past 65536, so the cache must store uint32."""

    name, vocab_size, fingerprint = "wide", 70_000, "wide-test"
    bos_id, eos_id = 69_998, 69_999

    def encode_batch(self, texts):
        return [[t + 65_600 for t in ids] for ids in super().encode_batch(texts)]


def test_tokens_are_each_document_between_bos_and_eos(tmp_path):
    texts = ["first document", "", "second — with UTF-8", "third"]
    corpus = write_documents(tmp_path / "text", texts)
    tokenized = tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "cache")
    kept = [t for t in texts if t]  # empty documents teach nothing and are skipped
    assert tokenized.num_documents == len(kept)
    assert tokenized.tokens.dtype == np.uint16
    for d, text in enumerate(kept):
        got = tokenized.tokens[tokenized.offsets[d] : tokenized.offsets[d + 1]].tolist()
        assert got == [1, *ByteTokenizer().encode(text), 2]


def test_second_run_reads_the_cache_and_changes_rebuild_it(tmp_path):
    corpus = write_documents(tmp_path / "text", ["alpha beta", "gamma"])
    tokenizer = CountingBytes()
    first = tokenize_corpus(corpus, tokenizer, tmp_path / "cache")
    assert tokenizer.calls == 2
    again = tokenize_corpus(corpus, tokenizer, tmp_path / "cache")
    assert tokenizer.calls == 2 and again.folder == first.folder  # nothing tokenised the second time
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    (tmp_path / "text" / "doc0001.txt").write_text("gamma, changed")
    changed = tokenize_corpus(corpus, tokenizer, tmp_path / "cache")
    assert tokenizer.calls == 4 and changed.folder != first.folder
    other = tokenize_corpus(corpus, WideVocabulary(), tmp_path / "cache")
    assert other.folder not in (first.folder, changed.folder)
    assert other.tokens.dtype == np.uint32 and int(other.tokens.max()) >= 1 << 16


def test_an_unfinished_cache_folder_is_never_read(tmp_path):
    corpus = write_documents(tmp_path / "text", ["some text"])
    complete = tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "cache")
    (complete.folder / "meta.json").unlink()  # as if the writer died before its last file
    with pytest.raises(ValueError, match="not a complete token cache"):
        open_tokenized(complete.folder)
    tokenizer = CountingBytes()
    rebuilt = tokenize_corpus(corpus, tokenizer, tmp_path / "cache")
    assert tokenizer.calls == 1 and (rebuilt.folder / "meta.json").is_file()


def test_empty_corpus_is_an_error(tmp_path):
    corpus = write_documents(tmp_path / "text", ["", ""])
    with pytest.raises(ValueError, match="every document is empty"):
        tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "cache")


def fake_corpus(lengths, names=None) -> TokenizedCorpus:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    names = names or [f"doc-{i}" for i in range(len(lengths))]
    return TokenizedCorpus(None, np.arange(offsets[-1]) % 250, offsets, names, "fake")


def covered(spans) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in spans]) if len(spans) else np.zeros(0, int)


def test_few_documents_hold_out_the_tail_of_each():
    lengths = [1000, 37, 5000]
    corpus = fake_corpus(lengths)
    train, validation = split_spans(corpus, 0.1)
    # every token is in exactly one split, and each document's validation part is its end
    everything = np.sort(np.concatenate([covered(train), covered(validation)]))
    assert np.array_equal(everything, np.arange(sum(lengths)))
    assert np.array_equal(validation[:, 1], corpus.offsets[1:])
    held = (validation[:, 1] - validation[:, 0]) / np.asarray(lengths)
    assert np.all(held >= 0.1) and np.all(held <= 0.1 + 2 / np.asarray(lengths) + 1e-9)


def test_many_documents_hold_out_whole_documents_chosen_by_name():
    count, fraction = 4000, 0.05
    assert count * fraction >= MIN_HELD_OUT_DOCUMENTS
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, count)
    names = [f"file-{i}.txt" for i in range(count)]
    train, validation = split_spans(fake_corpus(lengths, names), fraction)
    starts = set(fake_corpus(lengths).offsets[:-1].tolist())
    assert {a for a, _ in validation} <= starts and {a for a, _ in train} <= starts  # whole documents only
    assert len(train) + len(validation) == count
    assert abs(len(validation) / count - fraction) < 0.015
    # the same documents are held out however the corpus is ordered
    order = rng.permutation(count)
    shuffled = fake_corpus(lengths[order], [names[i] for i in order])
    _, validation_shuffled = split_spans(shuffled, fraction)

    def held_names(corpus, spans):
        index = {int(a): corpus.names[d] for d, a in enumerate(corpus.offsets[:-1])}
        return {index[int(a)] for a, _ in spans}

    assert held_names(fake_corpus(lengths, names), validation) == held_names(shuffled, validation_shuffled)


def test_no_validation_and_bad_fraction():
    corpus = fake_corpus([10, 20])
    train, validation = split_spans(corpus, 0.0)
    assert len(validation) == 0 and covered(train).size == 30
    with pytest.raises(ValueError, match="val_fraction"):
        split_spans(corpus, 1.0)
