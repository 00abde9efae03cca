"""Scoring, rolling windows, perplexity and greedy decoding against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from gsa.eval.perplexity import evaluate_perplexity
from gsa.eval.scoring import greedy_generate, rolling_windows, score_continuations
from tests.eval.conftest import tiny_model

PAIRS = [([1, 40, 41, 42], [43, 44]), ([1, 50] + [60] * 20, [70]), ([2], [80, 81, 82, 83, 84])]


@torch.no_grad()
def unbatched_logprob(model, context, continuation) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logprobs.gather(1, targets[:, None])[-len(continuation) :].sum())


def llama_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make_model", [tiny_model, lambda: tiny_model(attention=True), llama_model],
                         ids=["gsa", "attention", "transformers-llama"])
def test_batched_scores_equal_unbatched_ones(make_model):
    model = make_model()
    want = [unbatched_logprob(model, c, x) for c, x in PAIRS]
    for batch_size in (1, 2, 3):
        got = score_continuations(model, PAIRS, batch_size=batch_size)
        assert [s.logprob for s in got] == pytest.approx(want, abs=1e-4)
        assert all(s.tokens == len(x) and 0 <= s.correct_tokens <= s.tokens for s, (_, x) in zip(got, PAIRS))


def test_scoring_rejects_empty_parts_and_truncates_old_context(gsa_model):
    with pytest.raises(ValueError, match="pair 0: expected at least one context token"):
        score_continuations(gsa_model, [([], [5])])
    long_context = list(range(10, 60))
    truncated = score_continuations(gsa_model, [(long_context, [61, 62])], max_length=8)[0]
    assert truncated.logprob == pytest.approx(unbatched_logprob(gsa_model, long_context[-7:], [61, 62]), abs=1e-5)


@pytest.mark.parametrize("length,max_length,stride", [(1, 4, None), (10, 4, None), (10, 4, 1), (23, 8, 3), (8, 8, 8)])
def test_rolling_windows_predict_every_token_once_within_max_length(length, max_length, stride):
    tokens = list(range(100, 100 + length))
    windows = rolling_windows(tokens, 1, max_length, stride)
    predicted = [t for _, continuation in windows for t in continuation]
    assert predicted == tokens
    sequence = [1, *tokens]
    position = 1
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= max_length  # tokens the model reads
        assert context == sequence[position - len(context) : position]  # the true preceding tokens
        position += len(continuation)
    with pytest.raises(ValueError, match="1 <= stride <= max_length"):
        rolling_windows(tokens, 1, 4, 5)


def test_perplexity_is_exp_of_the_models_own_mean_loss(gsa_model, tokenizer):
    docs = [("a", "To be, or not to be, that is the question."), ("b", "Whether 'tis nobler in the mind to suffer")]
    result = evaluate_perplexity(gsa_model, tokenizer, docs, max_length=128, batch_size=2)
    total_loss, total_tokens = 0.0, 0
    for _, text in docs:  # the model's own loss path (chunked linear cross-entropy), one document at a time
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text)]])
        with torch.no_grad():
            loss = gsa_model(input_ids=ids, labels=ids).loss
        total_loss += float(loss) * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    assert result["tokens"] == total_tokens == sum(len(t) for _, t in docs)
    assert result["perplexity"] == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-5)
    # one token per byte: bits per byte is log2 of the perplexity
    assert result["bits_per_byte"] == pytest.approx(math.log2(result["perplexity"]), rel=1e-6)
    assert [d["name"] for d in result["per_document"]] == ["a", "b"]


def test_windowed_perplexity_matches_a_direct_window_by_window_sum(gsa_model, tokenizer):
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    result = evaluate_perplexity(gsa_model, tokenizer, [("doc", text)], max_length=16, stride=8)
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    nll = 0.0
    for context, continuation in rolling_windows(ids[1:], ids[0], 16, 8):
        inputs = torch.tensor([context + continuation[:-1]])
        with torch.no_grad():
            logits = gsa_model(input_ids=inputs).logits[0, -len(continuation) :]
        nll += float(F.cross_entropy(logits, torch.tensor(continuation), reduction="sum"))
    assert result["perplexity"] == pytest.approx(math.exp(nll / len(text)), rel=1e-5)
    assert result["windows"] == len(rolling_windows(ids[1:], ids[0], 16, 8)) > 2
    with pytest.raises(ValueError, match="every document was empty"):
        evaluate_perplexity(gsa_model, tokenizer, [("empty", "")])


@pytest.mark.parametrize("make_model", [tiny_model, lambda: tiny_model(attention=True), llama_model],
                         ids=["gsa", "attention", "transformers-llama"])
def test_greedy_generate_from_the_cache_equals_transformers_generate(make_model):
    model = make_model()
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57], [2, 9]]
    got = greedy_generate(model, prompts, max_new_tokens=6, batch_size=3)
    for prompt, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert tokens == want[0, len(prompt) :].tolist()


def test_greedy_generate_stops_at_stop_tokens_and_when_told(gsa_model):
    free = greedy_generate(gsa_model, [[1, 40, 41]], max_new_tokens=5)[0]
    assert len(free) == 5
    stopped = greedy_generate(gsa_model, [[1, 40, 41]], max_new_tokens=5, stop_token_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]
    told = greedy_generate(gsa_model, [[1, 40, 41]], max_new_tokens=5, is_finished=lambda ids: len(ids) == 2)[0]
    assert told == free[:2]
