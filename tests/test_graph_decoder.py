"""GraphDecoder's decoding loop (device-side token bookkeeping, end-of-sequence handling, trimming) equals
transformers' generate(). On a CPU the step runs eagerly; on a GPU it is replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from gsa.generation import GraphDecoder
from gsa.models import GSAForCausalLM, preset_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device):
    torch.manual_seed(0)
    config = preset_config("gsa-tiny", num_hidden_layers=2, hidden_size=64, num_slots=8, use_short_conv=True)
    return GSAForCausalLM(config).to(device).eval()


def _hf_greedy(model, prompt, new_tokens, eos=None, pad=0):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=pad)


@pytest.mark.parametrize("new_tokens", [1, 2, 40])  # 1 and 2: fewer tokens than the capture's warm-up steps
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_without_end_token_equals_generate(device, new_tokens):
    model = _model(device)
    prompt = torch.randint(4, 200, (3, 70), generator=torch.Generator().manual_seed(1)).to(device)
    want = _hf_greedy(model, prompt, new_tokens)
    got = GraphDecoder(model, check_every=7).generate(prompt, new_tokens)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_end_token_fills_ended_sequences_and_stops_when_all_ended(device):
    model = _model(device)
    prompt = torch.randint(4, 200, (2, 20), generator=torch.Generator().manual_seed(2)).to(device)
    free = _hf_greedy(model, prompt, 30)[:, 20:]
    # an end token that row 0 emits early; the other row ends later or never
    eos = int(free[0, 3])
    want = _hf_greedy(model, prompt, 30, eos=eos, pad=0)
    got = GraphDecoder(model, check_every=5).generate(prompt, 30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, 20 + 4:] == 0).all() or got.shape[1] == 20 + 4  # row 0 padded after its end


@pytest.mark.parametrize("device", DEVICES)
def test_callback_streams_every_token_in_order(device):
    model = _model(device)
    prompt = torch.randint(4, 200, (1, 9), generator=torch.Generator().manual_seed(3)).to(device)
    seen = []
    got = GraphDecoder(model).generate(prompt, 12, callback=lambda t: seen.append(int(t[0])))
    assert seen == got[0, 9:].tolist() and len(seen) == 12


def _sharp_model(device):
    """The tiny model with its projections scaled up, so that every part of the state (the slot keys too, which
    at the default scale barely move a softmax over 8 slots) changes the greedy tokens."""
    model = _model(device)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.mul_(6)
    return model


def _counting_captures(monkeypatch, replay_eagerly: bool):
    """Count GraphDecoder._capture calls; on a CPU the 'capture' hands back the eager step itself, so the kept
    step's bookkeeping (its run and cache reused, a new prefill's states copied in) runs as the graph's would."""
    captures = []
    real = GraphDecoder._capture

    def capture(self, model_step, run, cache):
        captures.append(run.tokens.shape)
        return model_step if replay_eagerly else real(self, model_step, run, cache)

    monkeypatch.setattr(GraphDecoder, "_capture", capture)
    return captures


@pytest.mark.parametrize("device", DEVICES)
def test_kept_graph_is_reused_and_recaptured_when_the_call_differs(device, monkeypatch):
    """Calls of one batch size reuse the captured step (new prompts, lengths and fewer tokens give what
    generate() gives); more tokens than its buffer holds, another batch size, an end token, weights moved to other
    tensors, or inference mode capture again."""
    captures = _counting_captures(monkeypatch, replay_eagerly=device == "cpu")
    model = _sharp_model(device)
    gen = torch.Generator().manual_seed(4)
    decoder = GraphDecoder(model, use_graph=True, check_every=5)

    def check(batch, length, new_tokens, eos=None):
        prompt = torch.randint(4, 200, (batch, length), generator=gen).to(device)
        want = _hf_greedy(model, prompt, new_tokens, eos=eos, pad=0)
        got = decoder.generate(prompt, new_tokens, eos_token_id=eos, pad_token_id=0 if eos is not None else None)
        assert torch.equal(got, want), (batch, length, new_tokens, eos)

    check(3, 30, 20)
    assert captures[0][1] >= 64  # a kept buffer has room for short generations of any length up to 64
    check(3, 55, 7)  # another prompt and length, fewer tokens: the same graph
    check(3, 12, 50)
    assert len(captures) == 1
    check(3, 12, 90)  # more columns than the kept buffer (64): captured again, larger
    assert len(captures) == 2 and captures[1][1] >= 90
    check(2, 12, 20)
    assert len(captures) == 3
    # an end token one row of the first prompt emits early: the second call (same graph) starts unended
    prompt = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    eos = int(_hf_greedy(model, prompt, 20)[0, 14])
    for prompt in (prompt, torch.randint(4, 200, (2, 12), generator=gen).to(device)):
        want = _hf_greedy(model, prompt, 20, eos=eos, pad=0)
        assert torch.equal(decoder.generate(prompt, 20, eos_token_id=eos, pad_token_id=0), want)
    assert len(captures) == 4
    check(2, 12, 20)
    assert len(captures) == 5
    with torch.no_grad():  # new weight tensors: a graph on the old ones would read freed memory
        for weight in model.parameters():
            weight.data = weight.data.clone()
    check(2, 12, 20)
    assert len(captures) == 6
    with torch.inference_mode():  # its tensors cannot be updated outside it: a graph of its own
        check(2, 12, 20)
    check(2, 12, 20)
    assert len(captures) == 8
    decoder.release()
    check(2, 12, 20)
    assert len(captures) == 9


def test_kept_graph_streams_its_tokens_to_the_callback_per_call(monkeypatch):
    """A reused step's tokens reach the callback as copies: what a first call streamed stays as it was."""
    _counting_captures(monkeypatch, replay_eagerly=True)
    model = _sharp_model("cpu")
    decoder = GraphDecoder(model, use_graph=True)
    streamed = []
    for seed in (6, 7):
        prompt = torch.randint(4, 200, (1, 9), generator=torch.Generator().manual_seed(seed))
        seen = []
        got = decoder.generate(prompt, 12, callback=seen.append)
        streamed.append((seen, got[0, 9:].tolist()))
    for seen, tokens in streamed:
        assert [int(t[0]) for t in seen] == tokens
