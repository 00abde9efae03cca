"""Data for the offline lm-eval tasks shipped in `gsa/eval/tasks/`, built from a bundled corpus on first use.

Three tasks over Shakespeare (the corpus every install has):
- gsa_shakespeare_ppl (loglikelihood_rolling): passages of consecutive paragraphs; word/byte perplexity, bits/byte.
- gsa_shakespeare_cloze (loglikelihood): LAMBADA-style last-word prediction. A passage ends a speech; the target
  is the speech's last word, kept only when that word already occurs earlier in the passage, so the context can
  tell a reader what it is; perplexity of the word and accuracy of greedy prediction.
- gsa_shakespeare_next_line (multiple_choice): the opening lines of a speech, then the true next line among
  three lines drawn from other works; accuracy and length-normalised accuracy.

Files are JSON lines under `data_dir/v{BUILD_VERSION}/`, written once (atomically) and reused; the sampling is
seeded, so every machine builds the same examples.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from ..data.corpora import shakespeare_documents

BUILD_VERSION = 1
OFFLINE_TASKS = ("gsa_shakespeare_ppl", "gsa_shakespeare_cloze", "gsa_shakespeare_next_line")
PPL_PASSAGES, PPL_PASSAGE_CHARS = 100, 3000
CLOZE_EXAMPLES, CLOZE_CONTEXT_CHARS = 500, 800
NEXT_LINE_EXAMPLES, NEXT_LINE_CHOICES = 500, 4
SEED = 1234
# a speaker tag is a short line that ends a name with a period: "Ham.", "First Clown.", "Lady Macbeth."
SPEAKER_TAG = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")
LAST_WORD = re.compile(r" ([A-Za-z]{4,})[^A-Za-z]*$")


def default_data_dir() -> Path:
    """$GSA_EVAL_DATA, else ~/.cache/gsa/eval."""
    return Path(os.environ.get("GSA_EVAL_DATA", Path.home() / ".cache" / "gsa" / "eval"))


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]


def _speeches(paragraphs: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker tag, lines) of every paragraph that is a speech of at least two lines."""
    speeches = []
    for paragraph in paragraphs:
        lines = paragraph.split("\n")
        if len(lines) >= 3 and SPEAKER_TAG.match(lines[0]) and not any(line.startswith("[") for line in lines[1:]):
            speeches.append((lines[0], lines[1:]))
    return speeches


def _works() -> list[tuple[str, list[str]]]:
    """(work, paragraphs) of every Shakespeare work, the work named without the corpus prefix ("hamlet")."""
    return [(name.removeprefix("shakespeare/"), _paragraphs(text)) for name, text in shakespeare_documents()]


def build_ppl(works, rng: random.Random) -> list[dict]:
    passages = []
    for name, paragraphs in works:
        current: list[str] = []
        for paragraph in paragraphs:
            current.append(paragraph)
            if sum(len(p) + 2 for p in current) >= PPL_PASSAGE_CHARS:
                passages.append({"work": name, "text": "\n\n".join(current)})
                current = []
    return rng.sample(passages, min(PPL_PASSAGES, len(passages)))


def build_cloze(works, rng: random.Random) -> list[dict]:
    candidates = []
    for name, paragraphs in works:
        for i, paragraph in enumerate(paragraphs):
            lines = paragraph.split("\n")
            if len(lines) < 3 or not SPEAKER_TAG.match(lines[0]):
                continue
            passage = "\n\n".join(paragraphs[max(0, i - 3) : i + 1])
            if len(passage) > CLOZE_CONTEXT_CHARS:  # start at a line boundary
                cut = passage.find("\n", len(passage) - CLOZE_CONTEXT_CHARS)
                passage = passage[cut + 1 :]
            match = LAST_WORD.search(passage)
            if match is None:
                continue
            word, context = match.group(1), passage[: match.start()]
            if re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
                candidates.append({"work": name, "context": context, "target": " " + word})
    return rng.sample(candidates, min(CLOZE_EXAMPLES, len(candidates)))


def build_next_line(works, rng: random.Random) -> list[dict]:
    speeches = [(name, tag, lines) for name, paragraphs in works for tag, lines in _speeches(paragraphs)]
    long_speeches = [s for s in speeches if len(s[2]) >= 4]
    all_lines = [(name, line) for name, _, lines in speeches for line in lines if len(line) >= 20]
    examples = []
    for name, tag, lines in rng.sample(long_speeches, min(NEXT_LINE_EXAMPLES, len(long_speeches))):
        shown = rng.randint(2, len(lines) - 1)
        answer = lines[shown]
        distractors: list[str] = []
        while len(distractors) < NEXT_LINE_CHOICES - 1:
            other_work, line = rng.choice(all_lines)
            if other_work != name and line != answer and line not in distractors:
                distractors.append(line)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        examples.append(
            {"work": name, "context": "\n".join([tag, *lines[:shown]]) + "\n", "choices": choices,
             "label": choices.index(answer)}
        )
    return examples


BUILDERS = {
    "gsa_shakespeare_ppl": build_ppl,
    "gsa_shakespeare_cloze": build_cloze,
    "gsa_shakespeare_next_line": build_next_line,
}


def task_data_path(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The JSON-lines file of an offline task, built from the corpus if it is not there yet."""
    if task not in BUILDERS:
        raise ValueError(f"unknown offline task {task!r}; expected one of {', '.join(OFFLINE_TASKS)}")
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / f"v{BUILD_VERSION}" / f"{task}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = BUILDERS[task](_works(), random.Random(f"{SEED}-{task}"))
    partial = path.with_suffix(f".tmp{os.getpid()}")
    with open(partial, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    os.replace(partial, path)  # concurrent builders write identical files; the last rename wins
    return path


def load_task_dataset(task: str, data_dir: str | os.PathLike | None = None) -> dict:
    """{"test": datasets.Dataset} of an offline task, as lm-eval's `custom_dataset` hook wants it."""
    import datasets

    with open(task_data_path(task, data_dir), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}
