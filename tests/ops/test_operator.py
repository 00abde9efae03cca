"""The chunked PyTorch operator against the step-by-step reference, and the operator's contract."""

from __future__ import annotations

import pytest
import torch

from gsa.ops import gated_slot_attention, gated_slot_attention_decode, gated_slot_attention_step
from gsa.ops.chunk import FACTORED_SPAN_LIMIT, chunk_gsa
from tests.helpers import assert_close_all, gsa_inputs, outputs_and_grads, random_state, rel_err

# (B, T, HQ, H, K, V, M): T off the chunk grid, T = 1, odd widths, grouped queries, several chunks
SHAPES = [
    (2, 37, 4, 2, 5, 7, 3),
    (1, 1, 2, 2, 4, 4, 4),
    (3, 16, 1, 1, 8, 8, 16),
    (1, 100, 6, 2, 9, 3, 5),
    (2, 130, 2, 2, 16, 16, 64),
]
FORMS = [
    pytest.param(dict(), id="auto"),
    pytest.param(dict(chunk_size=16, factored=True), id="factored16"),
    pytest.param(dict(chunk_size=64, factored=True), id="factored64"),
    pytest.param(dict(chunk_size=16, factored=False), id="explicit16"),
    pytest.param(dict(chunk_size=7, factored=False), id="explicit7"),
]


def _reference(q, k, v, s, g, hk, hv):
    return gated_slot_attention(q, k, v, s, g, initial_state=(hk, hv), output_final_state=True, backend="reference")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_chunk_matches_reference_float64(shape, form):
    B, T, HQ, H, K, V, M = shape
    seed = hash((shape, str(form))) % 10_000
    tensors = gsa_inputs(*shape, seed=seed) + list(random_state(B, H, K, V, M, seed=seed + 1))
    scale = K**-0.5

    def chunked(q, k, v, s, g, hk, hv):
        return chunk_gsa(q, k, v, s, g, scale, (hk, hv), True, None, **form)

    got = outputs_and_grads(chunked, tensors)
    want = outputs_and_grads(_reference, tensors)
    assert_close_all(got, want, 1e-10, context=f"{shape} {form}")


def test_gradcheck_torch_backend():
    tensors = gsa_inputs(1, 11, 2, 1, 3, 2, 4, seed=3) + list(random_state(1, 1, 3, 2, 4, seed=4))
    leaves = [t.requires_grad_() for t in tensors]

    def fn(q, k, v, s, g, hk, hv):
        o, (hk1, hv1) = gated_slot_attention(
            q, k, v, s, g, 0.7, (hk, hv), True, backend="torch", check_gate_values=False
        )
        return o, hk1, hv1

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_low_precision_inputs(dtype, tol):
    shape = (2, 200, 4, 2, 32, 32, 64)
    tensors = [t.to(dtype) for t in gsa_inputs(*shape, seed=5)]
    hk, hv = random_state(2, 2, 32, 32, 64, seed=6)
    tensors += [hk.float(), hv.float()]
    got = outputs_and_grads(lambda *a: gated_slot_attention(*a[:5], None, a[5:], True, backend="torch"), tensors)
    # the truth: the same (rounded) inputs in float64
    want = outputs_and_grads(_reference, [t.double() for t in tensors])
    assert got[0].dtype == dtype
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_close_all(got, want, tol, context=str(dtype))


@pytest.mark.parametrize(
    "backend,backward_inside", [("torch", False), ("torch", True), ("reference", False)], ids=str
)
def test_autocast_region_changes_nothing(backend, backward_inside):
    """Inside torch.autocast (mixed-precision training), forward and backward equal the same call outside it:
    the operator keeps its own float32 accumulation instead of letting autocast recast its matmuls. The chunked
    path's hand-written backward also holds when backward() itself is called inside the region (the reference's
    autograd-derived backward is recast there, as any PyTorch code is)."""
    shape = (1, 70, 2, 1, 16, 8, 12)
    tensors = [t.bfloat16() for t in gsa_inputs(*shape, seed=21)]
    tensors += [t.float() for t in random_state(1, 1, 16, 8, 12, seed=22)]

    def run(*a):
        return gated_slot_attention(*a[:5], None, a[5:], True, backend=backend)

    def run_and_backprop_under_autocast(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(*a)

    want = outputs_and_grads(run, tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_inside):
        got = outputs_and_grads(run_and_backprop_under_autocast, tensors)
    for name, a, b in zip(["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"], got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def _random_splits(T: int, n: int, gen: torch.Generator) -> list[int]:
    cuts = torch.randperm(T - 1, generator=gen)[: n - 1] + 1
    return [0, *sorted(cuts.tolist()), T]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_varlen_equals_separate_sequences(backend):
    gen = torch.Generator().manual_seed(7)
    T, HQ, H, K, V, M = 150, 4, 2, 6, 5, 8
    offsets = _random_splits(T, 5, gen)
    N = len(offsets) - 1
    tensors = gsa_inputs(1, T, HQ, H, K, V, M, seed=8) + list(random_state(N, H, K, V, M, seed=9))
    cu = torch.tensor(offsets)

    def packed(q, k, v, s, g, hk, hv):
        return gated_slot_attention(q, k, v, s, g, None, (hk, hv), True, cu, backend=backend)

    def separate(q, k, v, s, g, hk, hv):
        outs, hks, hvs = [], [], []
        for i in range(N):
            a, b = offsets[i], offsets[i + 1]
            o, (hk_i, hv_i) = gated_slot_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], s[:, a:b], g[:, a:b], None,
                (hk[i : i + 1], hv[i : i + 1]), True, backend="reference",
            )
            outs.append(o)
            hks.append(hk_i)
            hvs.append(hv_i)
        return torch.cat(outs, 1), (torch.cat(hks), torch.cat(hvs))

    assert_close_all(outputs_and_grads(packed, tensors), outputs_and_grads(separate, tensors), 1e-10)


def test_decode_from_projections_equals_step_on_prepared_inputs():
    """gated_slot_attention_decode = the layer's activations and gates, then gated_slot_attention_step."""
    B, HQ, H, K, V, M = 2, 4, 2, 6, 5, 7
    gen = torch.Generator().manual_seed(41)
    q, k, v, f = (torch.randn(B, *shape, generator=gen, dtype=torch.float64)
                  for shape in ((HQ, K), (H, K), (H, V), (H, M)))
    hk, hv = random_state(B, H, K, V, M, seed=42)
    state = (hk.clone(), hv.clone())
    got = gated_slot_attention_decode(q, k, v, f, state, gate_logit_normalizer=4.0, feature_map="relu", clamp_min=-0.1)
    alpha = torch.sigmoid(f) ** (1 / 4.0)
    g = torch.log(alpha).clamp(min=-0.1)
    want, (hk1, hv1) = gated_slot_attention_step(
        torch.relu(q), torch.relu(k), torch.nn.functional.silu(v), 1 - torch.exp(g), g, (hk, hv), backend="reference"
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0], hk1, rtol=1e-12, atol=1e-12)  # updated in place
    torch.testing.assert_close(state[1], hv1, rtol=1e-12, atol=1e-12)


def test_split_sequence_passes_state():
    tensors = gsa_inputs(2, 90, 2, 1, 8, 8, 16, seed=10)
    whole, whole_state = gated_slot_attention(*tensors, output_final_state=True, backend="torch")
    first = [t[:, :41] for t in tensors]
    second = [t[:, 41:] for t in tensors]
    o1, state = gated_slot_attention(*first, output_final_state=True, backend="torch")
    o2, final = gated_slot_attention(*second, initial_state=state, output_final_state=True, backend="torch")
    assert rel_err(torch.cat([o1, o2], 1), whole) < 1e-12
    assert rel_err(final[0], whole_state[0]) < 1e-12 and rel_err(final[1], whole_state[1]) < 1e-12


@pytest.mark.parametrize("inplace", [False, True])
def test_decode_steps_equal_full_call(inplace):
    B, T, HQ, H, K, V, M = 3, 25, 4, 2, 8, 6, 10
    q, k, v, s, g = gsa_inputs(B, T, HQ, H, K, V, M, dtype=torch.float32, seed=11)
    full, (hk_full, hv_full) = gated_slot_attention(q, k, v, s, g, output_final_state=True, backend="torch")
    state = (torch.zeros(B, H, K, M), torch.zeros(B, H, M, V))
    outs = []
    for t in range(T):
        o, new_state = gated_slot_attention_step(q[:, t], k[:, t], v[:, t], s[:, t], g[:, t], state, inplace=inplace)
        if inplace:
            assert new_state[0] is state[0] and new_state[1] is state[1]
        state = new_state
        outs.append(o)
    assert rel_err(torch.stack(outs, 1), full) < 1e-5
    assert rel_err(state[0], hk_full) < 1e-5 and rel_err(state[1], hv_full) < 1e-5


def test_extreme_gates_stay_finite():
    """Log gates at -inf and -1e4 (alpha = 0) pick the explicit form and match the reference without NaN."""
    shape = (2, 70, 2, 2, 8, 8, 16)
    q, k, v, s, g = gsa_inputs(*shape, dtype=torch.float32, seed=12)
    gen = torch.Generator().manual_seed(13)
    g = g.clone()
    g[torch.rand(g.shape, generator=gen) < 0.05] = float("-inf")
    g[torch.rand(g.shape, generator=gen) < 0.05] = -1e4
    g[torch.rand(g.shape, generator=gen) < 0.2] = -30.0
    tensors = [q, k, v, s, g]
    got = outputs_and_grads(lambda *a: gated_slot_attention(*a, output_final_state=True, backend="torch"), tensors)
    want = outputs_and_grads(
        lambda *a: gated_slot_attention(*a, output_final_state=True, backend="reference"), [t.double() for t in tensors]
    )
    for name, x in zip(["o", "hk", "hv", "dq", "dk", "dv", "ds"], got):
        assert torch.isfinite(x).all(), name
    assert_close_all(got[:7], want[:7], 1e-4, context="extreme gates")


def test_span_limit_switches_form():
    q, k, v, s, g = gsa_inputs(1, 64, 1, 1, 4, 4, 4, dtype=torch.float32, seed=14)
    from gsa.ops.chunk import choose_chunking

    assert choose_chunking(g, None) == (64, True)
    steep = torch.full_like(g, -FACTORED_SPAN_LIMIT / 24)  # span 40 per 16 steps, 80 per 32
    assert choose_chunking(steep, None) == (16, True)
    assert choose_chunking(torch.full_like(g, -10.0), None)[1] is False


def test_short_sequences_take_a_chunk_no_longer_than_themselves():
    """A chunk beyond the longest sequence would be mostly padding: 8 steps take 16-step chunks, 40 take 32."""
    from gsa.ops.chunk import choose_chunking

    for T, size in ((8, 16), (16, 16), (40, 32), (64, 64), (100, 64)):
        g = gsa_inputs(2, T, 1, 1, 4, 4, 4, dtype=torch.float32, seed=15)[4]
        assert choose_chunking(g, None) == (size, True), T
    tensors = gsa_inputs(3, 8, 2, 2, 4, 4, 4, seed=16)

    def run(backend):
        return lambda *a: gated_slot_attention(*a, None, None, True, backend=backend)

    got, want = outputs_and_grads(run("torch"), tensors), outputs_and_grads(run("reference"), tensors)
    assert_close_all(got, want, 1e-10, context="8-step sequences")


def test_long_sequence_with_gates_near_one():
    """alpha -> 1 over 64K steps: states grow without bound for s > 0, but nothing overflows or drifts."""
    T = 65536
    q, k, v, s, g = gsa_inputs(1, T, 1, 1, 2, 2, 2, dtype=torch.float32, seed=15)
    g = torch.full_like(g, -1e-7)
    s = s * 0 + 0.5
    o, (hk, hv) = gated_slot_attention(q, k, v, s, g, output_final_state=True, backend="torch")
    assert torch.isfinite(o).all()
    # closed form of the final state: Σ_j k_j s_j exp(-(T - 1 - j) 1e-7), computed in float64
    w = torch.exp(-1e-7 * torch.arange(T - 1, -1, -1, dtype=torch.float64)) * 0.5
    hk_want = torch.einsum("t,tk->k", w, k[0, :, 0].double())
    # 64K float32 additions: the step-by-step float32 recurrence is off by 9e-4 here; chunking sums in a tree
    assert rel_err(hk[0, 0, :, 0], hk_want) < 1e-4
    assert rel_err(hk[0, 0, :, 1], hk_want) < 1e-4


def test_default_scale_is_inverse_sqrt_k():
    tensors = gsa_inputs(1, 10, 2, 2, 9, 4, 4, seed=16)
    o_default, _ = gated_slot_attention(*tensors, backend="torch")
    o_explicit, _ = gated_slot_attention(*tensors, scale=9**-0.5, backend="torch")
    o_other, _ = gated_slot_attention(*tensors, scale=1.0, backend="torch")
    assert rel_err(o_default, o_explicit) < 1e-14
    assert rel_err(o_other, o_default) > 1e-3


def test_auto_backend_on_cpu_is_torch():
    tensors = gsa_inputs(1, 20, 1, 1, 4, 4, 4, seed=17)
    auto, _ = gated_slot_attention(*tensors)
    chunked, _ = gated_slot_attention(*tensors, backend="torch")
    assert torch.equal(auto, chunked)


def test_matches_fla_naive_reference_when_installed():
    """Cross-check against the authors' plain-PyTorch recurrence (flash-linear-attention), GQA and states included."""
    naive = pytest.importorskip("fla.ops.gsa.naive")
    from gsa.models import register_auto_classes

    register_auto_classes()  # importing fla re-registered model_type "gsa" to its classes: later tests expect ours
    shape = (2, 45, 4, 2, 8, 6, 5)
    B, T, HQ, H, K, V, M = shape
    q, k, v, s, g = gsa_inputs(*shape, dtype=torch.float32, seed=21)
    hk, hv = random_state(B, H, K, V, M, dtype=torch.float32, seed=22)
    ours, (ours_hk, ours_hv) = gated_slot_attention(q, k, v, s, g, 0.3, (hk, hv), True, backend="torch")
    theirs, (their_hk, their_hv) = naive.naive_recurrent_gsa(q, k, v, s, g, 0.3, (hk, hv), True)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours_hk, their_hk) < 1e-5 and rel_err(ours_hv, their_hv) < 1e-5


def test_host_offsets_follow_the_tensor_not_its_values():
    """cu_seqlens' host copy is kept for the same unchanged tensor only; inference-mode tensors (no version
    counter) are read every time."""
    from gsa.ops.checks import host_offsets

    cu = torch.tensor([0, 3, 9])
    first = host_offsets(cu)
    assert first == [0, 3, 9] and host_offsets(cu) is first
    cu[1] = 4
    assert host_offsets(cu) == [0, 4, 9]
    with torch.inference_mode():
        frozen = torch.tensor([0, 5, 9])
        assert host_offsets(frozen) == [0, 5, 9]
        frozen[1] = 6
        assert host_offsets(frozen) == [0, 6, 9]
