"""The learning-rate schedule and the weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from gsa.models import GSAConfig, GSAForCausalLM
from gsa.train.optim import build_optimizer, build_scheduler, learning_rate, parameter_groups

MAX, MIN = 3e-4, 3e-5


def test_warmup_is_linear_up_to_the_peak():
    warmup, total = 100, 1000
    rates = [learning_rate(s, MAX, MIN, warmup, total) for s in range(warmup)]
    assert rates[0] == pytest.approx(MAX / warmup)
    assert rates[-1] == pytest.approx(MAX)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(d == pytest.approx(MAX / warmup) for d in steps)


def test_cosine_decay_from_peak_to_floor():
    warmup, total = 10, 111
    decay = [learning_rate(s, MAX, MIN, warmup, total) for s in range(warmup, total)]
    assert decay[0] == pytest.approx(MAX)
    assert decay[-1] == pytest.approx(MIN)  # the last step trains at the floor
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert decay[len(decay) // 2] == pytest.approx((MAX + MIN) / 2)  # cos(pi/2) = 0 halfway
    quarter = MIN + (MAX - MIN) * (1 + math.cos(math.pi / 4)) / 2
    assert decay[(len(decay) - 1) // 4] == pytest.approx(quarter)
    assert min(decay) >= MIN


def test_no_warmup_and_all_warmup():
    assert learning_rate(0, MAX, MIN, 0, 50) == pytest.approx(MAX)
    assert [learning_rate(s, MAX, MIN, 5, 5) for s in range(5)] == pytest.approx([MAX * (s + 1) / 5 for s in range(5)])


def test_scheduler_follows_the_schedule_through_an_optimizer():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=MAX)
    scheduler = build_scheduler(optimizer, MAX, MIN, 4, 20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([learning_rate(s, MAX, MIN, 4, 20) for s in range(20)])


def test_no_decay_on_norms_biases_and_embeddings():
    config = GSAConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_heads=2, num_slots=4,
                       intermediate_size=32, attn={"layers": [1], "num_heads": 2, "qkv_bias": True})
    model = GSAForCausalLM(config)
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert exempt.isdisjoint(decayed) and exempt | decayed == set(names.values())
    assert "model.embeddings.weight" in exempt
    assert {n for n in names.values() if "norm" in n or n.endswith(".bias")} <= exempt
    assert "lm_head.weight" in decayed and "model.layers.0.attn.q_proj.weight" in decayed
    assert all(model.get_parameter(n).ndim == 2 for n in decayed)
    optimizer = build_optimizer(model, MAX, 0.01, (0.9, 0.95), 1e-8, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
