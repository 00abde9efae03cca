"""GSAForCausalLM: forward/backward, padding, packing, cached decoding, generate, save/load, Auto classes, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from gsa.models import GSACache, GSAConfig, GSAForCausalLM, GSAModel, preset_config
from gsa.layers.fused import keeps_normed
from gsa.models.loss import linear_cross_entropy
from tests.helpers import rel_err

VOCAB = 97


def small_config(**overrides) -> GSAConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_heads=4, num_kv_heads=2, num_slots=8,
        intermediate_size=64, tie_word_embeddings=False,
    )
    return GSAConfig(**{**base, **overrides})


VARIANTS = {
    "gsa": {},
    "mha": dict(num_kv_heads=4),
    "short_conv": dict(use_short_conv=True, conv_size=3),
    "relu": dict(feature_map="relu", num_slots=5),
    "hybrid": dict(num_hidden_layers=3, attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2}),
}


def build(variant="gsa", seed=0, **overrides):
    torch.manual_seed(seed)
    model = GSAForCausalLM(small_config(**{**VARIANTS[variant], **overrides})).double()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens: compare whole sequences
    # make the gates differ across slots and steps so that a wrong gate path shows
    for module in model.modules():
        if hasattr(module, "f_proj"):
            torch.nn.init.normal_(module.f_proj.weight, std=0.5)
    return model.eval()


def ids(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_shapes_and_finite(variant):
    model = build(variant).train()
    x = ids(2, 70)
    out = model(x, labels=x)
    assert out.logits is None and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    logits = model(x, use_cache=False).logits
    assert logits.shape == (2, 70, VOCAB) and torch.isfinite(logits).all()
    # the loss equals cross-entropy of the returned logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert abs(model(x, labels=x).loss.item() - want.item()) < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_packed_and_separate(variant):
    model = build(variant)
    lengths = [13, 70, 41]
    seqs = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    separate = [model(s[None], use_cache=False).logits[0] for s in seqs]
    # right padding
    T = max(lengths)
    padded = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    logits = model(padded, attention_mask=mask, use_cache=False).logits
    for i, n in enumerate(lengths):
        assert rel_err(logits[i, :n], separate[i]) < 1e-10
    # packed with cu_seqlens
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = model(torch.cat(seqs)[None], cu_seqlens=cu, use_cache=False).logits[0]
    for i in range(len(seqs)):
        assert rel_err(packed[cu[i] : cu[i + 1]], separate[i]) < 1e-10


class HostReads(torch.overrides.TorchFunctionMode):
    """Records the calls that read tensor values back to the host (on a GPU: a wait for the device, after which
    the GPU idles while the host queues the next kernels), except while `paused`."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls, self.paused = [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        sized = name == "repeat_interleave" and isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if not self.paused and (name in self.READS or sized):
            self.calls.append(name)
        return func(*args, **kwargs)


def test_packed_training_step_reads_nothing_back_per_layer(monkeypatch):
    """The packed path (`gsa train` packs documents with cu_seqlens) reads tensor values back a fixed number of
    times a step, however deep the model: positions only where a short convolution needs them, and without a read
    back; cu_seqlens' offsets read once for every attention layer. Counted outside the operator (its GPU path keeps
    its layout per cu_seqlens; the CPU path that runs here is not that one)."""
    from gsa.layers import gsa as gsa_layer

    reads = HostReads()
    real_op = gsa_layer.gated_slot_attention

    def op_unwatched(*args, **kwargs):
        reads.paused = True
        try:
            return real_op(*args, **kwargs)
        finally:
            reads.paused = False

    monkeypatch.setattr(gsa_layer, "gated_slot_attention", op_unwatched)
    counts = []
    for layers in (2, 5):
        model = build("short_conv", num_hidden_layers=layers,
                      attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2}).train()
        x = ids(1, 90, seed=4)
        cu = torch.tensor([0, 30, 31, 90])
        reads.calls.clear()
        with reads:
            model(x, labels=x, cu_seqlens=cu).loss.backward()
        counts.append(list(reads.calls))
    assert counts[0] == counts[1] and len(counts[0]) <= 2, counts


@pytest.mark.parametrize("variant", ["gsa", "hybrid"])
def test_hidden_states_are_each_layers_input_and_the_normed_output(variant):
    """output_hidden_states: entry i is what layer i computes on (the residual stream, whose last addition each
    block leaves to the next norm), the last entry the final norm's output; the same in training and inference."""
    model = build(variant)
    x = ids(2, 40)
    inputs = []

    def record(module, args):
        residual, branch = args[0], args[6] if len(args) > 6 else None
        inputs.append(residual if branch is None else residual + branch)

    handles = [layer.register_forward_pre_hook(record) for layer in model.model.layers]
    for training in (False, True):
        inputs.clear()
        model.train(training)
        out = model(x, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        assert len(hidden) == len(model.model.layers) + 1
        for i, (got, want) in enumerate(zip(hidden, inputs)):
            assert torch.equal(got, want), (training, i)
        assert torch.equal(hidden[0], model.model.embeddings(x))
        assert torch.equal(model.lm_head(hidden[-1]), out.logits)
    for handle in handles:
        handle.remove()


def test_packed_sequences_with_bad_cu_seqlens_are_a_clear_error():
    """cu_seqlens that do not end at T are refused before positions are built from them (on a GPU a sized
    repeat_interleave would otherwise trip a device-side assert)."""
    model = build("short_conv")
    with pytest.raises(ValueError, match="cu_seqlens must end at T=90"):
        model(ids(1, 90), cu_seqlens=torch.tensor([0, 30, 80]), use_cache=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward_with_left_padding(variant):
    model = build(variant)
    lengths = [100, 67]  # prefills longer than one chunk; left-padded to the longest
    T, new = max(lengths), 9
    full = [ids(1, n + new, seed=20 + i)[0] for i, n in enumerate(lengths)]
    prompt = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, T - n :] = full[i][:n]
        mask[i, T - n :] = 1
    out = model(prompt, attention_mask=mask)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    steps = [out.logits[:, -1]]
    for t in range(new - 1):
        token = torch.stack([full[i][lengths[i] + t] for i in range(2)])[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        out = model(token, attention_mask=mask, cache=cache)
        steps.append(out.logits[:, -1])
    for i, n in enumerate(lengths):
        want = model(full[i][None, : n + new - 1], use_cache=False).logits[0, n - 1 :]
        got = torch.stack([s[i] for s in steps])
        assert rel_err(got, want) < 1e-9, variant


def test_cache_memory_is_constant_for_gsa_layers():
    model = build("gsa")
    out = model(ids(1, 30))
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    size = cache.nbytes()
    for _ in range(50):
        out = model(ids(1, 1, seed=3), cache=cache)
    assert cache.nbytes() == size and cache.seen_tokens == 80
    hybrid = build("hybrid")
    out = hybrid(ids(1, 30))
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    size = cache.nbytes()
    hybrid(ids(1, 1), cache=cache)
    assert cache.nbytes() > size  # its attention layer's keys grow, as they must


@pytest.mark.parametrize("variant", ["gsa", "hybrid", "short_conv"])
def test_generate_greedy_equals_manual_loop(variant):
    model = build(variant)
    prompt = ids(2, 23)
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    manual = prompt
    for _ in range(12):
        next_token = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, next_token], 1)
    assert torch.equal(got, manual)


def test_generate_left_padded_batch_matches_single_prompts():
    model = build("gsa")
    prompts = [ids(1, 17, seed=5)[0], ids(1, 9, seed=6)[0]]
    batch = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 17 - len(p) :] = p
        mask[i, 17 - len(p) :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
        assert torch.equal(together[i, 17:], alone[0, len(p) :])


def test_sampling_generate_runs_with_top_k_top_p():
    model = build("gsa")
    torch.manual_seed(0)
    out = model.generate(ids(1, 5), max_new_tokens=6, do_sample=True, top_k=10, top_p=0.9, temperature=0.8,
                         pad_token_id=0)
    assert out.shape == (1, 11) and int(out.max()) < VOCAB


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_and_auto_classes(tmp_path, tie):
    model = build("hybrid", tie_word_embeddings=tie)
    x = ids(2, 40)
    want = model(x, use_cache=False).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loader in (GSAForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, GSAForCausalLM)
        assert torch.equal(loaded(x, use_cache=False).logits, want)
        if tie:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GSAConfig)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, GSAModel)
    assert torch.equal(base(x, use_cache=False).last_hidden_state, model.model(x, use_cache=False).last_hidden_state)


def test_load_reports_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build("gsa")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.attn.f_proj.weight")
    state["model.layers.0.attn.surprise"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.attn.f_proj.weight'\].*surprise"):
        GSAForCausalLM.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    build("gsa").config.save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="does not load because unpickling can run code"):
        GSAForCausalLM.from_pretrained(tmp_path)


def test_a_folder_without_config_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="has no config.json"):
        GSAForCausalLM.from_pretrained(tmp_path)


def test_linear_cross_entropy_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (50,), generator=gen)
    labels[::7] = -100
    got = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    gh, gw = torch.autograd.grad(got * 3, (hidden, weight))
    want = F.cross_entropy(hidden @ weight.t(), labels)
    wh, ww = torch.autograd.grad(want * 3, (hidden, weight))
    assert abs(got.item() - want.item()) < 1e-12
    assert rel_err(gh, wh) < 1e-12 and rel_err(gw, ww) < 1e-12


class RecordProducts(TorchDispatchMode):
    """The operand dtypes of every matrix product run inside it."""

    def __enter__(self):
        super().__enter__()
        self.dtypes = []
        return self.dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            operands = args[:2] if func.overloadpacket is torch.ops.aten.mm else args[1:3]
            self.dtypes.append(tuple(t.dtype for t in operands))
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_without_grad_mode_forms_only_the_loss():
    """Under torch.no_grad (evaluation) with a weight that requires grad (the LM head's parameter): one product a
    chunk, the logits; no gradient products (which tripled the head's cost of every validation pass)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (40,), generator=gen)
    with torch.no_grad(), RecordProducts() as products:
        got = linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
    assert len(products) == 3  # 40 rows in chunks of 16
    assert abs(got.item() - F.cross_entropy(hidden @ weight.detach().t(), labels).item()) < 1e-5


def test_linear_cross_entropy_under_autocast_multiplies_in_its_dtype():
    """float32 hidden states and head under bf16 autocast (`gsa train` on one process): every product runs in bf16,
    as F.linear's would there (a `torch.mm(out=)` is not cast by autocast and ran in float32), the gradients come
    back in float32, and loss and gradients are what autocast makes of F.linear + F.cross_entropy."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(200, 32, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, 200, (40,), generator=gen)
    labels[::6] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with RecordProducts() as products:
            got = linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
        want = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    assert products and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in products), products
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    wh, ww = torch.autograd.grad(want, (hidden, weight))
    assert got.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    # the same bf16 operands on both sides; the composition rounds the logits' gradient to bf16 as well
    assert rel_err(gh, wh) < 1e-2 and rel_err(gw, ww) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_linear_cross_entropy_under_autocast_takes_the_row_kernel(monkeypatch):
    """`gsa train` on one GPU: float32 head and hidden states under bf16 autocast. The products run in bf16, the
    softmax gradient in the Triton row kernel (not the float32 fallback), and loss and gradients are autocast's
    composition's within bf16 rounding."""
    from gsa.models import loss as loss_module

    gen = torch.Generator(device="cuda").manual_seed(6)
    hidden = torch.randn(5000, 256, generator=gen, device="cuda", requires_grad=True)
    weight = (torch.randn(32000, 256, generator=gen, device="cuda") / 16).requires_grad_()
    labels = torch.randint(0, 32000, (5000,), generator=gen, device="cuda")
    labels[::5] = -100
    rows_calls = []
    original = loss_module.cross_entropy_rows

    def counted(*args, **kwargs):
        rows_calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(loss_module, "cross_entropy_rows", counted)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with RecordProducts() as products:
            got = linear_cross_entropy(hidden, weight, labels, chunk_rows=2048)
        want = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    assert rows_calls == [torch.bfloat16] * 3, rows_calls
    assert all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in products), products
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    wh, ww = torch.autograd.grad(want, (hidden, weight))
    assert gh.dtype == gw.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-3 * abs(want.item())
    assert rel_err(gh, wh) < 2e-2 and rel_err(gw, ww) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_linear_cross_entropy_bf16_accumulates_in_float32():
    """bf16 on the GPU: the LM head's weight gradient is summed over row chunks by products that add into a float32
    buffer (addmm with out_dtype); loss and gradients as the float32 computation's, within bf16 rounding, and no
    further from it than the rounded-product form."""
    from gsa.models import loss as loss_module

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 64, generator=gen).cuda()
    weight = (torch.randn(1000, 64, generator=gen) * 0.2).cuda()
    labels = torch.randint(0, 1000, (300,), generator=gen).cuda()
    exact = [t.clone().requires_grad_() for t in (hidden, weight)]
    F.cross_entropy(exact[0] @ exact[1].t(), labels).backward()
    errors = []
    try:
        for wide in (True, False):
            loss_module._WIDE_ADDMM[0] = wide
            h, w = (t.bfloat16().requires_grad_() for t in (hidden, weight))
            linear_cross_entropy(h, w, labels, chunk_rows=64).backward()
            errors.append((rel_err(h.grad.float(), exact[0].grad), rel_err(w.grad.float(), exact[1].grad)))
            if wide:
                assert loss_module._WIDE_ADDMM[0], "addmm with out_dtype failed on this GPU and torch"
    finally:
        loss_module._WIDE_ADDMM[0] = hasattr(torch.ops.aten.addmm, "dtype_out")
    (wide_h, wide_w), (plain_h, plain_w) = errors
    assert wide_h < 2e-2 and wide_w < 2e-2, errors
    assert wide_w <= plain_w * 1.05, errors

@pytest.mark.parametrize("grad", [True, False])
def test_linear_cross_entropy_row_kernel_matches_cross_entropy(grad, monkeypatch):
    """The Triton row kernel (interpreter on CPU, float32): loss and gradients as F.cross_entropy's, with ignored
    labels, a vocabulary that is not a multiple of the kernel's block (several blocks a row) and uneven chunks."""
    pytest.importorskip("triton")
    from gsa.layers import fused_triton
    from gsa.layers.fused import use_triton_kernels

    if not fused_triton.KERNELS_AVAILABLE:
        pytest.skip("triton kernels unavailable")
    monkeypatch.setattr(fused_triton, "CROSS_ENTROPY_BLOCK", 128)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=grad)
    weight = torch.randn(300, 16, generator=gen, requires_grad=grad)
    labels = torch.randint(0, 300, (50,), generator=gen)
    labels[::7] = -100
    labels[3] = 299  # the last column, in the last (partial) block
    if torch.cuda.is_available():  # natively there; in the interpreter on CPU tensors otherwise
        hidden, weight, labels = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (hidden, weight, labels))
    with use_triton_kernels(True):
        got = linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
    want = F.cross_entropy(hidden @ weight.t(), labels)
    assert abs(got.item() - want.item()) < 1e-5
    if grad:
        gh, gw = torch.autograd.grad(got * 3, (hidden, weight))
        wh, ww = torch.autograd.grad(want * 3, (hidden, weight))
        assert rel_err(gh, wh) < 1e-5 and rel_err(gw, ww) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_linear_cross_entropy_row_kernel_bf16():
    """bf16 at the 1.3B head's vocabulary: the row kernel against the PyTorch passes on the same inputs."""
    from gsa.layers.fused import use_triton_kernels

    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(6000, 256, generator=gen, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(32000, 256, generator=gen, device="cuda") / 16).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (6000,), generator=gen, device="cuda")
    labels[::5] = -100
    results = []
    for kernel in (True, False):
        with use_triton_kernels(kernel):
            loss = linear_cross_entropy(hidden, weight, labels)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    (loss1, gh1, gw1), (loss0, gh0, gw0) = results
    assert abs(loss1.item() - loss0.item()) < 1e-4 * abs(loss0.item())
    assert rel_err(gh1.float(), gh0.float()) < 1e-2 and rel_err(gw1.float(), gw0.float()) < 1e-2


def test_paper_preset_sizes():
    for name, billions in (("gsa-1.3b", 1.38), ("gsa-2.7b", 2.7)):
        with torch.device("meta"):
            model = GSAForCausalLM(preset_config(name))
        count = sum(p.numel() for p in model.parameters()) / 1e9
        assert abs(count - billions) / billions < 0.015, (name, count)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=50), "divisible by num_heads"),
        (dict(num_slots=0), "num_slots must be >= 1"),
        (dict(feature_map="elu"), "unknown feature_map 'elu'"),
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(attn={"layers": [5]}), "outside 0..1"),
        (dict(attn={"layers": [0], "window_size": 64}), "sliding-window"),
        (dict(gate_logit_normalizer=0), "gate_logit_normalizer must be > 0"),
        (dict(recompute_features="no"), "recompute_features must be true or false, got 'no'"),
        (dict(recompute_states=0), "recompute_states must be true or false, got 0"),
        (dict(recompute_norms="no"), "recompute_norms must be true, false or null, got 'no'"),
    ],
)
def test_invalid_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_bad_token_ids_and_masks():
    model = build("gsa")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\).*to 97"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="expected attention_mask of shape"):
        model(ids(2, 10), attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="expected input_ids of shape"):
        model(ids(2, 10)[0])
    with pytest.raises(ValueError, match="expected labels of shape"):
        model(ids(2, 10), labels=ids(2, 9))


def test_gradient_checkpointing_gives_same_gradients():
    x = ids(2, 40)
    grads = []
    for checkpointing in (False, True):
        model = build("gsa").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-12


@pytest.mark.parametrize("field, default", [("recompute_features", True), ("recompute_norms", None)])
def test_kept_config_reaches_every_gsa_layer_and_mlp_trains_the_same_and_survives_save_load(tmp_path, field, default):
    """GSAConfig.recompute_features=False (features and normalised rows kept for backward) and
    recompute_norms=False (the normalised rows alone; None, the default, follows recompute_features) are each GSA
    layer's and MLP's setting, give the recomputing model's loss and gradients, and come back from save/load (in
    config.json and in the loaded modules)."""
    x = ids(2, 40)
    grads = {}
    for value in (default, False):
        torch.manual_seed(0)
        model = build("hybrid", **{field: value}).train()
        modules = [block.attn for block in model.model.layers if hasattr(block.attn, field)]
        modules += [block.mlp for block in model.model.layers]
        assert len(modules) > len(model.model.layers) and all(getattr(m, field) is value for m in modules)
        assert all(keeps_normed(m) is (value is False) for m in modules)
        model(x, labels=x).loss.backward()
        grads[value] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_err(grads[False], grads[default]) < 1e-12
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[field] is False
    loaded = GSAForCausalLM.from_pretrained(tmp_path)
    assert all(getattr(block.mlp, field) is False and keeps_normed(block.mlp) for block in loaded.model.layers)


def test_kept_states_config_reaches_every_gsa_layer_and_survives_save_load(tmp_path):
    """GSAConfig.recompute_states=False is each GSA layer's setting (not the attention layers'), and comes back
    from save/load, in config.json and in the loaded layers."""
    model = build("hybrid", recompute_states=False)
    gsa_layers = [block.attn for block in model.model.layers if hasattr(block.attn, "recompute_states")]
    assert gsa_layers and len(gsa_layers) < len(model.model.layers)
    assert all(layer.recompute_states is False for layer in gsa_layers)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["recompute_states"] is False
    loaded = GSAForCausalLM.from_pretrained(tmp_path)
    assert all(block.attn.recompute_states is False for block in loaded.model.layers
               if hasattr(block.attn, "recompute_states"))
    assert build("gsa").model.layers[0].attn.recompute_states is True  # the default


def test_cache_object_is_returned_under_transformers_name():
    model = build("gsa")
    out = model(ids(1, 5))
    cache = out.get("cache") if "cache" in out.keys() else out.get("past_key_values")
    assert isinstance(cache, GSACache) and cache.seen_tokens == 5
