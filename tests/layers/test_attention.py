"""Softmax attention over packed sequences: equal to running each sequence alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsa.layers.attention import Attention, packed_causal_attention


def _lengths(seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    # lengths spread over several power-of-two buckets, with 1-token sequences among them
    return [1, *torch.randint(1, 40, (6,), generator=gen).tolist(), 1, 33]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_causal_attention_equals_each_sequence_alone(seed):
    lengths = _lengths(seed)
    T, H, D = sum(lengths), 3, 8
    gen = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(1, H, T, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got = packed_causal_attention(q, k, v, cu)
    want = torch.cat(
        [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cot = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    grads_got = torch.autograd.grad((got * cot).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * cot).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"d{name}")


def test_attention_layer_packed_equals_separate_calls():
    torch.manual_seed(0)
    layer = Attention(hidden_size=32, num_heads=4, num_kv_heads=2).double()
    lengths = [5, 17, 1, 9]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed, _ = layer(x, positions, cu_seqlens=cu)
    alone = torch.cat(
        [layer(x[:, a:b], torch.arange(b - a)[None])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1
    )
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
