"""MQAR: the generator's statistics and reproducibility, and a CPU smoke run of the training sweep."""

import json

import pytest
import torch

from gsa.eval.mqar import IGNORE_INDEX, MQARTask, mqar_examples
from gsa.eval.mqar_sweep import (
    PROFILES, MQARRun, ModelOptions, TrainSettings, format_table, paper_comparison, report_text, run_sweep, summarize,
    train_and_test, with_overrides,
)
from tests.eval.conftest import run_eval

TASK = MQARTask(vocab_size=8192, seq_len=512, num_pairs=64)  # the paper's hardest setting


@pytest.fixture(scope="module")
def examples():
    return mqar_examples(TASK, 64, seed=7)


def test_every_example_has_its_pairs_then_one_query_per_key(examples):
    inputs, targets = examples
    P = TASK.num_pairs
    assert inputs.shape == targets.shape == (64, 512) and inputs.dtype == torch.long
    keys, values = inputs[:, 0 : 2 * P : 2], inputs[:, 1 : 2 * P : 2]
    (key_low, key_high), (value_low, value_high) = TASK.key_range, TASK.value_range
    assert key_high <= value_low  # disjoint vocabularies
    assert ((keys >= key_low) & (keys < key_high)).all() and ((values >= value_low) & (values < value_high)).all()
    assert ((inputs >= 0) & (inputs < TASK.vocab_size)).all()
    assert (targets[:, : 2 * P] == IGNORE_INDEX).all()  # nothing to predict inside the context
    for row in range(len(inputs)):
        assert len(set(keys[row].tolist())) == P and len(set(values[row].tolist())) == P
        answer_of = dict(zip(keys[row].tolist(), values[row].tolist()))
        positions = (targets[row] != IGNORE_INDEX).nonzero().flatten()
        assert len(positions) == P  # every key asked exactly once
        assert ((positions - 2 * P) % 2 == 0).all()  # at the first token of a two-token slot
        asked = inputs[row, positions].tolist()
        assert sorted(asked) == sorted(answer_of)
        assert targets[row, positions].tolist() == [answer_of[k] for k in asked]


def test_query_slots_follow_a_power_law_that_favours_early_slots(examples):
    _, targets = examples
    slots = ((targets != IGNORE_INDEX).nonzero()[:, 1] - 2 * TASK.num_pairs) // 2
    third = TASK.query_slots // 3
    early, late = int((slots < third).sum()), int((slots >= 2 * third).sum())
    assert early > 1.5 * late  # uniform slots would give about equal counts
    assert slots.float().mean() < 0.8 * (TASK.query_slots - 1) / 2


def test_seeds_reproduce_examples_and_differ_from_each_other():
    first, again, other = (mqar_examples(TASK, 8, seed) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    stream = torch.Generator().manual_seed(5)
    assert not torch.equal(TASK.sample(4, stream)[0], TASK.sample(4, stream)[0])  # fresh examples every draw


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(num_pairs=64, seq_len=200), "leaves 36 query slots after 64 pairs"),
        (dict(vocab_size=64, num_pairs=40, seq_len=512), "fewer than num_pairs 40"),
        (dict(num_pairs=0), "num_pairs must be >= 1"),
        (dict(power_a=0.0), r"power_a must be in \(0, 1\]"),
    ],
)
def test_impossible_tasks_are_rejected_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        MQARTask(**fields)


def test_a_tiny_model_trains_a_few_steps_and_reports_accuracy_in_0_1():
    sweep = PROFILES["smoke"]
    result = train_and_test(MQARRun("gsa", 16, 3e-3, 0), sweep.task, sweep.train, sweep.options, "cpu")
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 1 <= result["steps"] <= sweep.train.steps and result["parameters"] > 0
    assert all(0.0 <= h["validation_accuracy"] <= 1.0 for h in result["history"])


def test_a_failing_run_is_recorded_and_the_sweep_goes_on():
    # head width 6: width 18 makes 3 heads of 6, width 20 makes 3 heads that cannot split 20
    sweep = with_overrides(PROFILES["smoke"], models=("gsa",), widths=(18, 20), gsa_head_dim=6)
    results = run_sweep(sweep, "cpu")
    failed = [r for r in results if r["width"] == 20]
    assert len(failed) == 1 and "divisible" in failed[0]["error"] and failed[0]["accuracy"] is None
    assert summarize(results)["gsa"].keys() == {18}


def test_summary_takes_the_best_learning_rate_per_width():
    runs = [
        {"model": "gsa", "width": 64, "lr": 1e-3, "seed": 0, "accuracy": 0.2},
        {"model": "gsa", "width": 64, "lr": 1e-3, "seed": 1, "accuracy": 0.4},
        {"model": "gsa", "width": 64, "lr": 3e-3, "seed": 0, "accuracy": 0.5},
        {"model": "gsa", "width": 64, "lr": 3e-3, "seed": 1, "accuracy": 0.7},
    ]
    cell = summarize(runs)["gsa"][64]
    assert cell["best_lr"] == 3e-3 and cell["accuracy"] == pytest.approx(0.6) and cell["seed_accuracies"] == [0.5, 0.7]
    table = format_table(summarize(runs), include_paper=True)
    assert "60.0" in table and "GSA (paper)" in table
    assert paper_comparison(summarize(runs)) == [
        "d=64: gsa 60.0% vs paper 28%: at least the paper's", "d=128: not run (paper 98%)",
        "d=256: not run (paper 99%)", "d=512: not run (paper 99%)",
    ]


def test_at_the_papers_setting_the_report_holds_the_paper_values_and_the_target():
    summary = {"gsa": {64: {"accuracy": 0.25}}, "attention": {64: {"accuracy": 0.9}}}
    report = report_text(PROFILES["gpu"], summary, 400.0)
    assert "GSA (paper)       28.0     98.0     99.0     99.0" in report
    assert "- d=64: gsa 25.0% vs paper 28%: below the paper's" in report
    assert "paper" not in report_text(PROFILES["smoke"], summary, 1.0)


def test_mqar_command_writes_json_and_the_plot(tmp_path, capsys):
    assert run_eval(["mqar", "--profile", "smoke", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Accuracy (%) of the best learning rate per cell" in printed and "attention" in printed
    assert (tmp_path / "mqar.md").read_text().startswith("# MQAR: seq 32, 4 pairs, vocab 64")
    report = json.loads((tmp_path / "mqar.json").read_text())
    assert {r["model"] for r in report["runs"]} == {"gsa", "attention"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["runs"])
    assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_are_valid_and_the_gpu_one_is_the_papers_setting():
    gpu = PROFILES["gpu"]
    assert (gpu.task.seq_len, gpu.task.num_pairs, gpu.widths) == (512, 64, (64, 128, 256, 512))
    assert set(gpu.models) >= {"gsa", "attention"}
    with pytest.raises(ValueError, match="unknown MQAR models"):
        with_overrides(gpu, models=("mamba",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainSettings(steps=0)
    assert ModelOptions().num_slots == 64


def test_a_time_budget_is_shared_out_over_the_runs():
    gpu = PROFILES["gpu"]
    runs = len(gpu.runs())
    assert runs == len(gpu.models) * len(gpu.widths) * len(gpu.lrs) * len(gpu.seeds)
    assert gpu.train_settings(workers=8).max_train_seconds == pytest.approx(gpu.time_budget_seconds * 8 / runs)
    assert with_overrides(gpu, time_budget_seconds=None).train_settings(8).max_train_seconds is None
    assert [r.width for r in gpu.runs()][:2] == [512, 512]  # widest (slowest) runs start first
