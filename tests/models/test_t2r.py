"""T2R conversion of small random Llama and Mistral checkpoints built here (no downloads)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from gsa.models import GSAForCausalLM
from gsa.models import t2r
from gsa.models.t2r import UnsupportedSourceError, convert_to_gsa

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

COPIED = {
    "model.embed_tokens.weight": "model.embeddings.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{
        f"model.layers.{i}.{src}": f"model.layers.{i}.{dst}"
        for i in range(SMALL["num_hidden_layers"])
        for src, dst in [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "mlp_norm.weight"),
            *[(f"self_attn.{p}_proj.weight", f"attn.{p}_proj.weight") for p in "qkvo"],
            *[(f"mlp.{p}_proj.weight", f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
        ]
    },
}


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(SMALL["vocab_size"] - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)


def make_source(folder, kind="llama", tie=False, with_tokenizer=True, **overrides):
    torch.manual_seed(0)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[kind]
    config = config_class(**{**SMALL, "tie_word_embeddings": tie, **overrides})
    model = model_class(config)
    with torch.no_grad():  # norms away from their ones initialisation, so copying them is tested
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if with_tokenizer:
        save_tokenizer(folder)
    return folder


@pytest.mark.parametrize(
    "kind, tie, extra",
    [("llama", False, {}), ("llama", True, {}), ("mistral", False, {"sliding_window": 16}), ("mistral", True, {})],
)
def test_conversion_copies_every_weight_and_runs(tmp_path, kind, tie, extra):
    src = make_source(str(tmp_path / "src"), kind, tie, **extra)
    out = str(tmp_path / "gsa")
    report = convert_to_gsa(src, out, num_slots=8, gate_logit_normalizer=8)

    source = load_file(os.path.join(src, "model.safetensors"))
    model = GSAForCausalLM.from_pretrained(out)
    converted = model.state_dict()
    for src_name, dst_name in COPIED.items():
        if tie and src_name == "lm_head.weight":
            continue
        assert torch.equal(converted[dst_name], source[src_name]), dst_name
    if tie:
        assert model.lm_head.weight is model.model.embeddings.weight
        assert "lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))

    config = model.config
    assert (config.num_heads, config.num_kv_heads, config.num_slots) == (4, 2, 8)
    assert config.gate_logit_normalizer == 8 and config.tie_word_embeddings == tie
    for layer in model.model.layers:
        assert layer.attn.head_k_dim == layer.attn.head_v_dim == 16
        f_proj = layer.attn.f_proj.weight
        assert f_proj.shape == (2 * 8, 64)
        assert torch.unique(f_proj, dim=0).shape[0] == f_proj.shape[0], "slot gates must differ (symmetry breaking)"
        assert torch.equal(layer.attn.g_norm.weight, torch.ones(64))
    source_count = sum(t.numel() for t in source.values())
    assert report.source_parameters == source_count
    assert report.gsa_parameters == source_count + 2 * 2 * 8 * 64 + 2 * 64
    assert any(line.startswith("RoPE") for line in report.dropped)
    assert any("sliding_window=16" in line for line in report.dropped) == ("sliding_window" in extra)
    assert set(report.added[0].split()) >= {"attn.f_proj"}

    ids = torch.randint(3, SMALL["vocab_size"], (2, 12))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    generated = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)

    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "gsa"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(src, name), "rb").read()


def test_converted_folder_round_trips(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", tie=True)
    first = GSAForCausalLM.from_pretrained(convert_to_gsa(src, str(tmp_path / "a"), num_slots=4, seed=3).output)
    again = str(tmp_path / "b")
    first.save_pretrained(again)
    second = GSAForCausalLM.from_pretrained(again)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    ids = torch.randint(3, SMALL["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_seed_fixes_the_new_gate_and_dtype_is_applied(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", with_tokenizer=False)
    a = convert_to_gsa(src, str(tmp_path / "a"), num_slots=4, seed=1, dtype=torch.bfloat16)
    b = convert_to_gsa(src, str(tmp_path / "b"), num_slots=4, seed=1, dtype=torch.bfloat16)
    assert "none found" in a.tokenizer
    weights_a, weights_b = (load_file(os.path.join(r.output, "model.safetensors")) for r in (a, b))
    assert all(t.dtype == torch.bfloat16 for t in weights_a.values())
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_head_width_other_than_hidden_over_heads_is_kept(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", head_dim=32)
    model = GSAForCausalLM.from_pretrained(convert_to_gsa(src, str(tmp_path / "gsa"), num_slots=4).output)
    source = load_file(os.path.join(src, "model.safetensors"))
    assert model.config.expand_k == model.config.expand_v == 2
    assert model.model.layers[0].attn.head_k_dim == 32
    assert torch.equal(model.model.layers[1].attn.o_proj.weight, source["model.layers.1.self_attn.o_proj.weight"])
    assert torch.isfinite(model(torch.randint(3, SMALL["vocab_size"], (1, 6))).logits).all()


def test_rope_scaling_is_reported_as_dropped(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    report = convert_to_gsa(src, str(tmp_path / "gsa"), num_slots=4)
    assert any("rope_type='linear'" in line for line in report.dropped)
    assert any(line.startswith("RoPE scaling") for line in report.dropped)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (
            {"hidden_size": 38, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 42},
            "head_dim=42",
        ),
    ],
)
def test_unrepresentable_sources_are_refused_naming_the_field(tmp_path, overrides, message):
    src = make_source(str(tmp_path / "src"), "llama", with_tokenizer=False, **overrides)
    with pytest.raises(UnsupportedSourceError, match=message):
        convert_to_gsa(src, str(tmp_path / "gsa"))
    assert not os.path.exists(tmp_path / "gsa")


def test_other_model_types_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(src)
    with pytest.raises(UnsupportedSourceError, match="model_type 'gpt2'"):
        convert_to_gsa(src, str(tmp_path / "gsa"))


def test_convert_command(tmp_path, capsys):
    src = make_source(str(tmp_path / "src"), "mistral", tie=True, sliding_window=32)
    out = str(tmp_path / "gsa")
    parser = argparse.ArgumentParser()
    t2r.add_arguments(parser)  # what `gsa convert` builds its arguments with
    assert t2r.run(parser.parse_args([src, out, "--num-slots", "8", "--gate-logit-normalizer", "16", "--plain"])) == 0
    printed = capsys.readouterr().out
    assert "sliding_window=32" in printed and "slots 8 per kv head" in printed
    config = GSAForCausalLM.from_pretrained(out).config
    assert (config.num_slots, config.gate_logit_normalizer) == (8, 16)


def test_default_command_calibrates_on_shakespeare_and_can_be_turned_off():
    parser = argparse.ArgumentParser()
    t2r.add_arguments(parser)
    args = parser.parse_args(["src", "out"])
    assert args.data == "shakespeare" and args.calibrate and args.distill_steps == t2r.DEFAULT_DISTILL_STEPS
    assert not parser.parse_args(["src", "out", "--no-calibrate"]).calibrate
    assert parser.parse_args(["src", "out", "--plain"]).plain
