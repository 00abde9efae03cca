"""T2R calibration and attention transfer (gsa.models.t2r_distill, gsa convert --data) on tiny random Llamas."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from safetensors.torch import load_file

from gsa.models import GSAForCausalLM
from gsa.models import t2r
from gsa.models.t2r import convert_to_gsa, gsa_config_from_source, build_gsa_model, teacher_from_source
from gsa.models.t2r_distill import (
    _normalised_output,
    calibrate_output_norm,
    capture_attention,
    distill_attention,
    layer_errors,
    student_layers,
)

from .test_t2r import COPIED, SMALL, make_source


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py


def pair(tmp_path, **overrides):
    """(student GSA model, teacher Llama, source tensors) built from one saved tiny Llama, sharing tensors as
    convert_to_gsa does."""
    from transformers import AutoConfig

    src = make_source(str(tmp_path / "src"), "llama", with_tokenizer=False, **overrides)
    source_config = AutoConfig.from_pretrained(src)
    state = load_file(os.path.join(src, "model.safetensors"))
    config, _ = gsa_config_from_source(source_config, num_slots=8)
    student = build_gsa_model(config, state)
    teacher = teacher_from_source(source_config, state)
    return student, teacher, {k: v.clone() for k, v in state.items()}


def windows(count, length=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SMALL["vocab_size"], (1, length), generator=generator) for _ in range(count)]


def test_teacher_is_the_source_model(tmp_path):
    from transformers import LlamaForCausalLM

    student, teacher, _ = pair(tmp_path)
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path / "src")).eval()
    ids = windows(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, reference(ids).logits)
    xs, ys, o_in = capture_attention(teacher, ids, output_inputs=True)
    assert len(xs) == len(ys) == len(o_in) == SMALL["num_hidden_layers"]
    layer = teacher.model.layers[1].self_attn
    torch.testing.assert_close(ys[1], layer.o_proj(o_in[1]))
    assert xs[0].shape == ys[0].shape == (1, 32, SMALL["hidden_size"])


def test_lstsq_calibration_is_the_least_squares_optimum(tmp_path):
    student, teacher, _ = pair(tmp_path)
    batches = windows(3)
    report = calibrate_output_norm(student, teacher, batches)
    assert all(a < min(1.0, b) for a, b in zip(report.error_after, report.error_before)), report
    assert "relative error" in report.summary()
    # the fitted weight minimises the squared error: any perturbation raises it
    base = sum(layer_errors(student, teacher, batches))
    generator = torch.Generator().manual_seed(5)
    for attn in student_layers(student):
        weight = attn.g_norm.weight.data.clone()
        for sign in (1, -1):
            attn.g_norm.weight.data = weight + sign * 0.05 * weight.abs().mean() * torch.randn(
                weight.shape, generator=generator
            )
            assert sum(layer_errors(student, teacher, batches)) > base
        attn.g_norm.weight.data = weight


def test_rms_calibration_matches_the_teacher_scale_per_channel(tmp_path):
    student, teacher, _ = pair(tmp_path)
    batches = windows(2)
    calibrate_output_norm(student, teacher, batches, method="rms")
    xs, _, o_in = capture_attention(teacher, torch.cat(batches), output_inputs=True)
    for i, attn in enumerate(student_layers(student)):
        with torch.no_grad(), _normalised_output(attn):
            z = attn(xs[i])[0]
        student_rms = (z * attn.g_norm.weight).square().mean((0, 1)).sqrt()
        teacher_rms = o_in[i].square().mean((0, 1)).sqrt()
        torch.testing.assert_close(student_rms, teacher_rms, rtol=1e-3, atol=1e-6)


def test_distillation_reduces_layer_error_and_leaves_the_rest_alone(tmp_path):
    student, teacher, source = pair(tmp_path)
    batches = windows(4, seed=1)
    calibrate_output_norm(student, teacher, batches)
    before = layer_errors(student, teacher, batches)
    report = distill_attention(student, teacher, batches, steps=30, lr=1e-3)
    after = layer_errors(student, teacher, batches)
    assert sum(after) < 0.5 * sum(before), (before, after)
    assert report.losses[-1] < report.losses[0] and report.tokens == 30 * 32
    assert "attention transfer" in report.summary()
    # the teacher still is the source (the student's trained tensors were cloned, not trained in place)
    for name, tensor in teacher.state_dict().items():
        if name in source:
            assert torch.equal(tensor, source[name]), name
    converted = student.state_dict()
    for src_name, dst_name in COPIED.items():
        if ".attn." in dst_name:
            assert not torch.equal(converted[dst_name], source[src_name]), f"{dst_name} was not trained"
        else:
            assert torch.equal(converted[dst_name], source[src_name]), dst_name
    assert all(p.requires_grad for p in student.parameters()) and not student.training


def test_distillation_of_selected_parts_only(tmp_path):
    student, teacher, source = pair(tmp_path)
    q_before = student.model.layers[0].attn.q_proj.weight.clone()
    distill_attention(student, teacher, windows(2), steps=3, parts=("f_proj", "g_norm"))
    assert torch.equal(student.model.layers[0].attn.q_proj.weight, q_before)
    assert not torch.equal(student.model.layers[0].attn.g_norm.weight, torch.ones(SMALL["hidden_size"]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t: distill_attention(s, t, windows(1), steps=1, parts=("mlp",)), "unknown or no layer parts"),
        (lambda s, t: distill_attention(s, t, windows(1), steps=0), "steps >= 1"),
        (lambda s, t: distill_attention(s, t, [], steps=1), "at least one batch"),
        (lambda s, t: calibrate_output_norm(s, t, windows(1), method="mean"), "unknown calibration method"),
        (lambda s, t: calibrate_output_norm(s, t, []), "at least one batch"),
        (lambda s, t: calibrate_output_norm(s, s, windows(1)), "not a Llama/Mistral-style model"),
    ],
)
def test_bad_inputs_are_refused_clearly(tmp_path, call, message):
    student, teacher, _ = pair(tmp_path)
    with pytest.raises(ValueError, match=message):
        call(student, teacher)


def test_convert_with_token_ids_calibrates_and_distills(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", tie=True)
    tokens = torch.randint(3, SMALL["vocab_size"], (2000,), generator=torch.Generator().manual_seed(0))
    report = convert_to_gsa(src, str(tmp_path / "gsa"), num_slots=8, data=tokens, distill_steps=3,
                            distill_batch=2, context=64, calibration_windows=2, device="cpu")
    assert len(report.tuned) == 2 and "g_norm calibrated" in report.tuned[0] and "token ids" in report.tuned[0]
    assert "least-squares" in report.added[1]
    source = load_file(os.path.join(src, "model.safetensors"))
    model = GSAForCausalLM.from_pretrained(report.output)
    converted = model.state_dict()
    for src_name, dst_name in COPIED.items():
        if src_name != "lm_head.weight" and ".attn." not in dst_name:
            assert torch.equal(converted[dst_name], source[src_name]), dst_name
    assert model.lm_head.weight is model.model.embeddings.weight
    assert not torch.equal(converted["model.layers.0.attn.g_norm.weight"], torch.ones(SMALL["hidden_size"]))
    assert torch.isfinite(model(tokens[:16][None]).logits).all()


def test_convert_command_fits_on_a_text_file(tmp_path, capsys):
    src = make_source(str(tmp_path / "src"), "mistral")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    parser = argparse.ArgumentParser()
    t2r.add_arguments(parser)
    out = str(tmp_path / "gsa")
    args = [src, out, "--num-slots", "4", "--data", str(text), "--distill-steps", "2", "--context", "32",
            "--distill-batch", "1", "--device", "cpu"]
    assert t2r.run(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "tuned: g_norm calibrated" in printed and "tuned: attention transfer: 2 steps" in printed
    plain = str(tmp_path / "plain")
    assert t2r.run(parser.parse_args([src, plain, "--num-slots", "4", "--plain", "--data", "no/such/file"])) == 0
    weight = GSAForCausalLM.from_pretrained(plain).model.layers[0].attn.g_norm.weight
    assert torch.equal(weight, torch.ones_like(weight))
    assert "tuned:" not in capsys.readouterr().out


def test_convert_data_errors_are_clear_and_write_nothing(tmp_path):
    src = make_source(str(tmp_path / "src"), "llama", with_tokenizer=False)
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3")
    cases = [
        (dict(data=str(text)), "source has none"),
        (dict(data=str(tmp_path / "missing.txt")), "neither a bundled corpus"),
        (dict(data=torch.full((100,), SMALL["vocab_size"])), "vocab_size"),
        (dict(data=torch.ones(10, dtype=torch.long), context=64), "fewer than one window"),
        (dict(distill_steps=2), "distillation needs text"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            convert_to_gsa(src, str(tmp_path / "gsa"), num_slots=4, device="cpu", **kwargs)
        assert not os.path.exists(tmp_path / "gsa")
