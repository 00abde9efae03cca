"""Checkpoints in the layout the paper's authors released (fla-hub/gsa-*) load, and compute what their tensors say."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gsa.models import GSAForCausalLM
from gsa.ops import gated_slot_attention
from tests.helpers import rel_err

D, LAYERS, HEADS, KV_HEADS, SLOTS, VOCAB, INTER = 32, 2, 4, 2, 6, 50, 96

# config.json as the authors' exports write it (keys we do not use must be accepted too)
AUTHOR_CONFIG = {
    "architectures": ["GSAForCausalLM"],
    "model_type": "gsa",
    "hidden_size": D,
    "num_hidden_layers": LAYERS,
    "num_heads": HEADS,
    "num_kv_heads": KV_HEADS,
    "num_slots": SLOTS,
    "gate_logit_normalizer": 8,
    "clamp_min": None,
    "expand_k": 1,
    "expand_v": 1,
    "feature_map": "swish",
    "use_short_conv": False,
    "use_output_gate": False,
    "use_norm": True,
    "hidden_ratio": 4,
    "intermediate_size": INTER,
    "hidden_act": "swish",
    "elementwise_affine": True,
    "norm_eps": 1e-6,
    "attn": None,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "fuse_norm": True,
    "fuse_swiglu": True,
    "fuse_cross_entropy": True,
    "initializer_range": 0.02,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def random_author_tensors(seed=0) -> dict[str, torch.Tensor]:
    """The current release layout, random weights (norm weights random too, so a skipped norm shows)."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    head_k = D // HEADS
    t = {"model.embeddings.weight": w(VOCAB, D, std=1.0), "model.norm.weight": 1 + w(D), "lm_head.weight": w(VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "attn_norm.weight"] = 1 + w(D)
        t[p + "attn.q_proj.weight"] = w(HEADS * head_k, D)
        t[p + "attn.k_proj.weight"] = w(KV_HEADS * head_k, D)
        t[p + "attn.v_proj.weight"] = w(KV_HEADS * head_k, D)
        t[p + "attn.f_proj.weight"] = w(KV_HEADS * SLOTS, D, std=1.0)
        t[p + "attn.g_norm.weight"] = 1 + w(D)
        t[p + "attn.o_proj.weight"] = w(D, D)
        t[p + "mlp_norm.weight"] = 1 + w(D)
        t[p + "mlp.gate_proj.weight"] = w(INTER, D)
        t[p + "mlp.up_proj.weight"] = w(INTER, D)
        t[p + "mlp.down_proj.weight"] = w(D, INTER)
    return t


def to_older_layout(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pre-norms inside the mixers and a fused [gate; up] projection, as the older exports store them."""
    out = {}
    for name, tensor in t.items():
        name = name.replace(".attn_norm.", ".attn.norm.").replace(".mlp_norm.", ".mlp.norm.")
        if name.endswith("mlp.up_proj.weight"):
            continue
        if name.endswith("mlp.gate_proj.weight"):
            tensor = torch.cat([tensor, t[name.replace("gate_proj", "up_proj")]], 0)
        out[name] = tensor
    return out


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def logits_from_raw_tensors(t: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """The model written out from the paper's equations, over the raw tensors, with the step-by-step operator."""
    t = {k: v.double() for k, v in t.items()}
    B, T = input_ids.shape
    head_k = D // HEADS
    x = t["model.embeddings.weight"][input_ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        q = F.silu(h @ t[p + "attn.q_proj.weight"].T).view(B, T, HEADS, head_k)
        k = F.silu(h @ t[p + "attn.k_proj.weight"].T).view(B, T, KV_HEADS, head_k)
        v = F.silu(h @ t[p + "attn.v_proj.weight"].T).view(B, T, KV_HEADS, head_k)
        g = F.logsigmoid(h @ t[p + "attn.f_proj.weight"].T).view(B, T, KV_HEADS, SLOTS) / 8
        o, _ = gated_slot_attention(q, k, v, 1 - g.exp(), g, scale=1.0, backend="reference")
        o = rms(F.silu(o.reshape(B, T, D)), t[p + "attn.g_norm.weight"])
        x = x + o @ t[p + "attn.o_proj.weight"].T
        h = rms(x, t[p + "mlp_norm.weight"])
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def write_checkpoint(folder, tensors, **config_overrides):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**AUTHOR_CONFIG, **config_overrides}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


@pytest.mark.parametrize("layout", ["current", "older"])
def test_author_checkpoint_logits_match_raw_tensor_computation(tmp_path, layout):
    tensors = random_author_tensors()
    stored = tensors if layout == "current" else to_older_layout(tensors)
    write_checkpoint(tmp_path / layout, stored, norm_first=(layout == "older"))
    model = GSAForCausalLM.from_pretrained(tmp_path / layout, dtype=torch.float64)
    input_ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    got = model(input_ids, use_cache=False).logits
    want = logits_from_raw_tensors(tensors, input_ids)
    assert rel_err(got, want) < 1e-10


def test_author_checkpoint_sharded_with_index(tmp_path):
    tensors = random_author_tensors(seed=3)
    names = sorted(tensors)
    half = len(names) // 2
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(AUTHOR_CONFIG))
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = GSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    input_ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    assert rel_err(model(input_ids, use_cache=False).logits, logits_from_raw_tensors(tensors, input_ids)) < 1e-10


def test_missing_tensor_in_author_checkpoint_is_named(tmp_path):
    tensors = random_author_tensors()
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    write_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.down_proj.weight'\]"):
        GSAForCausalLM.from_pretrained(tmp_path)


def fla_config_fields() -> dict:
    """The authors' config as keyword arguments of FLA's GSAConfig (its class-level keys left out)."""
    return {k: v for k, v in AUTHOR_CONFIG.items() if k not in ("architectures", "model_type")}


def test_fla_saved_model_loads(tmp_path):
    """When flash-linear-attention is installed: its GSAForCausalLM, saved, loads into ours with equal weights."""
    fla_models = pytest.importorskip("fla.models")
    config = fla_models.GSAConfig(**fla_config_fields())
    torch.manual_seed(0)
    fla_model = fla_models.GSAForCausalLM(config)
    fla_model.save_pretrained(tmp_path, safe_serialization=True)
    ours = GSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    theirs = {k: v.double() for k, v in fla_model.state_dict().items()}
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    input_ids = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(4))
    want = logits_from_raw_tensors({k: v.float() for k, v in theirs.items()}, input_ids)
    assert rel_err(ours(input_ids, use_cache=False).logits, want) < 1e-10
    if torch.cuda.is_available():
        fla_model = fla_model.cuda().float()
        fla_logits = fla_model(input_ids.cuda()).logits.double().cpu()
        assert rel_err(fla_logits, want) < 1e-3


@pytest.mark.parametrize("short_conv", [False, True])
def test_fla_model_computes_ours_on_the_cpu(tmp_path, monkeypatch, short_conv):
    """When flash-linear-attention is installed: its GSAForCausalLM (with GQA, and the short convolutions of the
    MQAR models) gives our logits from the same weights, on the CPU. Its chunked GSA kernels and its fused
    norm-linear kernel do not run in Triton's interpreter, so its layer calls its own step-by-step reference
    recurrence and the plain RMSNorm-then-linear there instead; everything else is FLA's own code."""
    fla_models = pytest.importorskip("fla.models")
    fla_layer = pytest.importorskip("fla.layers.gsa")
    from fla.ops.gsa.naive import naive_recurrent_gsa

    def recurrence(q, k, v, s, g, initial_state=None, output_final_state=False, scale=None, cu_seqlens=None):
        assert cu_seqlens is None
        return naive_recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state)

    def norm_then_linear(x, weight, bias, linear_weight, linear_bias, eps=1e-6, **_):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight
        return F.linear(y.to(x.dtype), linear_weight, linear_bias)

    # FLA's other kernels (swish, short convolution) run in Triton's interpreter, which cannot benchmark: each
    # autotuned one takes its first config
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(Autotuner, "run", lambda self, *args, **kwargs: self.fn.run(
        *args, **{**kwargs, **self.configs[0].all_kwargs()}))
    monkeypatch.setattr(fla_layer, "chunk_gsa", recurrence)
    monkeypatch.setattr(fla_layer, "fused_recurrent_gsa", recurrence)
    monkeypatch.setattr(fla_layer, "rms_norm_linear", norm_then_linear)
    config = fla_models.GSAConfig(**{**fla_config_fields(), "use_short_conv": short_conv, "fuse_norm": False,
                                     "fuse_swiglu": False, "fuse_cross_entropy": False})
    torch.manual_seed(0)
    fla_model = fla_models.GSAForCausalLM(config).float()
    for name, parameter in fla_model.named_parameters():  # gates that differ across slots and steps
        if "f_proj" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    fla_model.save_pretrained(tmp_path, safe_serialization=True)
    ours = GSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    input_ids = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = fla_model(input_ids).logits
        got = ours(input_ids, use_cache=False).logits
    assert rel_err(got, want) < 1e-5
