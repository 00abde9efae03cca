"""Tokenised corpora cached on disk, and the held-out validation split.

A corpus is tokenised once into a folder under the cache directory named by a fingerprint of (every document's
name and text, the tokenizer): a second run with the same text and tokenizer maps the folder and tokenises nothing;
a changed file or a different tokenizer gives a new folder. The folder holds

    tokens.bin     all documents' tokens back to back, uint16 (vocabularies up to 65536) or uint32, memory-mapped
    offsets.npy    int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    names.json     the document names, for the validation split
    meta.json      written last; a folder without it is incomplete and is never read

Each document is stored as BOS + its tokens + EOS (for the ends the tokenizer has), so a model sees where text
starts and learns to end it. Folders are built under a temporary name and renamed into place, so a crash or a
concurrent run never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpora import Corpus, Document
from .tokenizers import Tokenizer

CACHE_FORMAT = 1
# holding out whole documents gives a fair sample only when many are held out; with fewer expected (a few books,
# one big file) the tail of every document is held out instead
MIN_HELD_OUT_DOCUMENTS = 20
# tokenise this much text per call, so the tokenizer's threads have work and memory stays bounded
TOKENIZE_BATCH_CHARS = 8 << 20


def default_cache_dir() -> Path:
    """$GSA_CACHE_DIR, else $XDG_CACHE_HOME/gsa/tokens, else ~/.cache/gsa/tokens."""
    if os.environ.get("GSA_CACHE_DIR"):
        return Path(os.environ["GSA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gsa" / "tokens"


def corpus_fingerprint(documents: Iterable[Document], tokenizer: Tokenizer) -> str:
    """A digest of every document's name and text and of the tokenizer: equal digests, equal tokens."""
    digest = hashlib.sha256(f"gsa token cache {CACHE_FORMAT}\n{tokenizer.fingerprint}\n".encode())
    count = 0
    for name, text in documents:
        for part in (name.encode("utf-8"), text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        count += 1
    if count == 0:
        raise ValueError("the data sources hold no documents")
    return digest.hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenizedCorpus:
    """Memory-mapped tokens of a corpus and where each document lies in them."""

    folder: Path
    tokens: np.ndarray  # [total tokens], uint16 or uint32, read-only memory map
    offsets: np.ndarray  # [documents + 1], int64
    names: list[str]
    fingerprint: str

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def open_tokenized(folder: str | os.PathLike) -> TokenizedCorpus:
    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"{folder} is not a complete token cache (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{folder} was written in token cache format {meta.get('format')}, expected {CACHE_FORMAT}; "
                         "delete it to rebuild")
    offsets = np.load(folder / "offsets.npy")
    dtype = np.dtype(meta["dtype"])
    tokens_file = folder / "tokens.bin"
    expected_bytes = int(offsets[-1]) * dtype.itemsize
    if tokens_file.stat().st_size != expected_bytes:
        raise ValueError(f"{tokens_file} holds {tokens_file.stat().st_size} bytes, expected {expected_bytes}; "
                         "delete the folder to rebuild it")
    tokens = np.memmap(tokens_file, dtype=dtype, mode="r") if expected_bytes else np.zeros(0, dtype)
    names = json.loads((folder / "names.json").read_text())
    return TokenizedCorpus(folder, tokens, offsets, names, meta["fingerprint"])


def _batches(documents: Iterable[Document]) -> Iterable[list[Document]]:
    batch, chars = [], 0
    for name, text in documents:
        if not text:
            continue  # an empty document teaches nothing
        batch.append((name, text))
        chars += len(text)
        if chars >= TOKENIZE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_cache(folder: Path, documents: Iterable[Document], tokenizer: Tokenizer, fingerprint: str,
                 progress: bool) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    suffix = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    staging = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        offsets, names = [0], []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"tokenising ({tokenizer.name})", unit=" docs", dynamic_ncols=True)
        with open(staging / "tokens.bin", "wb") as out:
            for batch in _batches(documents):
                for (name, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
                    row = np.asarray(prefix + list(ids) + suffix, dtype=np.int64)
                    if len(row) and (row.min() < 0 or row.max() >= tokenizer.vocab_size):
                        raise ValueError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size}) "
                                         f"for document {name}")
                    out.write(row.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + len(row))
                    names.append(name)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        if not names:
            raise ValueError("the data sources hold no text: every document is empty")
        np.save(staging / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        (staging / "names.json").write_text(json.dumps(names))
        meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "documents": len(names),
                "tokens": offsets[-1]}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(staging)
        if folder.exists() and not (folder / "meta.json").is_file():
            # a damaged folder (its meta.json lost): set it aside so the complete one can take its name
            damaged = folder.parent / f".tmp-{folder.name}-damaged-{uuid.uuid4().hex[:8]}"
            os.rename(folder, damaged)
            shutil.rmtree(damaged, ignore_errors=True)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            # another process finished the same cache first; its tokens are the same as ours
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None,
                    progress: bool = False) -> TokenizedCorpus:
    """The corpus's tokens, from the cache when this text was tokenised this way before, else tokenised now."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = corpus_fingerprint(corpus.documents(), tokenizer)
    folder = cache_dir / f"{tokenizer.name}-{fingerprint}"
    if not (folder / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_cache(folder, corpus.documents(), tokenizer, fingerprint, progress)
    return open_tokenized(folder)


def _unit_hash(name: str) -> float:
    """A number in [0, 1) fixed by the name alone: which documents are held out does not depend on their order."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_spans(corpus: TokenizedCorpus, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) spans, each an int64 array [n, 2] of [start, end) token ranges of the corpus.

    When val_fraction of the documents is at least MIN_HELD_OUT_DOCUMENTS, whole documents are held out, each with
    probability val_fraction decided by a hash of its name. Otherwise (a few books, one big file) the last
    val_fraction of every document is held out. Either way the split is the same on every run and every machine.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    starts, ends = corpus.offsets[:-1], corpus.offsets[1:]
    if val_fraction == 0:
        return np.stack([starts, ends], 1), np.zeros((0, 2), dtype=np.int64)
    if corpus.num_documents * val_fraction >= MIN_HELD_OUT_DOCUMENTS:
        draws = np.array([_unit_hash(name) for name in corpus.names])
        held_out = draws < val_fraction
        if not held_out.any():
            held_out[np.argmin(draws)] = True
        spans = np.stack([starts, ends], 1)
        return spans[~held_out], spans[held_out]
    lengths = ends - starts
    cut = ends - np.maximum(np.ceil(lengths * val_fraction).astype(np.int64), 2)
    cut = np.clip(cut, starts, ends)
    train, validation = np.stack([starts, cut], 1), np.stack([cut, ends], 1)
    return train[train[:, 1] > train[:, 0]], validation
