"""Perplexity and bits per byte of a causal LM over documents, long ones in (optionally strided) windows.

Each document is read after the tokenizer's BOS token (EOS where there is none) and every one of its tokens is
predicted exactly once (see `scoring.rolling_windows`). Corpus perplexity is exp(total NLL / total tokens); bits
per byte is total NLL / ln 2 / total UTF-8 bytes, which compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .scoring import rolling_windows, score_continuations


def prefix_token_id(tokenizer) -> int:
    """The token a document is read after: BOS, else EOS (as lm-eval does)."""
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    documents: Iterable[tuple[str, str]],
    max_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity of `model` on (name, text) documents; returns totals and one entry per document.

    tokenizer: a `gsa.data` tokenizer (`gsa.eval.loading.model_tokenizer` finds a model's).

    max_length: tokens a window reads; stride: tokens each window after the first predicts (default max_length,
    disjoint windows; smaller strides give every prediction more context and cost max_length / stride times more).
    """
    prefix = prefix_token_id(tokenizer)
    names, sizes, windows, owners = [], [], [], []
    for name, text in documents:
        tokens = tokenizer.encode(text)
        if not tokens:
            continue  # an empty document predicts nothing
        for window in rolling_windows(tokens, prefix, max_length, stride):
            windows.append(window)
            owners.append(len(names))
        names.append(name)
        sizes.append((len(tokens), len(text.encode("utf-8"))))
    if not names:
        raise ValueError("no text to evaluate: every document was empty")
    scores = score_continuations(model, windows, batch_size, progress=progress, desc="perplexity")
    nll = [0.0] * len(names)
    for owner, score in zip(owners, scores):
        nll[owner] -= score.logprob
    per_document = [
        {
            "name": name,
            "tokens": tokens,
            "bytes": nbytes,
            "perplexity": math.exp(doc_nll / tokens),
            "bits_per_byte": doc_nll / math.log(2) / nbytes,
        }
        for name, (tokens, nbytes), doc_nll in zip(names, sizes, nll)
    ]
    total_nll = sum(nll)
    total_tokens = sum(t for t, _ in sizes)
    total_bytes = sum(b for _, b in sizes)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "nll_per_token": total_nll / total_tokens,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "documents": len(names),
        "windows": len(windows),
        "max_length": max_length,
        "stride": max_length if stride is None else stride,
        "per_document": per_document,
    }
