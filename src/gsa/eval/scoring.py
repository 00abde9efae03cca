"""The two primitives every evaluation here reduces to, for any causal LM with a Hugging Face forward:

- `score_continuations`: log p(continuation | context) of token pairs, batched (perplexity windows, lm-eval's
  loglikelihood and loglikelihood_rolling, recall answers all go through it);
- `greedy_generate`: greedy decoding of a batch of prompts that carries the model's cache between steps (for GSA
  the fixed-size recurrent slot state, for a Transformer its key/value cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .loading import model_device


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum over the continuation's tokens, natural log
    greedy: bool  # every continuation token is the argmax of its prediction
    correct_tokens: int  # how many continuation tokens are the argmax
    tokens: int


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[ContinuationScore]:
    """Score each (context token ids, continuation token ids): the model reads context + continuation[:-1].

    The context must hold at least one token (the caller adds a BOS/EOS prefix where there is none). Inputs longer
    than `max_length` lose their oldest context tokens. Batches are right-padded: in a causal model padding after
    the last real token cannot change any real token's prediction, so the scores equal unbatched ones.
    """
    _check_batch_size(batch_size)
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        if len(context) < 1 or len(continuation) < 1:
            raise ValueError(
                f"pair {i}: expected at least one context token and one continuation token, got {len(context)} and "
                f"{len(continuation)}"
            )
        tokens = [*context, *continuation]
        if max_length is not None and len(tokens) - 1 > max_length:
            if len(continuation) > max_length:
                raise ValueError(
                    f"pair {i}: continuation of {len(continuation)} tokens exceeds max_length {max_length}"
                )
            tokens = tokens[len(tokens) - 1 - max_length :]
        rows.append((tokens, len(continuation)))

    device = model_device(model)
    results: list[ContinuationScore | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    batches = list(_batches(order, batch_size))
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        width = max(len(rows[i][0]) - 1 for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens = rows[i][0]
            input_ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            attention_mask[row, : len(tokens) - 1] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(batch):
            tokens, n = rows[i]
            # the continuation's predictions: positions len(tokens) - 1 - n .. len(tokens) - 2
            predicted = logits[row, len(tokens) - 1 - n : len(tokens) - 1].float()
            target = torch.tensor(tokens[-n:], device=predicted.device)
            logprobs = F.log_softmax(predicted, dim=-1)
            correct = int((predicted.argmax(-1) == target).sum())
            results[i] = ContinuationScore(
                logprob=float(logprobs.gather(1, target[:, None]).sum()),
                greedy=correct == n,
                correct_tokens=correct,
                tokens=n,
            )
    return results


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Cut a document into (context, continuation) windows that predict each of its tokens exactly once.

    The document is read after `prefix_token` (BOS, or EOS where there is none). The first window predicts up to
    `max_length` tokens; each later one predicts the next `stride` tokens (default `max_length`: disjoint windows)
    and reads up to `max_length` tokens, so it sees max_length - stride tokens of context it does not score.
    """
    stride = max_length if stride is None else stride
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"expected max_length >= 1 and 1 <= stride <= max_length, got {max_length} and {stride}")
    sequence = [prefix_token, *tokens]
    windows = []
    first = 1  # index into `sequence` of the first target not yet predicted
    while first < len(sequence):
        last = min(len(sequence) - 1, first + (max_length if first == 1 else stride) - 1)
        start = max(0, last - max_length)  # the window reads sequence[start:last] and predicts up to sequence[last]
        windows.append((sequence[start:first], sequence[first : last + 1]))
        first = last + 1
    return windows


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _cache_of(output):
    """The decoding cache a forward returned (transformers renamed the field during 5.x)."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise ValueError("the model returned no cache with use_cache=True; greedy_generate needs a model that caches")


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    is_finished: Callable[[list[int]], bool] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuations of token prompts (each at least one token), batched with left padding.

    The prompt is read once (prefill); then each step feeds one token per sequence together with the cache the
    model returned, so a GSA model decodes from its recurrent state. A sequence stops at a stop token (which is
    not returned), when `is_finished(generated ids)` says so, or after `max_new_tokens`.
    """
    _check_batch_size(batch_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) < 1 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model_device(model)
    keep_last_logits = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"
    stops = set(stop_token_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = list(_batches(order, batch_size)) if max_new_tokens > 0 else []
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **keep_last_logits)
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            next_tokens = output.logits[:, -1].argmax(-1)
            for row, token in enumerate(next_tokens.tolist()):
                if done[row]:
                    continue
                generated = outputs[batch[row]]
                if token in stops:
                    done[row] = True
                    continue
                generated.append(token)
                done[row] = is_finished is not None and is_finished(generated)
            if all(done) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(batch), 1)], 1)
            output = model(
                input_ids=next_tokens[:, None], attention_mask=attention_mask, use_cache=True,
                **{cache_argument: _cache_of(output)}, **keep_last_logits,
            )
    return outputs
