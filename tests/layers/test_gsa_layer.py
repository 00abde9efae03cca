"""GatedSlotAttention: prefill + token-by-token decoding (the operator's fused decode step) equals one call over
the whole sequence, padding tokens included (they neither decay nor write the slots)."""

from __future__ import annotations

import pytest
import torch

from gsa.layers import GatedSlotAttention
from tests.helpers import rel_err


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_short_conv=True, conv_size=3), dict(feature_map="relu", num_slots=5), dict(clamp_min=-0.05)],
    ids=["swish", "short_conv", "relu", "clamp"],
)
def test_decoding_with_padding_tokens_equals_full_call(options):
    torch.manual_seed(0)
    layer = GatedSlotAttention(hidden_size=32, num_heads=4, num_kv_heads=2, **{"num_slots": 6, **options})
    layer = layer.double().eval()
    torch.nn.init.normal_(layer.f_proj.weight, std=0.7)  # gates that differ across slots and steps
    B, T, prefill = 2, 21, 9
    x = torch.randn(B, T, 32, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[0, 13] = 0  # a padding token inside the decoded part
    mask[1, 17] = 0
    with torch.no_grad():
        want, want_state = layer(x, attention_mask=mask, use_cache=True)
        got, state = layer(x[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        steps = [got]
        hk_before = None
        for t in range(prefill, T):
            if t == 13:
                hk_before = state.hk[0].clone()
            y, state = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], state=state)
            if t == 13:
                assert torch.equal(state.hk[0], hk_before), "a padding token changed the slot keys"
            steps.append(y)
    assert rel_err(torch.cat(steps, 1), want) < 1e-10
    assert rel_err(state.hk, want_state.hk) < 1e-10 and rel_err(state.hv, want_state.hv) < 1e-10


def test_short_conv_under_autocast_hands_the_operator_the_autocast_dtype(monkeypatch):
    """float32 weights under bfloat16 autocast: the short convolutions keep the projections' bf16 (as a conv layer
    under autocast would), so the operator runs its bf16 kernels, not the exact-float32 ones; the layer's output
    stays within bf16 rounding of the float32 layer's."""
    import gsa.layers.gsa as gsa_layer

    seen = []
    real = gsa_layer.gated_slot_attention

    def spy(q, k, v, s, g, *args, **kwargs):
        seen.append({q.dtype, k.dtype, v.dtype, s.dtype, g.dtype})
        return real(q, k, v, s, g, *args, **kwargs)

    monkeypatch.setattr(gsa_layer, "gated_slot_attention", spy)
    torch.manual_seed(1)
    layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=8, use_short_conv=True, conv_size=4)
    x = torch.randn(2, 24, 32)
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = layer(x)
    assert seen[0] == {torch.float32} and seen[1] == {torch.bfloat16}
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layer_keeping_its_states_trains_bitwise_the_same(monkeypatch):
    """recompute_states=False: the operator keeps the forward's chunk states for backward (its backward launches
    no state walk); the layer's output and every gradient are bitwise the default's (the states it would compute
    again are the same numbers)."""
    from gsa.ops.triton import chunk as chunk_kernels

    launched = []
    real = chunk_kernels._try
    monkeypatch.setattr(chunk_kernels, "_try", lambda kernel, *args: (launched.append(kernel.fn.__name__),
                                                                      real(kernel, *args)))
    torch.manual_seed(8)
    layer = GatedSlotAttention(hidden_size=256, num_heads=2, num_slots=32).cuda().bfloat16()
    x = torch.randn(2, 700, 256, device="cuda", dtype=torch.bfloat16)
    results, walks = [], []
    for recompute in (True, False):
        layer.recompute_states = recompute
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        y, _ = layer(inputs)
        y.backward(torch.ones_like(y))
        results.append([y, inputs.grad, *(p.grad for p in layer.parameters())])
        walks.append(launched.count("_walk_states"))
        launched.clear()
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert walks[0] == 2 * walks[1] > 0  # forward and backward, then the forward's only
