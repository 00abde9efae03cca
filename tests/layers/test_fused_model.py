"""The GSA layer and the whole model with the fused Functions (default) against the same modules through the plain
PyTorch compositions (`use_fused(False)`): equal outputs and gradients, and fewer bytes saved for backward."""

from __future__ import annotations

import contextlib

import pytest
import torch

import gsa.layers.gsa as gsa_layer
from gsa.layers import GatedSlotAttention, RMSNorm
from gsa.layers.fused import use_fused, use_triton_kernels
from gsa.models import GSAConfig, GSAForCausalLM
from tests.helpers import rel_err

VOCAB = 61
VARIANTS = {
    "gsa": {},
    "gqa_clamp": dict(num_kv_heads=2, clamp_min=-0.05),
    "short_conv": dict(use_short_conv=True, conv_size=3),
    "relu_no_affine": dict(feature_map="relu", elementwise_affine=False),
    "hybrid": dict(num_hidden_layers=3, attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2}),
}


def build(variant="gsa", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_heads=4, num_slots=8,
                intermediate_size=96, tie_word_embeddings=False)
    config = GSAConfig(**{**base, **VARIANTS[variant]})
    model = GSAForCausalLM(config).to(dtype)
    for module in model.modules():
        if hasattr(module, "f_proj"):
            torch.nn.init.normal_(module.f_proj.weight, std=0.5)  # gates that differ across slots and steps
        if isinstance(module, RMSNorm) and module.weight is not None:
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
    return model.train()


def ids(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, x, fused, autocast=False, mask=None):
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with use_fused(fused), context:
        loss = model(x, labels=x, attention_mask=mask).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_fused_equals_plain_float64(variant):
    model = build(variant)
    x = ids(2, 70)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :9] = 0  # left padding: the gates' mask path
    for m in (None, mask):
        got_loss, got = loss_and_grads(model, x, True, mask=m)
        want_loss, want = loss_and_grads(model, x, False, mask=m)
        assert torch.equal(got_loss, want_loss)
        for name in want:
            assert rel_err(got[name], want[name]) < 1e-12, name


@pytest.mark.parametrize("variant", ["gsa", "hybrid"])
@pytest.mark.parametrize("precision", ["float32", "bf16", "autocast"])
def test_model_fused_equals_plain_low_precision(variant, precision):
    """The forward is bitwise the plain one (same loss); gradients: float32 within 1e-5, bf16 weights or
    autocast no further from the float64 gradients than the plain composition's (1.1x + 2e-3)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = precision == "autocast"
    x = ids(2, 70)
    model = build(variant, dtype)
    got_loss, got = loss_and_grads(model, x, True, autocast)
    want_loss, want = loss_and_grads(model, x, False, autocast)
    assert torch.equal(got_loss, want_loss)
    if precision == "float32":
        for name in want:
            assert rel_err(got[name], want[name]) < 1e-5, name
        return
    exact_model = build(variant, torch.float64)
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, exact = loss_and_grads(exact_model, x, False)
    for name in want:
        e_got, e_want = rel_err(got[name], exact[name]), rel_err(want[name], exact[name])
        assert e_got <= 1.1 * e_want + 2e-3, (name, e_got, e_want)


def _saved_bytes_in_blocks(model, x, fused):
    """{(dtype, last dim): bytes} of the storages saved for backward inside the blocks."""
    saved, seen = {}, set()
    inside = [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if inside[0] and key not in seen and key not in params:
            seen.add(key)
            k = (t.dtype, t.shape[-1] if t.dim() else 0)
            saved[k] = saved.get(k, 0) + t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hooks = []
    for block in model.model.layers:
        hooks.append(block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)))
        hooks.append(block.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)))
    with use_fused(fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x)
    for h in hooks:
        h.remove()
    return saved


def test_fused_blocks_save_no_float32_copies_of_wide_activations():
    """bf16 weights: the plain blocks keep float32 [tokens, d] copies in every norm; the fused ones keep bf16
    inputs only, and in all far fewer bytes."""
    model = build("gsa", torch.bfloat16)
    x = ids(1, 128)
    plain = _saved_bytes_in_blocks(model, x, False)
    fused = _saved_bytes_in_blocks(model, x, True)
    wide = (48, 96)  # hidden and intermediate size
    assert any(d == torch.float32 and n in wide for d, n in plain)
    assert not any(d == torch.float32 and n in wide for d, n in fused)
    assert sum(fused.values()) < 0.6 * sum(plain.values())


@pytest.fixture
def triton_operator(monkeypatch):
    """The GSA layer calls the Triton kernels on any device (the interpreter on CPU), as on the GPU."""
    triton_ops = pytest.importorskip("gsa.ops.triton")
    if not triton_ops.KERNELS_AVAILABLE:
        pytest.skip("triton is not installed")

    def operator(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
        with torch.autocast(q.device.type, enabled=False):
            return triton_ops.chunk_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)

    monkeypatch.setattr(gsa_layer, "gated_slot_attention", operator)


@pytest.mark.parametrize("keep_gate_factors", [True, False], ids=["factors-kept", "factors-formed-again"])
def test_layer_with_triton_operator_recomputes_its_inputs(triton_operator, monkeypatch, keep_gate_factors):
    """With the Triton operator (which saves the q, k, v, s, g it is given), the fused layer keeps none of those:
    swish's inputs and f are saved already, and they are recomputed from them; gradients are unchanged. The
    operator's own gate factors and chunk decays are saved when it keeps them for its backward (the default)."""
    from gsa.ops.triton import chunk as chunk_kernels

    monkeypatch.setattr(chunk_kernels, "KEEP_GATE_FACTORS", keep_gate_factors)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU, natively on a GPU
    layer = GatedSlotAttention(32, num_heads=2, num_slots=8, layer_idx=0).to(device)
    norm = RMSNorm(32).to(device)
    x = torch.randn(1, 70, 32, device=device)
    cotangent = torch.randn(1, 70, 32, device=device)
    results = {}
    for fused in (False, True):
        xl = x.clone().requires_grad_()
        saved = {}

        def pack(t):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        # the norms' row kernels off: their rounding differs from the plain composition's, and this compares bitwise
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with use_fused(fused), use_triton_kernels(False), hooks:
            y, _ = layer(xl, norm=norm)
        layer.zero_grad(set_to_none=True)
        norm.zero_grad(set_to_none=True)
        (y * cotangent).sum().backward()
        params = {p.untyped_storage().data_ptr() for p in [*layer.parameters(), *norm.parameters()]}
        results[fused] = (
            y.detach(), xl.grad, [p.grad for p in [*layer.parameters(), *norm.parameters()]],
            sum(v for k, v in saved.items() if k not in params),
        )
    (y0, dx0, dp0, bytes0), (y1, dx1, dp1, bytes1) = results[False], results[True]
    assert torch.equal(y0, y1)
    assert rel_err(dx1, dx0) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(dp1, dp0))
    T, D, H, M = 70, 32, layer.num_heads, layer.num_slots
    # plain: x, norm's float32 x and x̂, its output, q/k/v in and out, f (float32 twice), exp(g), s, g, logits,
    # o, swish(o), g_norm's float32 pair and output. Fused: x, q/k/v in, f, logits, o (+ two 1/rms columns), and the
    # operator's gate factors (the size of s) and chunk decays when it keeps them for its backward.
    want = 4 * T * (D + 3 * D + H * M + H * M + D) + 2 * 4 * T
    if keep_gate_factors:
        want += 4 * T * H * M + 4 * -(-T // chunk_kernels.CHUNK) * H * M
    assert bytes1 == want, (bytes1, want, bytes0)


@pytest.mark.parametrize("row_kernels", [False, True], ids=["torch-rows", "kernel-rows"])
def test_layer_keeping_its_features_trains_the_same_and_saves_exactly_them(triton_operator, row_kernels):
    """recompute_features=False: the operator's inputs φ(q), φ(k), swish(v) and the two norms' outputs (the input
    norm's before q, k, v, f and g_norm's before o_proj) are kept instead of recomputed in backward;
    recompute_norms, when set, decides the norms' outputs alone. The output and every gradient are bitwise those of
    the recomputing layer, and the saved bytes grow by exactly the [tokens, width] tensors kept: five, the two
    normalised rows alone, or the three features alone. With the row kernels too (the features then come from one
    Function, and are rebuilt by its kernel)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = GatedSlotAttention(32, num_heads=2, num_slots=8, layer_idx=0).to(device)
    norm = RMSNorm(32).to(device)
    x = torch.randn(1, 70, 32, device=device)
    cotangent = torch.randn(1, 70, 32, device=device)
    params = {p.untyped_storage().data_ptr() for p in [*layer.parameters(), *norm.parameters()]}
    settings = {(True, None): 0, (False, None): 5, (True, False): 2, (False, True): 3, (True, True): 0}
    results = {}
    for features, norms in settings:
        layer.recompute_features, layer.recompute_norms = features, norms
        xl = x.clone().requires_grad_()
        saved = {}

        def pack(t):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with use_triton_kernels(row_kernels), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = layer(xl, norm=norm)
            layer.zero_grad(set_to_none=True)
            norm.zero_grad(set_to_none=True)
            (y * cotangent).sum().backward()
        grads = [xl.grad, *(p.grad for p in [*layer.parameters(), *norm.parameters()])]
        results[features, norms] = y.detach(), grads, sum(v for k, v in saved.items() if k not in params)
    y_re, grads_re, bytes_re = results[True, None]
    for setting, kept in settings.items():
        y_kept, grads_kept, bytes_kept = results[setting]
        assert torch.equal(y_re, y_kept) and all(torch.equal(a, b) for a, b in zip(grads_re, grads_kept)), setting
        assert bytes_kept - bytes_re == 4 * 70 * kept * 32, setting


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_model_under_activation_checkpointing(reentrant):
    """The trainer's non-reentrant checkpointing (and the reentrant form) around fused blocks: same gradients."""
    x = ids(2, 70)
    model = build("gsa")
    _, want = loss_and_grads(model, x, True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _, got = loss_and_grads(model, x, True)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-12, name
