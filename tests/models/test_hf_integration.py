"""The model inside transformers' own machinery: pipeline() and streamers give what generate() gives."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline

from gsa.data import ByteTokenizer
from gsa.models import GSAForCausalLM, preset_config


def _saved_tiny_model(folder):
    torch.manual_seed(0)
    model = GSAForCausalLM(preset_config("gsa-tiny", num_hidden_layers=2, hidden_size=64, num_slots=8)).eval()
    model.save_pretrained(folder)
    ByteTokenizer().save(folder)
    return model, AutoTokenizer.from_pretrained(folder)


def _greedy_continuation(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_text_generation_pipeline_from_a_saved_folder(tmp_path):
    model, tokenizer = _saved_tiny_model(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=tokenizer, device="cpu")
    assert isinstance(generator.model, GSAForCausalLM)
    result = generator("KING.", max_new_tokens=16, min_new_tokens=16, do_sample=False, return_full_text=False)
    want = _greedy_continuation(model, tokenizer, "KING.", 16)
    assert want  # a non-empty continuation, so the comparison below means something
    assert result[0]["generated_text"] == want


def test_streamer_yields_the_generated_text(tmp_path):
    model, tokenizer = _saved_tiny_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer("To be", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id, streamer=streamer)  # fills the queue; iterate after
    pieces = list(streamer)
    assert len(pieces) >= 1
    assert "".join(pieces) == _greedy_continuation(model, tokenizer, "To be", 12)
