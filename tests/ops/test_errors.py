"""Bad input gets an error that names what was wrong and what was expected."""

from __future__ import annotations

import pytest
import torch

from gsa.ops import gated_slot_attention, gated_slot_attention_decode, gated_slot_attention_step
from tests.helpers import gsa_inputs


def _inputs():
    return gsa_inputs(1, 12, 4, 2, 8, 6, 5, dtype=torch.float32, seed=0)


def test_wrong_rank_names_tensor():
    q, k, v, s, g = _inputs()
    with pytest.raises(ValueError, match=r"expected q of shape \[B, T, H, D\].*got \[12, 4, 8\]"):
        gated_slot_attention(q[0], k, v, s, g)


def test_wrong_shape_names_tensor_and_expected_shape():
    q, k, v, s, g = _inputs()
    with pytest.raises(ValueError, match=r"expected v of shape \[B, T, H, V\]"):
        gated_slot_attention(q, k, v[:, :5], s, g)
    with pytest.raises(ValueError, match=r"expected g of shape .*\[1, 12, 2, 5\].*got \[1, 12, 2, 4\]"):
        gated_slot_attention(q, k, v, s, g[..., :4])


def test_query_heads_must_be_multiple_of_kv_heads():
    q, k, v, s, g = _inputs()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        gated_slot_attention(q[:, :, :3], k, v, s, g)


def test_mismatched_dtype_and_device():
    q, k, v, s, g = _inputs()
    with pytest.raises(TypeError, match="share one dtype: q is torch.float32, k is torch.float64"):
        gated_slot_attention(q, k.double(), v, s, g)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        gated_slot_attention(q, k, v.long(), s, g)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            gated_slot_attention(q, k.cuda(), v, s, g)


def test_positive_log_gates_rejected():
    q, k, v, s, g = _inputs()
    with pytest.raises(ValueError, match="must be <= 0"):
        gated_slot_attention(q, k, v, s, g + 1.0)


@pytest.mark.parametrize(
    "offsets,message",
    [
        ([1, 5, 12], "must start at 0"),
        ([0, 5, 11], "must end at T=12"),
        ([0, 7, 5, 12], "strictly increasing"),
        ([0, 5, 5, 12], "strictly increasing"),
    ],
)
def test_malformed_cu_seqlens(offsets, message):
    q, k, v, s, g = _inputs()
    with pytest.raises(ValueError, match=message):
        gated_slot_attention(q, k, v, s, g, cu_seqlens=torch.tensor(offsets))


def test_cu_seqlens_needs_batch_one_and_integers():
    q, k, v, s, g = (torch.cat([t, t]) for t in _inputs())
    with pytest.raises(ValueError, match="batch size must be 1"):
        gated_slot_attention(q, k, v, s, g, cu_seqlens=torch.tensor([0, 5, 12]))
    q, k, v, s, g = _inputs()
    with pytest.raises(TypeError, match="int32 or int64"):
        gated_slot_attention(q, k, v, s, g, cu_seqlens=torch.tensor([0.0, 12.0]))


def test_wrong_initial_state_shape():
    q, k, v, s, g = _inputs()
    hk, hv = torch.zeros(1, 2, 8, 5), torch.zeros(1, 2, 5, 6)
    with pytest.raises(ValueError, match=r"initial_state Hk of shape \[N, H, K, M\] = \[1, 2, 8, 5\]"):
        gated_slot_attention(q, k, v, s, g, initial_state=(hk.transpose(-1, -2), hv))
    with pytest.raises(ValueError, match=r"initial_state Hk of shape \[N, H, K, M\] = \[2, 2, 8, 5\]"):
        gated_slot_attention(q, k, v, s, g, initial_state=(hk, hv), cu_seqlens=torch.tensor([0, 4, 12]))
    with pytest.raises(TypeError, match="must be a pair"):
        gated_slot_attention(q, k, v, s, g, initial_state=hk)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gated_slot_attention(*_inputs(), backend="cuda")


def test_triton_backend_on_cpu_tensors_is_refused():
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        gated_slot_attention(*_inputs(), backend="triton")


def test_step_shapes_checked():
    q, k, v, s, g = (t[:, 0] for t in _inputs())
    state = (torch.zeros(1, 2, 8, 5), torch.zeros(1, 2, 5, 6))
    with pytest.raises(ValueError, match=r"expected q of shape \[B, H, D\]"):
        gated_slot_attention_step(q[0], k, v, s, g, state)
    with pytest.raises(ValueError, match=r"expected state Hv"):
        gated_slot_attention_step(q, k, v, s, g, (state[0], state[1][:, :, :4]))
    # what the quick pass over valid inputs turns away, named by the detailed check
    with pytest.raises(ValueError, match=r"expected s of shape \[1, 2, 5\]"):
        gated_slot_attention_step(q, k, v, s[:, :, :4], g, state)
    with pytest.raises(TypeError, match="s must be a torch.Tensor, got list"):
        gated_slot_attention_step(q, k, v, s.tolist(), g, state)
    with pytest.raises(TypeError, match="state Hk must be a float tensor, got torch.int64"):
        gated_slot_attention_step(q, k, v, s, g, (state[0].long(), state[1]))
    with pytest.raises(TypeError, match="state must be a pair"):
        gated_slot_attention_step(q, k, v, s, g, state[0])
    o, (hk, hv) = gated_slot_attention_step(q, k, v, s, g, state)  # and valid inputs pass it
    assert o.shape == (1, q.shape[1], 6) and hk.shape == state[0].shape and hv.shape == state[1].shape


def test_decode_from_projections_names_bad_gate_logits_and_feature_map():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    state = (torch.zeros(2, 2, 8, 5), torch.zeros(2, 2, 5, 8))
    with pytest.raises(ValueError, match=r"expected f of shape \[2, 2, 5\]"):
        gated_slot_attention_decode(q, k, v, torch.randn(2, 3, 5), state)
    with pytest.raises(ValueError, match="unknown feature_map 'tanh'"):
        gated_slot_attention_decode(q, k, v, torch.randn(2, 2, 5), state, feature_map="tanh")
