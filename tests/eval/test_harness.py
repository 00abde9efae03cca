"""The lm-eval adapter against our own log-likelihoods, the offline tasks (ours and RULER's variable tracking) end to
end on tiny models, and the errors that name what an offline machine lacks."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from gsa.data import load_tokenizer  # noqa: E402
from gsa.eval import harness  # noqa: E402
from gsa.eval.harness import GSAEvalLM, run_harness  # noqa: E402
from gsa.eval.offline_tasks import OFFLINE_TASKS, task_data_path  # noqa: E402
from gsa.eval.perplexity import evaluate_perplexity  # noqa: E402
from gsa.eval.scoring import greedy_generate  # noqa: E402
from gsa.models import GSAConfig, GSAForCausalLM  # noqa: E402
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
        return tokenizer.encode(text)

    want = [
        sequence_logprob(lm.model, ids("Fair is foul, and foul is fair"), len(ids("Fair is foul, and foul"))),
        # the context's trailing space moves to the continuation
        sequence_logprob(lm.model, ids("Hover through the fog and filthy air."), len(ids("Hover through the fog"))),
        # an empty context is the BOS token
        sequence_logprob(lm.model, [tokenizer.bos_id, *ids("Alarum")], 1),
    ]
    assert [logprob for logprob, _ in got] == pytest.approx(want, abs=1e-4)
    assert all(isinstance(greedy, bool) for _, greedy in got)


def test_loglikelihood_rolling_equals_the_sum_over_the_whole_text(lm, tokenizer):
    short = "When shall we three meet again"  # fits in one window of 64
    long = "In thunder, lightning, or in rain? When the hurlyburly's done, when the battle's lost and won."
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)],
                                   disable_tqdm=True)
    ids = [tokenizer.bos_id, *tokenizer.encode(short)]
    assert got[0] == pytest.approx(sequence_logprob(lm.model, ids, 1), abs=1e-4)
    long_ids = tokenizer.encode(long)
    assert len(long_ids) > 64  # two windows: the second one reads the 64 tokens before its first prediction
    first = sequence_logprob(lm.model, [tokenizer.bos_id, *long_ids[:64]], 1)
    window = long_ids[-65:]  # 64 tokens read, the last len - 64 of them predicted (and the final token)
    second = sequence_logprob(lm.model, window, 65 - (len(long_ids) - 64))
    assert got[1] == pytest.approx(first + second, abs=1e-3)


def test_generate_until_decodes_greedily_and_cuts_at_the_stop_string(lm, tokenizer):
    context = "Thane of Cawdor"
    free = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 12})], True)[0]
    prompt = tokenizer.encode(context)
    assert free == tokenizer.decode(greedy_generate(lm.model, [prompt], 12, stop_token_ids=[tokenizer.eos_id])[0])
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


def test_lm_eval_scores_of_a_task_equal_our_own_perplexity_computation(tokenizer, tmp_path):
    """Through lm-eval's whole pipeline (task, requests, aggregation): the ppl task's bits per byte and byte
    perplexity are our `evaluate_perplexity` on the same passages, in the same windows."""
    lm = GSAEvalLM(tiny_model(seed=4), tokenizer, batch_size=16, max_length=512)
    results = run_harness(lm, ["gsa_shakespeare_ppl"], data_dir=tmp_path, limit=2)["results"]["gsa_shakespeare_ppl"]
    rows = [json.loads(line) for line in task_data_path("gsa_shakespeare_ppl", tmp_path).read_text().splitlines()]
    ours = evaluate_perplexity(lm.model, tokenizer, [(r["work"], r["text"]) for r in rows[:2]], max_length=512)
    assert ours["windows"] >= 2 * 6  # passages of 3000 bytes: several windows each
    assert results["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    assert results["byte_perplexity,none"] == pytest.approx(2 ** ours["bits_per_byte"], rel=1e-5)


def test_ruler_needs_a_subword_tokenizer_and_says_so(lm, tmp_path):
    # the byte tokenizer: lm-eval's RULER generator would never return
    with pytest.raises(ValueError, match="RULER tasks need a subword tokenizer .* got 1.0 from 'bytes'"):
        run_harness(lm, ["ruler_vt"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="ruler_vt needs a subword tokenizer: its smallest few-shot example takes"):
        harness.ruler_vt_min_length(lm.tokenizer)


def test_ruler_names_missing_packages(lm, tmp_path, monkeypatch):
    monkeypatch.setitem(harness.RULER_MODULES, "gsa_no_such_module", "no-such-package")
    with pytest.raises(ValueError, match="need the packages no-such-package, .*: pip install no-such-package"):
        run_harness(lm, ["ruler_vt"], data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None, reason="mistral-common not installed")
def test_ruler_with_a_bare_sentencepiece_tokenizer_and_no_protobuf_names_protobuf(tmp_path, monkeypatch):
    """A model trained with the Mistral tokenizer saves tokenizer.model alone; RULER reads tokenizers with
    AutoTokenizer, which converts that file only with protobuf (without it, transformers raises as stubbed here)."""
    import transformers

    def without_protobuf(*args, **kwargs):
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_protobuf)
    monkeypatch.setattr(harness, "_has_protobuf", lambda: False)
    sentencepiece_lm = GSAEvalLM(tiny_model(), load_tokenizer("mistral"))
    with pytest.raises(ValueError, match="AutoTokenizer, which cannot read tokenizer 'mistral'.*pip install protobuf"):
        run_harness(sentencepiece_lm, ["ruler_vt"], data_dir=tmp_path)


def test_hub_tasks_that_cannot_be_reached_are_named(lm, tmp_path, monkeypatch):
    """Offline, `datasets` raises ConnectionError for a hub task's data; the error names the tasks and what runs
    offline. (lm-eval's task index is stubbed: indexing its 14,000 tasks takes seconds.)"""
    import lm_eval
    import lm_eval.tasks

    class Index:
        def __init__(self, **kwargs):
            self.all_tasks = ["wikitext", *OFFLINE_TASKS]

    def unreachable(**kwargs):
        raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub (LocalEntryNotFound)")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    monkeypatch.setattr(lm_eval, "simple_evaluate", unreachable)
    with pytest.raises(ValueError, match=r"lm-eval tasks \['wikitext'\] need their data from the Hugging Face Hub, "
                                         r"which this machine cannot reach .*; offline, run gsa_offline"):
        run_harness(lm, ["wikitext", "gsa_shakespeare_ppl"], data_dir=tmp_path)


def bpe_tokenizer(folder):
    """A small subword (BPE) tokenizer trained on a slice of Shakespeare, saved where AutoTokenizer reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gsa.data.corpora import shakespeare_documents

    text = "".join(text for _, (_, text) in zip(range(3), shakespeare_documents()))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return load_tokenizer(folder)


def test_ruler_vt_runs_end_to_end_offline_with_a_subword_tokenizer(tmp_path):
    """lm-eval's synthetic variable tracking: data generated on the spot, sized in the model's own tokens (slow to
    start: lm-eval's RULER files build a word list of millions when imported)."""
    tokenizer = bpe_tokenizer(tmp_path / "bpe")
    torch.manual_seed(0)
    config = GSAConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8,
                       intermediate_size=64)
    subword_lm = GSAEvalLM(GSAForCausalLM(config).eval(), tokenizer, batch_size=2)
    shortest = harness.ruler_vt_min_length(tokenizer)
    with pytest.raises(ValueError, match=f"ruler_vt cannot make prompts of 700 tokens .* need {shortest}; give "
                                         f"--ruler-lengths {shortest} or more"):
        run_harness(subword_lm, ["ruler_vt"], data_dir=tmp_path, limit=1, ruler_lengths=(700,))
    results = run_harness(subword_lm, ["ruler_vt"], data_dir=tmp_path, limit=1, ruler_lengths=(shortest,))
    assert 0 <= results["results"]["ruler_vt"][f"{shortest},none"] <= 1
    assert "4096,none" not in results["results"]["ruler_vt"]  # RULER's -1 for a length not asked for is dropped
