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
