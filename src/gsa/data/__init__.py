"""Training data: documents from files, folders, JSON lines, saved datasets or bundled corpora → tokens (cached on
disk, memory-mapped) → a deterministic train / validation split → fixed-length windows packed with their document
boundaries.

    from gsa.data import Corpus, load_tokenizer, tokenize_corpus, split_spans, PackedWindows, make_batch

    tokens = tokenize_corpus(Corpus(("shakespeare",)), load_tokenizer("bytes"))
    train_spans, val_spans = split_spans(tokens, 0.02)
    batch = make_batch(PackedWindows(tokens.tokens, train_spans, 256), [0, 1, 2, 3])
"""

from .corpora import BUNDLED_CORPORA, Corpus, Document, bundled_corpus_available, source_documents
from .packing import IGNORE_INDEX, Batch, PackedWindows, SampleOrder, make_batch
from .tokenized import TokenizedCorpus, default_cache_dir, open_tokenized, split_spans, tokenize_corpus
from .tokenizers import (
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    mistral_tokenizer_file,
)

__all__ = [
    "BUNDLED_CORPORA",
    "BYTE_VOCAB_SIZE",
    "Batch",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "HFTokenizer",
    "IGNORE_INDEX",
    "PackedWindows",
    "SampleOrder",
    "SentencePieceTokenizer",
    "TokenizedCorpus",
    "Tokenizer",
    "bundled_corpus_available",
    "default_cache_dir",
    "load_tokenizer",
    "make_batch",
    "mistral_tokenizer_file",
    "open_tokenized",
    "source_documents",
    "split_spans",
    "tokenize_corpus",
]
