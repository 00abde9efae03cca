"""MQAR: the generator's statistics and reproducibility, and a CPU smoke run of the training sweep."""

import json
from dataclasses import replace

import pytest
import torch

import gsa.eval.mqar_sweep as mqar_sweep
from gsa.eval.mqar import IGNORE_INDEX, MQARTask, mqar_examples, training_mixture
from gsa.eval.mqar_sweep import (
    PROFILES, MQARRun, ModelOptions, TrainSettings, build_model, format_table, learning_rates, paper_comparison,
    planned_steps, report_text, run_sweep, summarize, train_and_test, with_overrides, worker_devices,
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


def test_the_training_mixture_halves_length_and_pairs_down_to_one_pair():
    sizes = [(t.seq_len, t.num_pairs, t.vocab_size) for t in training_mixture(TASK, 4)]
    assert sizes == [(512, 64, 8192), (256, 32, 8192), (128, 16, 8192), (64, 8, 8192)]
    assert training_mixture(TASK, 1) == [TASK]
    small = MQARTask(vocab_size=64, seq_len=32, num_pairs=4)
    assert [(t.seq_len, t.num_pairs) for t in training_mixture(small, 10)] == [(32, 4), (16, 2), (8, 1)]
    with pytest.raises(ValueError, match="levels must be >= 1"):
        training_mixture(TASK, 0)


def test_training_goes_through_the_mixture_in_turn_with_equal_tokens_per_batch(monkeypatch):
    """Each step trains on the next size of the mixture, its batch holding as many tokens as the target's; the
    held-out sets stay the target's."""
    seen = []
    real = mqar_sweep._batch_loss

    def spy(model, task, batch_size, stream, device):
        seen.append((task.seq_len, task.num_pairs, batch_size))
        return real(model, task, batch_size, stream, device)

    monkeypatch.setattr(mqar_sweep, "_batch_loss", spy)
    sweep = PROFILES["smoke"]
    settings = replace(sweep.train, steps=6, eval_every=3, mixture_levels=3)
    result = train_and_test(MQARRun("gsa", 16, 3e-3, 0), sweep.task, settings, sweep.options, "cpu")
    mixture = [(32, 4, 4), (16, 2, 8), (8, 1, 16)]
    assert seen == mixture + mixture * 2  # warm-up: each size once; then six steps in turn
    assert result["training_sizes"] == [list(size) for size in mixture]
    assert result["steps"] == 6
    # the logged loss is the target size's, next to every size's
    assert [len(h["size_losses"]) for h in result["history"]] == [3, 3]
    assert all(h["loss"] == h["size_losses"][0] for h in result["history"])


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
    assert summarize(results)["gsa (gsa_head_dim=6)"].keys() == {18}  # a head width other than the profile's


def test_worker_devices_spread_a_bare_cuda_over_the_gpus_and_keep_any_other_device():
    assert worker_devices("cuda", 4, gpu_count=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_devices(torch.device("cuda"), 3, gpu_count=4) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cuda", 2, gpu_count=1) == ["cuda", "cuda"]
    assert worker_devices("cuda:1", 2, gpu_count=4) == ["cuda:1", "cuda:1"]
    assert worker_devices("cpu", 2, gpu_count=0) == ["cpu", "cpu"]


def test_worker_processes_give_the_single_process_results(monkeypatch):
    """Two spawned workers, each taking its device from the queue the pool starts them with, give exactly the runs
    of one process: step-count runs are reproducible wherever they run. The queue holds "cpu:0" (as it would
    hold "cuda:0", "cuda:1"), which no worker could get but from the queue (the sweep's own device is "cpu")."""
    sweep = with_overrides(PROFILES["smoke"], models=("gsa",), seeds=(0, 1))
    key = lambda r: (r["seed"], r["width"])  # noqa: E731
    alone = sorted(run_sweep(sweep, "cpu"), key=key)
    monkeypatch.setattr(mqar_sweep, "worker_devices", lambda device, workers, gpu_count: ["cpu:0"] * workers)
    pooled = sorted(run_sweep(sweep, "cpu", workers=2), key=key)
    assert [r["device"] for r in pooled] == ["cpu:0", "cpu:0"]
    assert [(r["seed"], r["accuracy"], r["steps"]) for r in pooled] == [
        (r["seed"], r["accuracy"], r["steps"]) for r in alone]
    assert [h["loss"] for h in pooled[1]["history"]] == [h["loss"] for h in alone[1]["history"]]


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
    assert "steps/s; warm-up" in printed  # every run's pace, with the warm-up it did outside its budget
    assert (tmp_path / "mqar.md").read_text().startswith("# MQAR: seq 32, 4 pairs, vocab 64")
    report = json.loads((tmp_path / "mqar.json").read_text())
    assert {r["model"] for r in report["runs"]} == {"gsa", "attention"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["runs"])
    assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written_as_they_finished = [json.loads(line) for line in (tmp_path / "mqar.runs.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in written_as_they_finished) == ["attention", "gsa"]


def test_gate_damping_reaches_the_gsa_layers_and_the_report(tmp_path):
    """--gsa-gate-damping sets τ of every GSA layer (alpha = sigmoid(f)^(1/τ)); the default stays the paper's 8."""
    from gsa.layers.gsa import GatedSlotAttention

    default = build_model("gsa", 16, 64, ModelOptions(gsa_head_dim=8, num_slots=8))
    damped = build_model("gsa", 16, 64, ModelOptions(gsa_head_dim=8, num_slots=8, gate_damping=32.0))
    taus = [[m.gate_logit_normalizer for m in model.modules() if isinstance(m, GatedSlotAttention)]
            for model in (default, damped)]
    assert taus == [[8.0, 8.0], [32.0, 32.0]]
    assert run_eval(["mqar", "--profile", "smoke", "--models", "gsa", "--gsa-gate-damping", "32",
                     "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "mqar.json").read_text())["sweep"]["options"]["gate_damping"] == 32.0


def test_mixture_levels_reach_the_runs_and_the_report(tmp_path):
    assert run_eval(["mqar", "--profile", "smoke", "--models", "gsa", "--mixture-levels", "1",
                     "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mqar.json").read_text())
    assert report["sweep"]["train"]["mixture_levels"] == 1
    assert [run["training_sizes"] for run in report["runs"]] == [[[32, 4, 4]]]


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
    assert runs == 16  # 2 waves of 8
    assert gpu.train_settings(workers=8).max_train_seconds == pytest.approx(gpu.time_budget_seconds / 2)
    assert with_overrides(gpu, time_budget_seconds=None).train_settings(8).max_train_seconds is None
    # whole waves, never more concurrent runs than there are runs: the sweep stays within its budget
    cpu = PROFILES["cpu"]
    assert len(cpu.runs()) == 4
    for workers, waves in ((8, 1), (4, 1), (3, 2), (1, 4)):
        assert cpu.train_settings(workers).max_train_seconds == pytest.approx(cpu.time_budget_seconds / waves)
    assert [r.width for r in gpu.runs()][:2] == [512, 512]  # widest (slowest) runs start first


class FakeClock:
    """A clock for train_and_test that moves `tick` seconds per reading, plus whatever a test adds."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


SMOKE = PROFILES["smoke"]
SMOKE_RUN = MQARRun("gsa", 16, 3e-3, 0)
NEVER_STOP = dict(stop_accuracy=1.01)  # validation accuracy never reaches it: runs take all their planned steps


def test_the_schedule_warms_up_then_decays_to_zero_over_the_planned_steps():
    settings = TrainSettings(warmup_fraction=0.1)
    lrs = learning_rates(200, settings, 1e-2)
    assert len(lrs) == 200 and lrs[0] < 1e-3 and max(lrs) == pytest.approx(1e-2, rel=1e-3)
    assert lrs.index(max(lrs)) == 20  # the warm-up is the first 10 % of the planned steps
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 1e-5


def test_a_time_budget_plans_the_steps_that_fit_in_it():
    budgeted = TrainSettings(steps=1000, eval_every=5, max_train_seconds=10.0)
    # 0.5 s a step plus a 1 s validation pass every 5 steps: 0.7 s a step, 14 steps in 10 s
    assert planned_steps(budgeted, step_seconds=0.5, eval_seconds=1.0) == 14
    assert planned_steps(replace(budgeted, steps=9), 0.5, 1.0) == 9  # the step limit still holds
    assert planned_steps(budgeted, step_seconds=100.0) == 1
    assert planned_steps(TrainSettings(steps=30), step_seconds=0.5) == 30  # no budget: the step count


def test_a_budgeted_run_spans_its_schedule_over_its_planned_steps_and_equals_that_step_count_run(monkeypatch):
    monkeypatch.setattr(mqar_sweep, "_time_steps", lambda *args: (0.5, 1.0))  # as measured on a device
    settings = replace(SMOKE.train, steps=1000, eval_every=5, max_train_seconds=10.0, **NEVER_STOP)
    budgeted = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu", clock=FakeClock())
    assert budgeted["planned_steps"] == budgeted["steps"] == 14 and budgeted["stopped"] == "planned steps"
    expected = learning_rates(14, settings, SMOKE_RUN.lr)
    assert [h["lr"] for h in budgeted["history"]] == [expected[4], expected[9], expected[13]]
    assert budgeted["history"][-1]["lr"] < 0.05 * SMOKE_RUN.lr  # the cosine has run out, not a 1000-step warm-up
    by_steps = train_and_test(SMOKE_RUN, SMOKE.task, replace(settings, steps=14, max_train_seconds=None),
                              SMOKE.options, "cpu")
    assert by_steps["history"] == budgeted["history"] and by_steps["accuracy"] == budgeted["accuracy"]


def test_warm_up_and_calibration_change_nothing_the_run_computes(monkeypatch):
    settings = replace(SMOKE.train, steps=6, eval_every=3, **NEVER_STOP)
    # a clock that stands still: the calibration measures 0 s a step, so the plan is the step limit
    budgeted = train_and_test(SMOKE_RUN, SMOKE.task, replace(settings, max_train_seconds=5.0), SMOKE.options, "cpu",
                              clock=FakeClock())
    by_steps = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu")
    monkeypatch.setattr(mqar_sweep, "_warm_up", lambda *args: None)
    cold = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu")
    assert budgeted["planned_steps"] == 6 and budgeted["calibrated_step_seconds"] == 0
    assert by_steps["history"] == budgeted["history"] == cold["history"]
    assert by_steps["accuracy"] == budgeted["accuracy"] == cold["accuracy"]


def test_warm_up_and_compilation_are_not_counted_against_the_budget(monkeypatch):
    clock = FakeClock(tick=1e-3)
    warm_up = mqar_sweep._warm_up

    def slow_warm_up(*args):  # a first call that compiles kernels for 1000 s
        warm_up(*args)
        clock.now += 1000.0

    monkeypatch.setattr(mqar_sweep, "_warm_up", slow_warm_up)
    settings = replace(SMOKE.train, steps=6, max_train_seconds=5.0, **NEVER_STOP)
    result = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu", clock=clock)
    assert result["warmup_seconds"] >= 1000 and result["train_seconds"] < 1
    assert result["steps"] == result["planned_steps"] == 6 and result["stopped"] == "planned steps"
    assert result["steps_per_second"] > 0


def test_a_run_slower_than_calibrated_re_plans_and_its_schedule_follows(monkeypatch):
    monkeypatch.setattr(mqar_sweep, "_time_steps", lambda *args: (0.01, 0.0))  # calibrated: 100 steps a second
    clock = FakeClock(tick=1.0)  # but each step takes a second (one reading a step): 10 steps fit in 10 s
    settings = replace(SMOKE.train, steps=50, eval_every=100, max_train_seconds=10.0, **NEVER_STOP)
    result = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu", clock=clock)
    assert result["replans"] == [{"step": 1, "seconds": 1.0, "planned_steps": 10}]
    assert result["steps"] == result["planned_steps"] == 10
    assert result["history"][-1]["lr"] == learning_rates(10, settings, SMOKE_RUN.lr)[-1]


def test_query_logits_are_those_at_the_query_positions_in_order():
    torch.manual_seed(0)
    model = build_model("attention", 16, SMOKE.task.vocab_size, SMOKE.options).eval()
    inputs, targets = mqar_examples(SMOKE.task, 3, seed=0)
    with torch.no_grad():
        logits, wanted = mqar_sweep._query_logits(model, inputs, targets, SMOKE.task.num_pairs)
        every = model(input_ids=inputs).logits
    queries = targets != IGNORE_INDEX
    assert torch.equal(wanted, targets[queries])
    torch.testing.assert_close(logits, every[queries].float())


def _tiny_run(settings_overrides, device="cpu"):
    sweep = PROFILES["smoke"]
    settings = replace(sweep.train, **settings_overrides)
    return train_and_test(MQARRun("gsa", 16, 3e-3, 0), sweep.task, settings, sweep.options, device)


def test_snapshot_puts_parameters_and_optimizer_state_back():
    """What a graph capture's warm-up trains is undone: the parameters and the moments as they were, moments made
    later zeroed (AdamW's fresh state), so the next step is the step a fresh optimizer would take."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    settings = TrainSettings()
    optimizer = mqar_sweep._optimizer(model, 1e-2, settings, torch.device("cpu"))
    fresh_model = torch.nn.Linear(4, 3)
    fresh_model.load_state_dict(model.state_dict())
    fresh = mqar_sweep._optimizer(fresh_model, 1e-2, settings, torch.device("cpu"))
    restore = mqar_sweep._snapshot(model, optimizer)
    x = torch.randn(8, 4)
    for _ in range(3):  # a warm-up that trains
        mqar_sweep._update(model, optimizer, model(x).square().mean())
    restore()
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    mqar_sweep._update(model, optimizer, model(x).square().mean())
    mqar_sweep._update(fresh_model, fresh, fresh_model(x).square().mean())
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


def test_graphed_steps_fall_back_to_eager_steps_when_capture_fails():
    """A size whose capture fails (here: no CUDA) trains eagerly, exactly as `_train_step`, and says why."""
    sweep = PROFILES["smoke"]
    settings = replace(sweep.train, mixture_levels=2)
    results = []
    for graphed in (True, False):
        torch.manual_seed(0)
        model = build_model("gsa", 16, sweep.task.vocab_size, sweep.options).train()
        optimizer = mqar_sweep._optimizer(model, 3e-3, settings, torch.device("cpu"))
        mixture = mqar_sweep._Mixture(sweep.task, settings)
        stream = torch.Generator().manual_seed(5)
        device = torch.device("cpu")
        if graphed:
            stepper = mqar_sweep._GraphedSteps(model, optimizer, mixture, device)
            losses = [stepper(step, stream, 3e-3) for step in range(4)]
            assert stepper.failed
        else:
            losses = [mqar_sweep._train_step(model, optimizer, mixture, step, stream, device, 3e-3)
                      for step in range(4)]
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (got_losses, got_params), (want_losses, want_params) = results
    assert torch.equal(got_losses, want_losses)
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_run_trains_as_the_eager_run():
    """On the GPU the steps replay CUDA graphs (captured without changing what the run trains): the same losses and
    validation accuracies as eager steps, up to the float rounding of capturable AdamW."""
    overrides = dict(steps=12, eval_every=4, mixture_levels=2)
    graphed = _tiny_run({**overrides, "cuda_graphs": True}, "cuda")
    eager = _tiny_run({**overrides, "cuda_graphs": False}, "cuda")
    assert graphed["cuda_graph_sizes"] == 2 and graphed["cuda_graph_failure"] is None, graphed["cuda_graph_failure"]
    assert eager["cuda_graph_sizes"] == 0
    got = [h["loss"] for h in graphed["history"]]
    want = [h["loss"] for h in eager["history"]]
    assert got == pytest.approx(want, rel=2e-2), (got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_run_in_sittings_trains_as_the_uninterrupted_run(tmp_path):
    """Each sitting captures its graphs after loading the saved state (capture puts back the state it finds): the
    continued run's losses are the uninterrupted graphed run's up to the GPU's float rounding."""
    overrides = dict(steps=12, eval_every=4, mixture_levels=2, cuda_graphs=True, **NEVER_STOP)
    whole = _tiny_run(overrides, "cuda")
    settings = replace(SMOKE.train, **overrides, sitting_seconds=6.0, checkpoint_dir=str(tmp_path))
    parts = [train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cuda", clock=FakeClock(1.0))]
    parts.append(train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cuda", clock=FakeClock(1.0)))
    assert [p["steps"] for p in parts] == [6, 12] and parts[-1]["stopped"] == "planned steps"
    assert parts[-1]["cuda_graph_sizes"] == 2, parts[-1]["cuda_graph_failure"]
    got = [h["loss"] for h in parts[-1]["history"]]
    want = [h["loss"] for h in whole["history"]]
    assert got == pytest.approx(want, rel=2e-2), (got, want)


def test_merge_makes_one_table_of_split_sweeps_and_refuses_another_task(tmp_path, capsys):
    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert run_eval(["mqar", "--profile", "smoke", "--models", "gsa", "--output-dir", str(first)]) == 0
    assert run_eval(["mqar", "--profile", "smoke", "--models", "attention", "--output-dir", str(second)]) == 0
    runs = [json.loads((first / "mqar.json").read_text())["runs"][0],
            json.loads((second / "mqar.runs.jsonl").read_text().splitlines()[0])]
    capsys.readouterr()
    assert run_eval(["mqar", "--profile", "smoke", "--merge", str(first / "mqar.json"),
                     str(second / "mqar.runs.jsonl"), "--output-dir", str(merged)]) == 0
    assert "runs of several sweeps, merged." in capsys.readouterr().out
    report = json.loads((merged / "mqar.json").read_text())
    assert report["runs"] == runs
    assert {model: {int(w): v["accuracy"] for w, v in widths.items()} for model, widths in report["summary"].items()} \
        == {run["model"]: {run["width"]: run["accuracy"]} for run in runs}
    assert (merged / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_eval(["mqar", "--profile", "smoke", "--seq-len", "64", "--merge", str(first / "mqar.json"),
                     "--output-dir", str(merged)]) != 0
    assert "is of another task" in capsys.readouterr().err
    assert run_eval(["mqar", "--profile", "smoke", "--merge", str(tmp_path / "missing.json")]) != 0
    assert "missing.json is not a file" in capsys.readouterr().err
    assert run_eval(["mqar", "--profile", "smoke", "--merge", str(first / "mqar.json"), str(first / "mqar.runs.jsonl"),
                     "--output-dir", str(merged)]) != 0
    assert "give one of them" in capsys.readouterr().err  # the same runs twice would count twice in the means


def test_runs_with_other_model_options_are_a_model_of_their_own_in_merges(tmp_path, capsys):
    """A run made with non-default options (here the slot gates' τ) records them, and a merge shows it as its own
    row, never averaged with (nor refused as a duplicate of) the default model's run of the same width, lr and
    seed; the comparison with the paper takes the default model only."""
    default, damped, merged = tmp_path / "default", tmp_path / "damped", tmp_path / "merged"
    assert run_eval(["mqar", "--profile", "smoke", "--models", "gsa", "--output-dir", str(default)]) == 0
    assert run_eval(["mqar", "--profile", "smoke", "--models", "gsa", "--gsa-gate-damping", "32",
                     "--no-short-conv", "--output-dir", str(damped)]) == 0
    plain_run = json.loads((default / "mqar.json").read_text())["runs"][0]
    damped_run = json.loads((damped / "mqar.json").read_text())["runs"][0]
    assert plain_run["variant"] == "" and damped_run["variant"] == "short_conv=False, gate_damping=32"
    capsys.readouterr()
    assert run_eval(["mqar", "--profile", "smoke", "--merge", str(damped / "mqar.json"), str(default / "mqar.json"),
                     "--output-dir", str(merged)]) == 0
    summary = json.loads((merged / "mqar.json").read_text())["summary"]
    assert list(summary) == ["gsa", "gsa (short_conv=False, gate_damping=32)"]  # a kind first, then its variants
    width = str(plain_run["width"])
    assert summary["gsa"][width]["seed_accuracies"] == [plain_run["accuracy"]]
    assert summary["gsa (short_conv=False, gate_damping=32)"][width]["seed_accuracies"] == [damped_run["accuracy"]]
    assert "gsa (short_conv=False, gate_damping=32)" in capsys.readouterr().out
    assert paper_comparison({"gsa (gate_damping=32)": {64: {"accuracy": 0.9}}})[0] == "d=64: not run (paper 28%)"


def test_short_convolutions_can_start_as_flas():
    """--gsa-conv-init-std 0.02 draws the short convolutions' weights from N(0, 0.02), FLA's initialisation (the
    only one that differs from ours), and names the run by it; without it they keep PyTorch's Conv1d draw."""
    from gsa.layers import ShortConvolution

    options = with_overrides(PROFILES["gpu"], conv_init_std=0.02).options
    assert options.variant("gsa") == "conv_init_std=0.02" and options.variant("attention") == ""

    def conv_weights(opts):
        torch.manual_seed(0)
        model = build_model("gsa", 128, 8192, opts)
        return torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, ShortConvolution)])

    flas, ours = conv_weights(options), conv_weights(PROFILES["gpu"].options)
    assert flas.numel() == ours.numel() == 2 * 3 * 128 * 4
    assert abs(flas.std().item() - 0.02) < 0.002 and abs(flas.mean().item()) < 0.002
    assert ours.std().item() > 0.2  # kaiming-uniform over a width-4 kernel


def test_a_run_in_sittings_trains_as_the_uninterrupted_run(tmp_path):
    """Stopped after each sitting's seconds, saved and continued by the same call again, a run's losses, validation
    history, final weights' test accuracy and step count are the uninterrupted run's, bit for bit on the CPU."""
    settings = replace(SMOKE.train, steps=14, eval_every=3, **NEVER_STOP)
    whole = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu")
    in_sittings = replace(settings, sitting_seconds=5.0, checkpoint_dir=str(tmp_path))
    parts = []
    for _ in range(10):
        parts.append(train_and_test(SMOKE_RUN, SMOKE.task, in_sittings, SMOKE.options, "cpu", clock=FakeClock(1.0)))
        if parts[-1]["stopped"] != "sitting":
            break
    # one clock reading a step: each sitting ends after 5 steps; the third finishes the run's 14
    assert [p["steps"] for p in parts] == [5, 10, 14] and [p["sittings"] for p in parts] == [1, 2, 3]
    assert parts[-1]["stopped"] == "planned steps"
    assert parts[-1]["history"] == whole["history"] and parts[-1]["accuracy"] == whole["accuracy"]
    run_folder = tmp_path / "gsa-d16-lr0.003-seed0"
    assert (run_folder / "result.json").is_file() and not list(run_folder.glob("step-*"))  # done: state dropped
    again = train_and_test(SMOKE_RUN, SMOKE.task, in_sittings, SMOKE.options, "cpu", clock=FakeClock(1.0))
    assert again == parts[-1]  # a finished run is read back, not trained again


def test_a_sitting_refuses_a_saved_run_of_other_settings(tmp_path):
    settings = replace(SMOKE.train, steps=14, eval_every=3, sitting_seconds=2.0, checkpoint_dir=str(tmp_path),
                       **NEVER_STOP)
    first = train_and_test(SMOKE_RUN, SMOKE.task, settings, SMOKE.options, "cpu", clock=FakeClock(1.0))
    assert first["stopped"] == "sitting" and first["steps"] == 2
    with pytest.raises(ValueError, match=r"holds a run of other settings \(settings differ\)"):
        train_and_test(SMOKE_RUN, SMOKE.task, replace(settings, steps=20), SMOKE.options, "cpu", clock=FakeClock(1.0))
    # a longer sitting is the same run, and so are the same options named as given on the command line (which only
    # labels the run: sittings saved before runs were labelled continue too)
    labelled = replace(SMOKE.options, overridden=("gsa_head_dim",))
    longer = train_and_test(SMOKE_RUN, SMOKE.task, replace(settings, sitting_seconds=100.0), labelled, "cpu",
                            clock=FakeClock(1.0))
    assert longer["steps"] == 14 and longer["sittings"] == 2


def test_sittings_need_a_step_schedule_and_a_place_for_the_state(tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        TrainSettings(sitting_seconds=10.0)
    with pytest.raises(ValueError, match="fixed step schedule"):
        TrainSettings(sitting_seconds=10.0, checkpoint_dir=str(tmp_path), max_train_seconds=5.0)


def test_mqar_command_in_sittings_continues_where_it_stopped(tmp_path, capsys):
    command = ["mqar", "--profile", "smoke", "--models", "gsa", "--steps", "6", "--stop-accuracy", "1.01",
               "--sitting-seconds", "0.001", "--output-dir", str(tmp_path)]
    steps = []
    for _ in range(10):  # a sitting of 1 ms ends after its first step on any machine
        assert run_eval(command) == 0
        run = json.loads((tmp_path / "mqar.json").read_text())["runs"][0]
        steps.append(run["steps"])
        if run["stopped"] != "sitting":
            break
        printed = capsys.readouterr().out
        assert "the same command again continues them" in printed
        assert f"Not finished yet (accuracy so far): gsa d=16 lr=0.003 seed=0 at step {run['steps']} of 6" in printed
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert run_eval([*command[:-4], "--time-budget", "5", "--sitting-seconds", "1"]) != 0
    assert "give one of them" in capsys.readouterr().err


def test_the_step_profiling_script_runs_on_the_sweeps_internals(monkeypatch, capsys):
    """benchmarks/profile_mqar_step.py reaches into the sweep's step functions: kept in step with them here (a CPU
    run of the smoke task; on CUDA it also times graphed steps and profiles them)."""
    import pathlib
    import runpy
    import sys

    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "profile_mqar_step.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--profile", "smoke", "--widths", "16",
                                      "--turns", "1"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[0], row[1], row[3]) for row in rows] == [("gsa", "16", "ms"), ("attention", "16", "ms")]
    assert all(float(row[2]) > 0 for row in rows)


def test_the_cpu_variants_script_runs_each_variant(monkeypatch, capsys):
    """benchmarks/mqar_cpu_variants.py builds each variant through the sweep's options: a few steps of each, one JSON
    line a run, and the variants reach the model (their runs do not all come out alike)."""
    import pathlib
    import runpy
    import sys

    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "mqar_cpu_variants.py"
    runs = {}
    for variant in ("default", "fla-conv", "tau32"):
        monkeypatch.setattr(sys, "argv", [str(script), "--variant", variant, "--steps", "4", "--seeds", "0"])
        runpy.run_path(str(script), run_name="__main__")
        (line,) = capsys.readouterr().out.splitlines()
        runs[variant] = json.loads(line)
    assert all(0.0 <= run["accuracy"] <= 100.0 and run["variant"] == name for name, run in runs.items())
    assert len({json.dumps(run["validation"]) + str(run["accuracy"]) for run in runs.values()}) >= 2
