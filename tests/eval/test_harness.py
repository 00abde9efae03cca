"""The lm-eval adapter against our own log-likelihoods, and the offline tasks end to end on a tiny model."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from gsa.eval.harness import GSAEvalLM, run_harness  # noqa: E402
from gsa.eval.offline_tasks import OFFLINE_TASKS, task_data_path  # noqa: E402
from gsa.eval.scoring import greedy_generate  # noqa: E402
from tests.eval.conftest import run_eval, tiny_model  # noqa: E402


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


@torch.no_grad()
def sequence_logprob(model, ids: list[int], scored_from: int) -> float:
    """log p(ids[scored_from:] | ids[:scored_from]) from one unbatched forward."""
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    targets = torch.tensor(ids[1:])
    return float(logprobs.gather(1, targets[:, None])[scored_from - 1 :].sum())


@pytest.fixture(scope="module")
def lm(tokenizer):
    return GSAEvalLM(tiny_model(seed=3), tokenizer, batch_size=2, max_length=64)


def test_the_model_type_is_registered_as_gsa():
    assert get_model("gsa") is GSAEvalLM


def test_loglikelihood_equals_our_own_computation(lm, tokenizer):
    pairs = [("Fair is foul, and foul", " is fair"), ("Hover through the fog ", "and filthy air."), ("", "Alarum")]
    got = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    want = [
        sequence_logprob(lm.model, ids("Fair is foul, and foul is fair"), len(ids("Fair is foul, and foul"))),
        # the context's trailing space moves to the continuation
        sequence_logprob(lm.model, ids("Hover through the fog and filthy air."), len(ids("Hover through the fog"))),
        # an empty context is the BOS token
        sequence_logprob(lm.model, [tokenizer.bos_token_id, *ids("Alarum")], 1),
    ]
    assert [logprob for logprob, _ in got] == pytest.approx(want, abs=1e-4)
    assert all(isinstance(greedy, bool) for _, greedy in got)


def test_loglikelihood_rolling_equals_the_sum_over_the_whole_text(lm, tokenizer):
    short = "When shall we three meet again"  # fits in one window of 64
    long = "In thunder, lightning, or in rain? When the hurlyburly's done, when the battle's lost and won."
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)],
                                   disable_tqdm=True)
    ids = [tokenizer.bos_token_id, *tokenizer(short, add_special_tokens=False)["input_ids"]]
    assert got[0] == pytest.approx(sequence_logprob(lm.model, ids, 1), abs=1e-4)
    long_ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 64  # two windows: the second one reads the 64 tokens before its first prediction
    first = sequence_logprob(lm.model, [tokenizer.bos_token_id, *long_ids[:64]], 1)
    window = long_ids[-65:]  # 64 tokens read, the last len - 64 of them predicted (and the final token)
    second = sequence_logprob(lm.model, window, 65 - (len(long_ids) - 64))
    assert got[1] == pytest.approx(first + second, abs=1e-3)


def test_generate_until_decodes_greedily_and_cuts_at_the_stop_string(lm, tokenizer):
    context = "Thane of Cawdor"
    free = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 12})], True)[0]
    prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
    assert free == tokenizer.decode(greedy_generate(lm.model, [prompt], 12, stop_token_ids=[tokenizer.eos_token_id])[0])
    stop = free[5:7]
    cut = lm.generate_until([request("generate_until", context, {"until": [stop], "max_gen_toks": 12})], True)[0]
    assert cut == free.split(stop)[0]
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until([request("generate_until", context, {"do_sample": True, "temperature": 0.7})], True)


def test_bad_settings_are_named(tokenizer):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        GSAEvalLM(tiny_model(), tokenizer, batch_size="auto")


def test_offline_data_is_built_once_and_has_the_promised_shape(tmp_path):
    for task in OFFLINE_TASKS:
        path = task_data_path(task, tmp_path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) >= 100
        assert task_data_path(task, tmp_path).stat().st_mtime == path.stat().st_mtime  # reused, not rebuilt
    def rows(task):
        return [json.loads(line) for line in task_data_path(task, tmp_path).read_text().splitlines()]

    for row in rows("gsa_shakespeare_cloze"):
        assert row["target"].startswith(" ") and row["target"].strip().lower() in row["context"].lower()
    assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in rows("gsa_shakespeare_next_line"))


def test_offline_tasks_run_end_to_end_from_the_command_line(model_dir, tmp_path, capsys):
    output = tmp_path / "harness.json"
    argv = ["harness", "--model", str(model_dir), "--tasks", "gsa_offline", "--limit", "2", "--max-length", "256",
            "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--output", str(output)]
    assert run_eval(argv) == 0
    assert "gsa_shakespeare_next_line" in capsys.readouterr().out
    results = json.loads(output.read_text())["results"]
    assert results["gsa_shakespeare_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= results["gsa_shakespeare_cloze"]["acc,none"] <= 1
    assert 0 <= results["gsa_shakespeare_next_line"]["acc,none"] <= 1


def test_unknown_tasks_are_rejected_before_anything_runs(lm, tmp_path):
    with pytest.raises(ValueError, match="unknown offline tasks \\['gsa_shakespeare_missing'\\]"):
        run_harness(lm, ["gsa_shakespeare_missing"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="no tasks given"):
        run_harness(lm, [], data_dir=tmp_path)
