"""lm-evaluation-harness: our models as lm-eval model type "gsa", and a runner for hub and offline tasks.

Importing this module registers `GSAEvalLM` under the name "gsa" (lm-eval's `@register_model`). It serves any
causal LM folder (ours or a transformers one), scores through `gsa.eval.scoring` (batched, right-padded) and
generates greedily from the model's cache, which for GSA is the recurrent slot state.

Tokenisation follows lm-eval's conventions: a context's trailing spaces move to the continuation, the
continuation's tokens are those of context + continuation after the context's, an empty context becomes the
prefix token (BOS, else EOS), and no BOS is added otherwise unless `add_bos_token=True`.
"""

from __future__ import annotations

import importlib.util
import os
import random
import tempfile
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..data import SentencePieceTokenizer
from .loading import load_causal_lm, model_device, model_tokenizer
from .offline_tasks import OFFLINE_TASKS, default_data_dir
from .perplexity import prefix_token_id
from .scoring import greedy_generate, rolling_windows, score_continuations

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_GROUP = "gsa_offline"
DEFAULT_MAX_LENGTH = 2048  # the paper's training context; a recurrent model has no hard limit
# lm-eval's RULER generators size prompts in the model's tokens and put a few-shot example of up to 500 tokens
# before every prompt; a tokenizer with fewer characters per token (bytes) cannot fit it, and they never return.
RULER_MIN_CHARS_PER_TOKEN = 2.0
RULER_FEWSHOT_TOKENS = 500  # vt_utils.get_dataset: the few-shot example's max_seq_length
# modules lm-eval's RULER task files import when the tasks are read (ruler_vt includes the needle task's YAML)
RULER_MODULES = {"wonderwords": "wonderwords", "nltk": "nltk"}
OFFLINE_CHOICES = (OFFLINE_GROUP, *OFFLINE_TASKS, "ruler_vt")
TOKENIZER_PROBE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "Memorize and track the chain of variable assignments hidden in the following text."
)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_model("gsa")
class GSAEvalLM(LM):
    """lm-eval model over a causal LM.

    Args:
        pretrained: a model folder (GSA or any transformers causal LM), or a model object already loaded.
        tokenizer: "bytes", "mistral", a SentencePiece .model file, a tokenizer folder, or a tokenizer object (a
            `gsa.data` tokenizer or a transformers one); default: the one saved in the model folder.
        device, dtype: "auto" picks CUDA + bfloat16 when there is a GPU, else CPU + float32.
        batch_size: requests per forward pass.
        max_length: tokens the model reads at once (rolling windows, truncation of long contexts); default: the
            config's max_position_embeddings for Transformers, 2048 for GSA.
        max_gen_toks: generation length when a task does not say.
        add_bos_token: start every context with BOS (for models trained that way).
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        tokenizer=None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
    ):
        super().__init__()
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained.eval()
            model_dir = None
        else:
            self.model = load_causal_lm(pretrained, device, dtype)
            model_dir = pretrained
        self.tokenizer = model_tokenizer(model_dir, tokenizer)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.max_length = _positive_int("max_length", max_length if max_length is not None else self._default_length())
        self.add_bos_token = bool(add_bos_token)
        self.prefix_token = prefix_token_id(self.tokenizer)

    def _default_length(self) -> int:
        config = self.model.config
        if getattr(config, "model_type", None) == "gsa" and not getattr(config, "attention_layers", ()):
            return DEFAULT_MAX_LENGTH
        return getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH

    @property
    def device(self):
        return model_device(self.model)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def _encode_context(self, context: str) -> list[int]:
        tokens = self.tokenizer.encode(context)
        if self.add_bos_token and self.tokenizer.bos_id is not None:
            tokens = [self.tokenizer.bos_id, *tokens]
        return tokens or [self.prefix_token]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        context_tokens = self.tokenizer.encode(context)
        continuation_tokens = whole[len(context_tokens) :]
        if self.add_bos_token and self.tokenizer.bos_id is not None:
            context_tokens = [self.tokenizer.bos_id, *context_tokens]
        return context_tokens, continuation_tokens

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        empty = [i for i, (_, continuation) in enumerate(pairs) if not continuation]
        if empty:
            raise ValueError(f"requests {empty[:5]} have a continuation that encodes to no tokens")
        scores = score_continuations(
            self.model, pairs, self.batch_size, self.max_length, progress=not disable_tqdm, desc="loglikelihood"
        )
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in rolling_windows(self.tokenizer.encode(text), self.prefix_token, self.max_length):
                windows.append(window)
                owners.append(index)
        scores = score_continuations(
            self.model, windows, self.batch_size, progress=not disable_tqdm, desc="loglikelihood_rolling"
        )
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        contexts = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 1.0) > 0:
                raise ValueError(
                    f"the gsa model type decodes greedily; request {index} asked for sampling {gen_kwargs}"
                )
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _positive_int("max_gen_toks", int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)))
            key = (tuple(until), max_new)
            groups.setdefault(key, []).append(index)
            contexts.append(context)
        answers = [""] * len(requests)
        for (until, max_new), indices in groups.items():
            budget = max(1, self.max_length - max_new)
            prompts = [self._encode_context(contexts[i])[-budget:] for i in indices]

            def finished(generated: list[int], stops=until) -> bool:  # EOS stops by id, not by text
                text = self.tokenizer.decode(generated)
                return any(stop in text for stop in stops)

            stop_ids = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
            outputs = greedy_generate(
                self.model, prompts, max_new, stop_ids, finished if until else None, self.batch_size,
                progress=not disable_tqdm, desc="generate_until",
            )
            for i, tokens in zip(indices, outputs):
                text = self.tokenizer.decode(tokens)
                for stop in until:
                    text = text.split(stop)[0]
                answers[i] = text
        return answers


def is_ruler_task(task: str) -> bool:
    return task.startswith("ruler") or task.startswith("niah")


def ruler_vt_min_length(tokenizer) -> int:
    """The shortest prompt length (tokens) at which lm-eval's ruler_vt generator returns with this tokenizer.

    Its generator (lm_eval/tasks/ruler/vt_utils.py) first grows a few-shot example, starting from 5 noise
    sentences, to fill at most 500 tokens, then grows each question from 10 noise sentences to fill the length
    asked for, with the example and 30 tokens to generate; where even the smallest does not fit it loops forever.
    Measured here with its own text generator on a few draws, plus a margin for special tokens."""
    import numpy as np
    from lm_eval.tasks.ruler import vt_utils

    def tokens(text: str, answer: list[str]) -> int:
        return len(tokenizer.encode(f"{text} {answer}")) + 2  # RULER's AutoTokenizer may add BOS / EOS

    generate = vt_utils.CONFIG["variable_tracking"]["tokens_to_generate"]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        fewshot = max(tokens(*vt_utils.generate_input_output(5, 1, 4, is_icl=True)) for _ in range(5))
        question = max(tokens(*vt_utils.generate_input_output(10, 1, 4)) for _ in range(5))
    finally:  # leave the caller's random streams as they were
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if fewshot + generate > RULER_FEWSHOT_TOKENS:
        raise ValueError(
            f"ruler_vt needs a subword tokenizer: its smallest few-shot example takes {fewshot} tokens of "
            f"{tokenizer.name!r}, more than the {RULER_FEWSHOT_TOKENS - generate} lm-eval allows, and its generator "
            "would never return"
        )
    return question + generate + RULER_FEWSHOT_TOKENS


def _has_protobuf() -> bool:
    return importlib.util.find_spec("google.protobuf") is not None


def check_ruler_ready(tokenizer, saved_dir: str | os.PathLike, tasks: list[str], lengths: tuple[int, ...]) -> None:
    """Fail at once, naming what is missing, where lm-eval's RULER generators would fail late or never return:
    their packages, a tokenizer `AutoTokenizer` can read from `saved_dir` (where `tokenizer.save` wrote it) with
    enough characters per token, and (ruler_vt) lengths its generator can fill."""
    from transformers import AutoTokenizer

    missing = [package for module, package in RULER_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(
            f"RULER tasks need the packages {', '.join(missing)}, which lm-eval's RULER task files import: "
            f"pip install {' '.join(missing)}"
        )
    chars_per_token = len(TOKENIZER_PROBE) / len(tokenizer.encode(TOKENIZER_PROBE))
    if chars_per_token < RULER_MIN_CHARS_PER_TOKEN:
        raise ValueError(
            f"RULER tasks need a subword tokenizer (at least {RULER_MIN_CHARS_PER_TOKEN} characters per token, "
            f"got {chars_per_token:.1f} from {tokenizer.name!r}): their few-shot example must fit in "
            f"{RULER_FEWSHOT_TOKENS} tokens, else lm-eval's generator never returns"
        )
    if "ruler_vt" in tasks:
        shortest = ruler_vt_min_length(tokenizer)
        if min(lengths) < shortest:
            raise ValueError(
                f"ruler_vt cannot make prompts of {min(lengths)} tokens with tokenizer {tokenizer.name!r}: its "
                f"few-shot example and shortest question need {shortest}; give --ruler-lengths {shortest} or more"
            )
    try:
        AutoTokenizer.from_pretrained(str(saved_dir))
    except Exception as error:  # noqa: BLE001  (transformers raises many kinds here; each means the same to us)
        needs = ""
        if isinstance(tokenizer, SentencePieceTokenizer) and not _has_protobuf():
            needs = "; transformers converts a SentencePiece tokenizer.model only with protobuf: pip install protobuf"
        raise ValueError(
            f"RULER tasks load the tokenizer with transformers.AutoTokenizer, which cannot read tokenizer "
            f"{tokenizer.name!r} ({type(error).__name__}: {str(error).strip().splitlines()[-1]}){needs}"
        ) from None


def _task_folders(tasks: list[str]) -> list[str]:
    """Our task folder, and lm-eval's RULER folder where a RULER task is asked for."""
    folders = [str(TASKS_DIR)]
    if any(is_ruler_task(t) for t in tasks):
        import lm_eval.tasks

        folders.append(str(Path(lm_eval.tasks.__file__).parent / "ruler"))
    return folders


def run_harness(
    lm: GSAEvalLM,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    ruler_lengths: tuple[int, ...] = (1024,),
    seed: int = 1234,
    bootstrap_iters: int = 0,
) -> dict:
    """lm-eval's `simple_evaluate` on `tasks`: our offline YAMLs (data built under `data_dir`) and any other lm-eval
    task; hub tasks need the network. RULER tasks size their prompts with this model's tokenizer to `ruler_lengths`.
    bootstrap_iters > 0 adds lm-eval's bootstrap standard errors (slow for perplexities).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given; expected lm-eval task names, e.g. gsa_offline or gsa_shakespeare_ppl")
    ours = {*OFFLINE_TASKS, OFFLINE_GROUP}
    unknown_ours = [t for t in tasks if t.startswith("gsa_") and t not in ours]  # our namespace: checked at once
    if unknown_ours:
        raise ValueError(f"unknown offline tasks {unknown_ours}; expected some of {', '.join(sorted(ours))}")
    offline_only = all(t in ours or is_ruler_task(t) for t in tasks)  # then lm-eval's other 14,000 go unindexed
    with tempfile.TemporaryDirectory(prefix="gsa-tokenizer-") as tokenizer_dir:
        if any(is_ruler_task(t) for t in tasks):
            # RULER's generators load the tokenizer by name (AutoTokenizer) to size prompts: give them a folder
            lm.tokenizer.save(tokenizer_dir)
            check_ruler_ready(lm.tokenizer, tokenizer_dir, tasks, ruler_lengths)
        metadata = {
            "data_dir": str(data_dir if data_dir is not None else default_data_dir()),
            "tokenizer": tokenizer_dir,
            "max_seq_lengths": list(ruler_lengths),
        }
        manager = TaskManager(include_path=_task_folders(tasks), include_defaults=not offline_only, metadata=metadata)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval tasks {unknown}; offline tasks here: {', '.join(OFFLINE_CHOICES)}")
        try:
            results = simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters,
            )
        except ConnectionError as error:  # what `datasets` raises when the Hub cannot be reached
            hub = [t for t in tasks if t not in ours and not is_ruler_task(t)]
            raise ValueError(
                f"lm-eval tasks {hub} need their data from the Hugging Face Hub, which this machine cannot reach "
                f"({error}); offline, run {', '.join(OFFLINE_CHOICES)}"
            ) from None
    _drop_unmeasured_ruler_lengths(results, ruler_lengths)
    return results


def _drop_unmeasured_ruler_lengths(results: dict, lengths: tuple[int, ...]) -> None:
    """RULER reports -1 for every default length (4096) it was not asked for; keep the lengths measured."""
    asked = {str(length) for length in lengths}
    for task, metrics in results.get("results", {}).items():
        if not is_ruler_task(task):
            continue
        for key in [k for k in metrics if k.split(",")[0].isdigit() and k.split(",")[0] not in asked]:
            if metrics[key] == -1:
                metrics.pop(key)
                metrics.pop(key.replace(",", "_stderr,", 1), None)
