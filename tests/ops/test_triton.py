"""Triton kernels against the step-by-step reference.

On CPU they run in Triton's interpreter (float32, small shapes); on a GPU the same tests run natively, plus the
GPU-only tests below at real shapes in bf16 / fp16 / fp32.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gsa.ops import gated_slot_attention, gated_slot_attention_decode, gated_slot_attention_step
from tests.helpers import NAMES, assert_close_all, gsa_inputs, outputs_and_grads, random_state, rel_err

triton_ops = pytest.importorskip("gsa.ops.triton")
if not triton_ops.KERNELS_AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

from gsa.ops.triton import chunk as chunk_kernels  # noqa: E402
from gsa.ops.triton import recurrent as recurrent_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["walk", "segment", "split"])
def state_pass(request, monkeypatch):
    """Every way of computing the chunk states (and their gradients), whatever the shape would pick; segments of
    two chunks, so that the small shapes' sequences are cut (with a shorter last segment where the count is odd)."""
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", request.param)
    monkeypatch.setattr(chunk_kernels, "SEGMENT_CHUNKS", 2)
    return request.param


@pytest.fixture
def launched(monkeypatch):
    """The names of the chunk kernels launched, in order."""
    names = []
    real = chunk_kernels._try
    monkeypatch.setattr(chunk_kernels, "_try", lambda kernel, *args: (names.append(kernel.fn.__name__),
                                                                      real(kernel, *args)))
    return names


def reference(q, k, v, s, g, hk=None, hv=None, cu_seqlens=None, scale=None):
    state = (hk, hv) if hk is not None else None
    args = [t.double().cpu() for t in (q, k, v, s, g)]
    state = tuple(h.double().cpu() for h in state) if state else None
    cu = cu_seqlens.cpu() if cu_seqlens is not None else None
    o, final = gated_slot_attention(*args, scale, state, True, cu, backend="reference")
    return o, final


def triton_call(q, k, v, s, g, hk=None, hv=None, cu_seqlens=None, scale=None):
    state = (hk, hv) if hk is not None else None
    return triton_ops.chunk_gsa_triton(q, k, v, s, g, scale if scale is not None else q.shape[-1] ** -0.5, state,
                                       True, cu_seqlens)


# (B, T, HQ, H, K, V, M): one and several chunks, T off the 64-step grid, odd widths, several K/V blocks, GQA
SHAPES = [
    (2, 37, 4, 2, 5, 7, 3),
    (1, 1, 2, 2, 4, 4, 4),
    (1, 200, 2, 1, 70, 130, 20),
    (2, 129, 3, 3, 16, 16, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_chunk_kernels_match_reference(shape, state_pass):
    B, T, HQ, H, K, V, M = shape
    tensors = gsa_inputs(*shape, dtype=torch.float32, seed=sum(shape), device=DEVICE)
    tensors += list(random_state(B, H, K, V, M, dtype=torch.float32, seed=3, device=DEVICE))
    got = outputs_and_grads(triton_call, tensors)
    want = outputs_and_grads(reference, tensors)
    assert_close_all([t.cpu() for t in got], want, 2e-5, context=str(shape))


def test_chunk_kernels_without_initial_state(state_pass):
    tensors = gsa_inputs(2, 90, 2, 2, 8, 8, 16, dtype=torch.float32, seed=4, device=DEVICE)
    got = outputs_and_grads(triton_call, tensors)
    want = outputs_and_grads(reference, tensors)
    assert_close_all([t.cpu() for t in got], want, 2e-5, names=["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"])


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "formed-again"])
def test_gate_factors_kept_or_formed_again_give_the_same_gradients(state_pass, monkeypatch, launched, keep):
    """KEEP_GATE_FACTORS (the default): the backward takes the forward's gate factors and decays, launching no
    _gate_factors of its own; off, it forms them again. Outputs and every gradient are the reference's either way."""
    monkeypatch.setattr(chunk_kernels, "KEEP_GATE_FACTORS", keep)
    tensors = gsa_inputs(2, 150, 4, 2, 70, 24, 20, dtype=torch.float32, seed=21, device=DEVICE)
    tensors += list(random_state(2, 2, 70, 24, 20, dtype=torch.float32, seed=22, device=DEVICE))
    got = outputs_and_grads(triton_call, tensors)
    want = outputs_and_grads(reference, tensors)
    assert_close_all([t.cpu() for t in got], want, 2e-5)
    assert launched.count("_gate_factors") == (1 if keep else 2)


@pytest.mark.parametrize("case", ["batch", "packed"])
def test_kept_states_give_the_same_gradients_without_a_state_pass_in_backward(state_pass, launched, monkeypatch,
                                                                             case):
    """keep_states: the backward takes the forward's chunk states instead of computing them again: the output,
    final states and every gradient are bitwise those of the default, and the backward launches no state pass.
    batch: two sequences with initial and final states; packed: three sequences (one of a single step) by cu_seqlens
    with initial states, no final states, and the gate factors formed again (KEEP_GATE_FACTORS off)."""
    gates_kept = case == "batch"
    monkeypatch.setattr(chunk_kernels, "KEEP_GATE_FACTORS", gates_kept)
    if case == "batch":
        B, T, N, cu, final = 2, 150, 2, None, True
    else:
        B, T, N, cu, final = 1, 220, 3, torch.tensor([0, 70, 71, 220], device=DEVICE), False
    tensors = gsa_inputs(B, T, 4, 2, 70, 24, 20, dtype=torch.float32, seed=24, device=DEVICE)
    tensors += list(random_state(N, 2, 70, 24, 20, dtype=torch.float32, seed=25, device=DEVICE))

    def run(keep):
        launched.clear()
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        o, states = triton_ops.chunk_gsa_triton(*leaves[:5], 70**-0.5, tuple(leaves[5:]), final, cu, keep_states=keep)
        outputs = [o, *(states or ())]
        gen = torch.Generator().manual_seed(26)
        loss = sum((x.double() * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)).sum()
                   for x in outputs)
        return [x.detach() for x in outputs] + list(torch.autograd.grad(loss, leaves)), list(launched)

    (recomputed, recomputing), (kept, keeping) = run(False), run(True)
    for i, (a, b) in enumerate(zip(kept, recomputed)):
        assert torch.equal(a, b), i
    # what the default's backward launches more is exactly the forward's state pass (and the gate factors, when
    # those are formed again)
    forward_states = [n for n in keeping[:keeping.index("_output_fwd")] if n != "_gate_factors" or not gates_kept]
    assert any(n != "_gate_factors" for n in forward_states) and ("_gate_factors" in forward_states) != gates_kept
    assert Counter(recomputing) - Counter(keeping) == Counter(forward_states)
    assert not Counter(keeping) - Counter(recomputing)


def test_without_final_states_the_output_and_all_gradients_match(state_pass):
    """output_final_state=False (a training step's call): the kernels store no final state at all, and the output
    and every gradient (the initial states' too) are still the reference's; with final states asked for, both
    halves come back contiguous in the documented shapes."""
    B, T, HQ, H, K, V, M = 2, 150, 4, 2, 70, 24, 20
    tensors = gsa_inputs(B, T, HQ, H, K, V, M, dtype=torch.float32, seed=21, device=DEVICE)
    tensors += list(random_state(B, H, K, V, M, dtype=torch.float32, seed=22, device=DEVICE))

    def output_and_grads(from_reference: bool):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        if from_reference:
            o, _ = reference(*leaves)
        else:
            o, final = triton_ops.chunk_gsa_triton(*leaves[:5], K**-0.5, tuple(leaves[5:]), False, None)
            assert final is None
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
        return [o.detach(), *torch.autograd.grad((o.double() * weights.to(o.device)).sum(), leaves)]

    names = ["o", *NAMES[3:]]
    assert_close_all([t.cpu() for t in output_and_grads(False)], output_and_grads(True), 2e-5, names=names)
    # initial states that need no gradient (a state carried over, detached): the others' gradients unchanged
    leaves = [t.detach().clone().requires_grad_(i < 5) for i, t in enumerate(tensors)]
    o, _ = triton_ops.chunk_gsa_triton(*leaves[:5], K**-0.5, tuple(leaves[5:]), False, None)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    detached = [o.detach(), *torch.autograd.grad((o.double() * weights.to(o.device)).sum(), leaves[:5])]
    assert_close_all([t.cpu() for t in detached], output_and_grads(True)[:6], 2e-5, names=names[:6])
    _, (hk, hv) = triton_call(*tensors)
    assert hk.shape == (B, H, K, M) and hv.shape == (B, H, M, V) and hk.is_contiguous() and hv.is_contiguous()
    assert hk.dtype == hv.dtype == torch.float32


def test_initial_states_in_another_dtype_keep_it_in_their_gradients():
    """Initial states in float16 next to float32 inputs: the kernels read them converted, and their gradients come
    back in float16 (autograd converts the operator's float32 views), equal to the reference's."""
    tensors = gsa_inputs(2, 70, 2, 2, 8, 8, 16, dtype=torch.float32, seed=14, device=DEVICE)
    tensors += list(random_state(2, 2, 8, 8, 16, dtype=torch.float16, seed=15, device=DEVICE))
    got = outputs_and_grads(triton_call, tensors)
    want = outputs_and_grads(reference, tensors)
    assert got[-2].dtype == got[-1].dtype == torch.float16
    assert_close_all([t.cpu().double() for t in got], want, 1e-3, context="float16 initial states")


@pytest.mark.parametrize("used", ["output", "final_k", "final_v"])
def test_gradients_through_only_some_outputs(used):
    """Outputs left out of the loss send no gradient (None, not zeros): the backward fills in what is missing."""
    tensors = gsa_inputs(1, 70, 2, 2, 8, 8, 16, dtype=torch.float32, seed=16, device=DEVICE)
    tensors += list(random_state(1, 2, 8, 8, 16, dtype=torch.float32, seed=17, device=DEVICE))

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        o, (hk, hv) = fn(*leaves)
        picked = {"output": o, "final_k": hk, "final_v": hv}[used]
        weights = torch.randn(picked.shape, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
        found = torch.autograd.grad((picked.double() * weights.to(picked.device)).sum(), leaves, allow_unused=True)
        return [d if d is not None else torch.zeros_like(t) for d, t in zip(found, leaves)]  # q: no path to states

    assert_close_all([t.cpu() for t in grads(triton_call)], grads(reference), 2e-5, names=NAMES[3:], context=used)


def test_configs_that_do_not_fit_step_down_and_stay_exact(monkeypatch):
    """A GPU without the shared memory for a kernel's config (256 slots on an H200) gets fewer stages, then smaller
    feature blocks: here the chunk-parallel kernels "fit" only at one stage and 16-wide blocks, and the results
    still equal the reference's; the step that fitted is remembered for the next call."""
    real_try, attempts = chunk_kernels._try, []

    def small_gpu(kernel, grid, args, meta):
        name = kernel.fn.__name__
        attempts.append((name, meta.get("num_stages"), meta.get("BK")))
        if name in ("_output_fwd", "_intra_bwd", "_state_grads_bwd") and (meta.get("BK", 16) > 16 or
                                                                         meta.get("num_stages", 1) > 1):
            raise chunk_kernels.OutOfResources(300_000, 232_448, "shared memory")
        real_try(kernel, grid, args, meta)

    monkeypatch.setattr(chunk_kernels, "_try", small_gpu)
    monkeypatch.setattr(chunk_kernels, "_FITTED", {})
    monkeypatch.setattr(chunk_kernels, "_STEPPED", set())
    tensors = gsa_inputs(1, 80, 2, 2, 64, 48, 16, dtype=torch.float32, seed=21, device=DEVICE)
    got = outputs_and_grads(triton_call, tensors)
    want = outputs_and_grads(reference, tensors)
    assert_close_all([t.cpu() for t in got], want, 2e-5, names=["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"])
    fitted = {key[0]: value for key, value in chunk_kernels._FITTED.items()}
    assert fitted["_output_fwd"] == ({**chunk_kernels.LAUNCH["_output_fwd"], "num_stages": 1}, {"BK": 16, "BV": 16})
    assert "_walk_states" not in fitted and chunk_kernels._STEPPED == {"_output_fwd", "_intra_bwd", "_state_grads_bwd"}
    attempts.clear()
    outputs_and_grads(triton_call, tensors)
    assert ("_intra_bwd", 1, 16) in attempts and all(stages == 1 for name, stages, _ in attempts
                                                     if name == "_intra_bwd")


def test_a_kernel_that_fits_no_config_names_itself(monkeypatch):
    def no_gpu(kernel, grid, args, meta):
        raise chunk_kernels.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(chunk_kernels, "_try", no_gpu)
    monkeypatch.setattr(chunk_kernels, "_FITTED", {})
    monkeypatch.setattr(chunk_kernels, "_STEPPED", set())
    with pytest.raises(RuntimeError, match="_gate_factors does not fit this GPU"):
        triton_call(*gsa_inputs(1, 8, 1, 1, 4, 4, 4, dtype=torch.float32, seed=1, device=DEVICE))


def test_steep_gates_take_the_exact_path(state_pass):
    """Chunks whose gate span exceeds the factored form's limit (gates at -inf, -1e4, -30) stay exact."""
    q, k, v, s, g = gsa_inputs(1, 130, 2, 1, 8, 8, 16, dtype=torch.float32, seed=5, device=DEVICE)
    gen = torch.Generator().manual_seed(6)
    g = g.clone().cpu()
    g[torch.rand(g.shape, generator=gen) < 0.05] = float("-inf")
    g[torch.rand(g.shape, generator=gen) < 0.05] = -1e4
    g[:, 64:90][torch.rand(g[:, 64:90].shape, generator=gen) < 0.5] = -30.0
    g = g.to(DEVICE)
    got = outputs_and_grads(triton_call, [q, k, v, s, g])
    want = outputs_and_grads(reference, [q, k, v, s, g])
    for name, x in zip(["o", "hk", "hv", "dq", "dk", "dv", "ds"], got):
        assert torch.isfinite(x).all(), name
    assert_close_all([t.cpu() for t in got[:7]], want[:7], 1e-4, names=["o", "hk", "hv", "dq", "dk", "dv", "ds"])


@pytest.mark.parametrize("query_heads", [2, 4], ids=["MHA", "GQA"])
def test_steep_chunks_with_gentle_sub_chunks_take_the_sub_chunk_form(query_heads, monkeypatch):
    """Gates that forget fast (chunk span far above the factored limit, every 16-step sub-chunk's below it: the
    sub-chunk form) next to gentle ones and one exact-path chunk; all outputs and gradients exact. The backward's
    scratch (dlogits, written only for the chunks off the factored form) starts as NaN: nothing reads what was not
    written."""
    from gsa.ops.chunk import FACTORED_SPAN_LIMIT

    monkeypatch.setattr(chunk_kernels, "_scratch",
                        lambda *shape, device: torch.full(shape, float("nan"), device=device))
    q, k, v, s, g = gsa_inputs(2, 192, query_heads, 2, 8, 8, 16, dtype=torch.float32, seed=9, device=DEVICE)
    gen = torch.Generator().manual_seed(10)
    g = g.clone().cpu()
    g[:, :128, :, :6] = -3.0 * torch.rand(g[:, :128, :, :6].shape, generator=gen)  # span ~96 a chunk, ~24-48 a sub
    g[1, 128:, 1, 3] = -40.0  # one sub-chunk over the limit: that chunk stays exact
    chunks, subs = -g.view(2, 3, 64, 2, 16).sum(2), -g.view(2, 12, 16, 2, 16).sum(2)
    assert (chunks.amax(-1)[:, :2] > FACTORED_SPAN_LIMIT).all() and (subs.amax(-1)[:, :8] <= FACTORED_SPAN_LIMIT).all()
    g = g.to(DEVICE)
    got = outputs_and_grads(triton_call, [q, k, v, s, g])
    want = outputs_and_grads(reference, [q, k, v, s, g])
    assert_close_all([t.cpu() for t in got], want, 1e-4, names=["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"])


def check_varlen(offsets, query_heads, seed):
    """Packed sequences with initial states: outputs, final states and all gradients against the reference."""
    N, H, K, V, M = len(offsets) - 1, 2, 8, 6, 16
    tensors = gsa_inputs(1, offsets[-1], query_heads, H, K, V, M, dtype=torch.float32, seed=seed, device=DEVICE)
    tensors += list(random_state(N, H, K, V, M, dtype=torch.float32, seed=seed + 1, device=DEVICE))
    cu = torch.tensor(offsets, device=DEVICE)
    got = outputs_and_grads(lambda *a: triton_call(*a, cu_seqlens=cu), tensors)
    want = outputs_and_grads(lambda *a: reference(*a, cu_seqlens=cu), tensors)
    assert_close_all([t.cpu() for t in got], want, 2e-5)


def test_varlen_matches_reference(state_pass):
    check_varlen([0, 5, 70, 71, 200], query_heads=4, seed=7)


def uniform(B, T):
    return chunk_kernels._uniform_layout(B, T, torch.device("cpu"))


def test_state_pass_rule(monkeypatch):
    """Auto walks whole sequences when sequences x heads x row blocks fill the GPU and walks segments otherwise;
    segments are cut to give about SEGMENT_PROGRAMS programs (whole sequences when a segment would hold one); a
    misspelled override is refused by name."""
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "auto")
    monkeypatch.setattr(chunk_kernels, "WALK_MIN_PROGRAMS", 256)
    monkeypatch.setattr(chunk_kernels, "SEGMENT_PROGRAMS", 512)
    plan = chunk_kernels.state_plan
    assert plan(uniform(8, 2048), 4, 512, 512) == (64, None)  # 8 x 4 x 16 = 512 programs
    assert plan(uniform(2, 8192), 4, 512, 512) == (64, 32)  # 128 programs: 4 segments of 32 chunks a sequence
    assert plan(uniform(64, 64), 2, 5, 7) == (16, None)  # narrow heads: the block follows the width
    assert plan(uniform(63, 64), 2, 5, 7) == (16, None)  # 252 programs, but one chunk a sequence: nothing to cut
    assert plan(uniform(1, 16384), 4, 512, 512) == (64, 32)  # 64 programs: 8 segments
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "walk")
    assert plan(uniform(1, 16384), 4, 512, 512) == (64, None)
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "segment")
    assert plan(uniform(2, 8192), 4, 512, 512) == (64, 32)  # 128 programs: 4 segments of 32 chunks a sequence
    assert plan(uniform(1, 16384), 4, 512, 512) == (64, 32)  # 64 programs: 8 segments
    assert plan(uniform(1, 1024), 4, 512, 512) == (64, 8)  # 16 chunks: segments of at least 8
    assert plan(uniform(1, 512), 4, 512, 512) == (64, None)  # 8 chunks: one segment would be the whole walk
    assert plan(uniform(8, 2048), 4, 512, 512) == (64, None)  # 512 programs already: a segment is a sequence
    monkeypatch.setattr(chunk_kernels, "SEGMENT_CHUNKS", 3)
    assert plan(uniform(8, 2048), 4, 512, 512) == (64, 3)
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "split")
    assert plan(uniform(1, 16384), 32, 512, 512) is None
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "walking")
    with pytest.raises(ValueError, match="auto, walk, segment or split"):
        plan(uniform(1, 64), 1, 8, 8)


def test_segments_cover_each_sequence_in_order():
    """Segment bounds of a ragged batch: whole chunks, none across sequences, a short last one, empty sequences
    without segments; slots and chunks indexed as the sequence layout's."""
    layout = chunk_kernels.ChunkLayout(torch.tensor([0, 130, 130, 200, 456]), 456, None)
    spans = layout.segments(2)
    # sequence chunks: 3, 0, 2, 4 -> segments [2, 1], [], [2], [2, 2]
    assert spans.cu_seqlens.tolist() == [0, 128, 130, 200, 328, 456]
    assert spans.first.tolist() == [0, 2, 2, 3, 5]
    assert spans.slot_base.tolist() == [0, 2, 5, 8, 10]  # each sequence owns chunks + 1 slots
    assert spans.chunk_base.tolist() == [0, 2, 3, 5, 7]
    assert layout.max_chunks == 4
    assert layout.segments(2) is spans


@pytest.mark.parametrize("length, offsets", [(1, [0, 250, 251, 400]), (3, [0, 250, 251, 400]),
                                             (17, [0, 1200, 1201, 2600])], ids=str)
def test_segment_lengths_match_reference(length, offsets, monkeypatch):
    """Segments of one chunk (every chunk its own), of three (uneven tails) and of 17 (the join multiplies a
    segment's chunk decays 16 at a time), ragged batch with initial states; the final-state gradient flows in
    through the states (output_final_state)."""
    monkeypatch.setattr(chunk_kernels, "STATE_PASS", "segment")
    monkeypatch.setattr(chunk_kernels, "SEGMENT_CHUNKS", length)
    check_varlen(offsets, query_heads=2, seed=11)


SMALL_STEP_BLOCKS = dict(BK=32, BV=16, num_warps=2, STREAM=True)  # 3 key and 3 value blocks a head


@pytest.mark.parametrize("inplace, launch", [(True, None), (False, None), (True, SMALL_STEP_BLOCKS)],
                         ids=["inplace", "fresh", "inplace-small-blocks"])
def test_decode_step_kernel_matches_reference(inplace, launch, monkeypatch):
    """Steps of the kernel equal the reference's recurrence, GQA with odd widths; also with several state blocks
    a head and the state streamed (the launch settings benchmarks/tune_decode.py sweeps)."""
    if launch is not None:
        monkeypatch.setattr(recurrent_kernels, "STEP_LAUNCH", launch)
    B, T, HQ, H, K, V, M = 3, 6, 4, 2, 70, 33, 20
    q, k, v, s, g = gsa_inputs(B, T, HQ, H, K, V, M, dtype=torch.float32, seed=9, device=DEVICE)
    hk0, hv0 = random_state(B, H, K, V, M, dtype=torch.float32, seed=10, device=DEVICE)
    want, (hk_want, hv_want) = reference(q, k, v, s, g, hk0, hv0)
    state = (hk0.clone(), hv0.clone())
    outs = []
    for t in range(T):
        o, new_state = triton_ops.triton_gsa_step(q[:, t], k[:, t], v[:, t], s[:, t], g[:, t], state, K**-0.5,
                                                  inplace=inplace)
        assert (new_state[0] is state[0]) == inplace
        state = new_state
        outs.append(o)
    assert rel_err(torch.stack(outs, 1).cpu(), want) < 2e-6
    assert rel_err(state[0].cpu(), hk_want) < 2e-6 and rel_err(state[1].cpu(), hv_want) < 2e-6


@pytest.mark.parametrize("feature_map,clamp_min,launch", [("swish", None, None), ("relu", -0.05, None),
                                                         ("identity", None, None), ("swish", -0.05, SMALL_STEP_BLOCKS)])
def test_fused_decode_step_kernel_matches_torch(feature_map, clamp_min, launch, monkeypatch):
    """The decode step from raw projections (feature maps, swish and gates formed inside the kernels) equals
    the torch path of gated_slot_attention_decode, step after step, with GQA and odd widths; also with several key
    and value blocks a head (every value program reading the gates the first key block's program formed)."""
    if launch is not None:
        monkeypatch.setattr(recurrent_kernels, "STEP_LAUNCH", launch)
    B, T, HQ, H, K, V, M = 2, 4, 6, 2, 70, 33, 20
    gen = torch.Generator().manual_seed(31)
    q, k, v, f = (torch.randn(B, T, *shape, generator=gen) for shape in ((HQ, K), (H, K), (H, V), (H, M)))
    f = f * 4  # gate logits spread over both saturated ends
    hk0, hv0 = random_state(B, H, K, V, M, dtype=torch.float32, seed=32)
    state_torch, state_kernel = (hk0.clone(), hv0.clone()), (hk0.clone().to(DEVICE), hv0.clone().to(DEVICE))
    projections = (8.0, feature_map, clamp_min)
    for t in range(T):
        want = gated_slot_attention_decode(q[:, t], k[:, t], v[:, t], f[:, t], state_torch, 0.3,
                                           gate_logit_normalizer=8.0, feature_map=feature_map, clamp_min=clamp_min,
                                           backend="torch")
        got = triton_ops.triton_gsa_decode(*(x[:, t].to(DEVICE) for x in (q, k, v, f)), state_kernel, 0.3,
                                           projections)
        assert rel_err(got.cpu(), want) < 2e-6, t
    assert rel_err(state_kernel[0].cpu(), state_torch[0]) < 2e-6
    assert rel_err(state_kernel[1].cpu(), state_torch[1]) < 2e-6


class _NaNScratch:
    """torch for recurrent.py, but torch.empty fills with NaN: the step's scratch (partial logits, gates, output) must
    not depend on fresh memory happening to be clean."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        return torch.full(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape, float("nan"),
                          **kwargs)


@pytest.mark.parametrize("from_logits", [False, True], ids=["prepared-gates", "from-logits"])
def test_decode_step_ignores_scratch_contents(from_logits, monkeypatch):
    """Slots past M (BM = 32 for M = 20), several key and value blocks, GQA with a padded group (3 query heads a
    group, BG = 4): with the step's scratch filled with NaN the output and states still equal the torch step's."""
    monkeypatch.setattr(recurrent_kernels, "torch", _NaNScratch())
    monkeypatch.setattr(recurrent_kernels, "STEP_LAUNCH", SMALL_STEP_BLOCKS)
    B, HQ, H, K, V, M = 2, 6, 2, 70, 33, 20
    gen = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(B, *shape, generator=gen) for shape in ((HQ, K), (H, K), (H, V)))
    f = torch.randn(B, H, M, generator=gen) * 4
    hk0, hv0 = random_state(B, H, K, V, M, dtype=torch.float32, seed=42)
    state_kernel = (hk0.clone().to(DEVICE), hv0.clone().to(DEVICE))
    if from_logits:
        state_torch = (hk0.clone(), hv0.clone())
        want = gated_slot_attention_decode(q, k, v, f, state_torch, 0.3, gate_logit_normalizer=8.0,
                                           feature_map="swish", backend="torch")
        got = triton_ops.triton_gsa_decode(*(x.to(DEVICE) for x in (q, k, v, f)), state_kernel, 0.3,
                                           (8.0, "swish", None))
    else:
        g = torch.nn.functional.logsigmoid(f) / 8
        s = 1 - g.exp()
        want, state_torch = gated_slot_attention_step(q, k, v, s, g, (hk0, hv0), 0.3, backend="torch")
        got, _ = triton_ops.triton_gsa_step(*(x.to(DEVICE) for x in (q, k, v, s, g)), state_kernel, 0.3,
                                            inplace=True)
    assert torch.isfinite(got).all()
    assert rel_err(got.cpu(), want) < 2e-6
    assert rel_err(state_kernel[0].cpu(), state_torch[0]) < 2e-6
    assert rel_err(state_kernel[1].cpu(), state_torch[1]) < 2e-6


def test_short_prompt_without_grad_uses_recurrent_kernel_and_matches():
    tensors = gsa_inputs(2, 9, 2, 1, 16, 16, 8, dtype=torch.float32, seed=11, device=DEVICE)
    with torch.no_grad():
        o, (hk, hv) = triton_ops.triton_gsa(*tensors, 0.25, None, True)
    want, (hk_want, hv_want) = reference(*tensors, scale=0.25)
    assert rel_err(o.cpu(), want) < 2e-6 and rel_err(hk.cpu(), hk_want) < 2e-6 and rel_err(hv.cpu(), hv_want) < 2e-6


# ---- GPU only: real shapes and low precision -------------------------------------------------------------------

@gpu
@pytest.mark.parametrize(
    "shape,dtype,tol",
    [
        ((2, 2048, 4, 4, 512, 512, 64), torch.bfloat16, 1e-2),  # the paper's 1.3B layer
        ((1, 1000, 32, 8, 64, 64, 48), torch.bfloat16, 1e-2),  # Mistral-7B-like GQA, slots off a power of two
        ((1, 1000, 32, 8, 64, 64, 48), torch.float16, 1e-2),
        ((1, 1000, 32, 8, 64, 64, 48), torch.float32, 1e-4),
        ((2, 300, 2, 2, 64, 64, 256), torch.bfloat16, 1e-2),  # 256 slots
    ],
    ids=str,
)
def test_gpu_real_shapes(shape, dtype, tol):
    B, T, HQ, H, K, V, M = shape
    tensors = [t.to(dtype) for t in gsa_inputs(*shape, dtype=torch.float32, seed=12, device="cuda")]
    tensors += list(random_state(B, H, K, V, M, dtype=torch.float32, seed=13, device="cuda"))
    got = outputs_and_grads(lambda *a: gated_slot_attention(*a[:5], None, a[5:], True, backend="triton"), tensors)
    want = outputs_and_grads(
        lambda *a: gated_slot_attention(*a[:5], None, a[5:], True, backend="torch"), [t.double() for t in tensors]
    )
    assert_close_all([t.float() for t in got], want, tol, context=f"{shape} {dtype}")


@gpu
def test_gpu_long_sequence_and_varlen_bf16():
    offsets = [0, 100, 5000, 5001, 70000]
    cu = torch.tensor(offsets, device="cuda")
    tensors = [t.bfloat16() for t in gsa_inputs(1, offsets[-1], 4, 2, 64, 64, 64, dtype=torch.float32, seed=14,
                                                 device="cuda")]
    o, (hk, hv) = gated_slot_attention(*tensors, None, None, True, cu, backend="triton")
    want, (hk_want, hv_want) = gated_slot_attention(*[t.float() for t in tensors], None, None, True, cu,
                                                    backend="torch")
    assert rel_err(o.float(), want) < 1e-2 and rel_err(hk, hk_want) < 1e-2 and rel_err(hv, hv_want) < 1e-2


def check_last_sequence_alone(first: int, tail: int, H: int, K: int, M: int, dtype, tol: float):
    """A pack of two sequences (`first` then `tail` tokens): the second's output, final state and every gradient
    equal those of the same sequence run alone."""
    total = first + tail
    gen = torch.Generator(device=DEVICE).manual_seed(19)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    q, k, v = randn(1, total, H, K), randn(1, total, H, K), randn(1, total, H, K)
    g = (torch.nn.functional.logsigmoid(randn(1, total, H, M).float() * 2) / 8).to(dtype)
    s = 1 - torch.exp(g)
    do = torch.zeros_like(q)
    do[:, first:] = randn(1, tail, H, K)
    cu = torch.tensor([0, first, total], device=DEVICE)

    def run(tensors, cu_seqlens, cotangent):
        leaves = [x.detach().requires_grad_() for x in tensors]
        o, (hk, hv) = triton_ops.triton_gsa(*leaves, K**-0.5, None, True, cu_seqlens)
        o.backward(cotangent)
        return o.detach(), hk[-1], hv[-1], [x.grad for x in leaves]

    inputs = [q, k, v, s, g]
    tails = [x[:, first:].clone() for x in inputs]
    o, hk, hv, grads = run(inputs, cu, do)
    o, grads = o[:, first:].clone(), [x[:, first:].clone() for x in grads]
    del q, k, v, s, g, inputs  # the big tensors go before the small run
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    o_alone, hk_alone, hv_alone, grads_alone = run(tails, None, do[:, first:].contiguous())
    assert rel_err(o.float(), o_alone.float()) < tol
    assert rel_err(hk, hk_alone) < tol and rel_err(hv, hv_alone) < tol
    for name, got, want in zip(("dq", "dk", "dv", "ds", "dg"), grads, grads_alone):
        assert rel_err(got.float(), want.float()) < tol, name


def test_last_sequence_of_a_pack_equals_it_alone():
    check_last_sequence_alone(first=130, tail=70, H=2, K=16, M=8, dtype=torch.float32, tol=1e-5)


@gpu
def test_gpu_offsets_past_int32_address_the_right_elements():
    """The second sequence of a pack starts past 2**31 elements of q, k and v (B·T·H·K > 2**31, the paper's
    layer): equal to it alone, so no address wrapped at 32 bits, forward or backward. ~60 GB of GPU memory."""
    if torch.cuda.get_device_properties(0).total_memory < 100 * 2**30:
        pytest.skip("needs a GPU with >= 100 GB (the inputs alone pass 2**31 elements)")
    H, K = 4, 512
    first = 2**31 // (H * K) + 64  # the second sequence's elements start past 2**31
    check_last_sequence_alone(first=first, tail=300, H=H, K=K, M=64, dtype=torch.bfloat16, tol=1e-2)


@gpu
def test_gpu_decode_step_in_cuda_graph():
    B, HQ, H, K, V, M = 4, 8, 4, 128, 128, 64
    q, k, v, s, g = (t[:, 0] for t in gsa_inputs(B, 1, HQ, H, K, V, M, dtype=torch.bfloat16, seed=15, device="cuda"))
    hk, hv = random_state(B, H, K, V, M, dtype=torch.float32, seed=16, device="cuda")
    state = (hk.clone(), hv.clone())
    want, (hk_want, hv_want) = gated_slot_attention_step(q, k, v, s, g, (hk.clone(), hv.clone()), backend="torch")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gated_slot_attention_step(q, k, v, s, g, (hk.clone(), hv.clone()), inplace=True, backend="triton")  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = gated_slot_attention_step(q, k, v, s, g, state, inplace=True, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(o.float(), want.float()) < 1e-2
    assert rel_err(state[0], hk_want) < 1e-5 and rel_err(state[1], hv_want) < 1e-5


@gpu
def test_gpu_fused_decode_in_cuda_graph_bf16():
    B, HQ, H, K, V, M = 4, 8, 4, 128, 128, 64
    gen = torch.Generator(device="cuda").manual_seed(17)
    q, k, v, f = (torch.randn(B, *shape, generator=gen, device="cuda").bfloat16()
                  for shape in ((HQ, K), (H, K), (H, V), (H, M)))
    hk, hv = random_state(B, H, K, V, M, dtype=torch.float32, seed=18, device="cuda")
    want_state = (hk.clone(), hv.clone())
    want = gated_slot_attention_decode(q, k, v, f, want_state, backend="torch")
    state = (hk.clone(), hv.clone())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gated_slot_attention_decode(q, k, v, f, (hk.clone(), hv.clone()), backend="triton")  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = gated_slot_attention_decode(q, k, v, f, state, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(o.float(), want.float()) < 1e-2
    assert rel_err(state[0], want_state[0]) < 1e-5 and rel_err(state[1], want_state[1]) < 1e-5


def test_packed_sequences_are_read_back_once_per_cu_seqlens(monkeypatch):
    """Every layer of a model gets the same cu_seqlens: its offsets are read to the host (a device sync on a GPU) and
    its chunk layout built once, not once per layer; an in-place change or another tensor is read again."""
    from gsa.ops.checks import check_cu_seqlens

    reads, builds = [], []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))

    class CountingLayout(chunk_kernels.ChunkLayout):
        def __init__(self, *args):
            builds.append(1)
            super().__init__(*args)

    monkeypatch.setattr(chunk_kernels, "ChunkLayout", CountingLayout)
    B, T, HQ, H, K, V, M = 1, 150, 2, 2, 8, 8, 4
    q, k, v, s, g = gsa_inputs(B, T, HQ, H, K, V, M, dtype=torch.float32, seed=27, device=DEVICE)
    cu = torch.tensor([0, 40, 150], device=DEVICE)
    outputs = []
    for _ in range(3):  # three "layers"
        assert check_cu_seqlens(cu, B, T, cu.device) == 2
        outputs.append(triton_ops.chunk_gsa_triton(q, k, v, s, g, K**-0.5, cu_seqlens=cu)[0])
    assert len(reads) == 1 and len(builds) == 1
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    cu[1] = 60  # changed in place: read and built again
    check_cu_seqlens(cu, B, T, cu.device)
    moved = triton_ops.chunk_gsa_triton(q, k, v, s, g, K**-0.5, cu_seqlens=cu)[0]
    assert len(reads) == 2 and len(builds) == 2
    other = torch.tensor([0, 60, 150], device=DEVICE)  # equal values, another tensor
    check_cu_seqlens(other, B, T, other.device)
    assert len(reads) == 3
    want, _ = reference(q, k, v, s, g, cu_seqlens=cu, scale=K**-0.5)  # the new layout is the changed one's
    assert rel_err(moved.cpu(), want) < 2e-5
