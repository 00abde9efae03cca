"""A synthetic recall suite beyond the paper: phonebook look-up and needle-in-a-haystack at growing lengths.

Both ask a model to copy something it read long ago, which a fixed-size recurrent state can only do if it chose to
keep it; a Transformer keeps everything. Scored for any causal LM, so GSA and a Transformer sit side by side.

- phonebook: "Name: 555-0123" lines, then "Name: " of one entry; the model must continue with that number.
- needle: a sentence "The secret number is 4821937." hidden at a relative depth of a Shakespeare haystack,
  then "What is the secret number? The secret number is"; the model must continue with the number.

Each example is scored two ways: `accuracy`, the greedy continuation (decoded from the model's cache) starts with
the answer; `token_accuracy`, the fraction of the answer's tokens that are the argmax given the true prefix, a
graded signal for models too weak to get whole answers right. Prompt lengths are counted in each model's tokens.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..data.corpora import shakespeare_documents
from .perplexity import prefix_token_id
from .scoring import greedy_generate, score_continuations

FIRST_NAMES = (
    "Ada", "Alan", "Alice", "Amir", "Anna", "Arjun", "Ben", "Bianca", "Carla", "Chen", "Clara", "Dara", "David",
    "Elena", "Emil", "Eva", "Farah", "Felix", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jonas", "Julia", "Kai",
    "Karim", "Lara", "Leo", "Lina", "Luca", "Maya", "Mei", "Milo", "Nadia", "Nico", "Nora", "Omar", "Oscar", "Paula",
    "Priya", "Rafael", "Rosa", "Sami", "Sara", "Taro", "Tessa", "Victor", "Yara", "Zoe",
)
LAST_NAMES = (
    "Abbott", "Alvarez", "Baker", "Bennett", "Brooks", "Castillo", "Chandra", "Dalton", "Diaz", "Dubois", "Ellis",
    "Fischer", "Foster", "Garcia", "Gupta", "Hale", "Hansen", "Ito", "Jensen", "Kato", "Keller", "Kowalski", "Lambert",
    "Larsen", "Lopez", "Marsh", "Meyer", "Moreau", "Nakamura", "Novak", "Okafor", "Olsen", "Park", "Petrov", "Quinn",
    "Ramos", "Reyes", "Rossi", "Sato", "Schmidt", "Silva", "Singh", "Sousa", "Tanaka", "Torres", "Vance", "Weber",
    "Wong", "Young", "Zhang",
)
TASKS = ("phonebook", "needle")
NEEDLE_QUESTION = "\n\nWhat is the secret number? The secret number is"


@dataclass(frozen=True)
class RecallSettings:
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    examples: int = 20  # per length (phonebook) and per length and depth (needle)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self):
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of token counts >= 64, got {self.lengths}")
        if self.examples < 1 or self.batch_size < 1:
            raise ValueError(f"examples and batch_size must be >= 1, got {self.examples} and {self.batch_size}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")


@dataclass(frozen=True)
class RecallExample:
    prompt: str
    answer: str


def _phone_number(rng: random.Random) -> str:
    return f"{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"


def phonebook_example(tokenizer, length: int, rng: random.Random) -> RecallExample:
    """A phonebook of as many entries as fit in `length` tokens (with the query), and one entry's look-up."""
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    entries, used = [], 0
    longest_name = max(names, key=lambda name: len(tokenizer.encode(name)))
    budget = length - len(tokenizer.encode(f"{longest_name}: 000-0000\n"))  # room for the query and its answer
    for name in names:
        line = f"{name}: {_phone_number(rng)}\n"
        cost = len(tokenizer.encode(line))
        if used + cost > budget:
            break
        entries.append(line)
        used += cost
    if len(entries) < 2:
        raise ValueError(f"length {length} holds fewer than two phonebook entries for this tokenizer")
    name, number = rng.choice(entries).rstrip("\n").split(": ")
    return RecallExample(prompt="".join(entries) + f"{name}:", answer=f" {number}")


@functools.cache
def _haystack_lines() -> tuple[str, ...]:
    lines = []
    for _, text in shakespeare_documents():
        lines.extend(line for line in text.split("\n") if line.strip())
    return tuple(lines)


def needle_example(tokenizer, length: int, depth: float, haystack: Sequence[str], rng: random.Random) -> RecallExample:
    """A passage of `length` tokens (with the question) from a random place in the haystack, the needle sentence
    inserted at the line boundary nearest to `depth` (0 = first line, 1 = just before the question)."""
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = f"The secret number is {number}."
    budget = length - len(tokenizer.encode(needle + "\n" + NEEDLE_QUESTION)) - 12
    start = rng.randrange(len(haystack))
    lines, used = [], 0
    while True:
        line = haystack[(start + len(lines)) % len(haystack)] + "\n"
        cost = len(tokenizer.encode(line))
        if used + cost > budget:
            break
        lines.append(line)
        used += cost
    lines.insert(round(depth * len(lines)), needle + "\n")
    return RecallExample(prompt="".join(lines).rstrip("\n") + NEEDLE_QUESTION, answer=f" {number}")


def build_examples(
    task: str, tokenizer, settings: RecallSettings
) -> dict[tuple[int, float | None], list[RecallExample]]:
    """(length, depth or None) -> examples; seeded, so every model of a comparison sees the same numbers/names."""
    if task not in TASKS:
        raise ValueError(f"unknown recall task {task!r}; expected one of {', '.join(TASKS)}")
    groups = {}
    if task == "phonebook":
        for length in settings.lengths:
            rng = random.Random(f"{settings.seed}-phonebook-{length}")
            groups[(length, None)] = [phonebook_example(tokenizer, length, rng) for _ in range(settings.examples)]
        return groups
    haystack = _haystack_lines()
    for length in settings.lengths:
        for depth in settings.depths:
            rng = random.Random(f"{settings.seed}-needle-{length}-{depth}")
            groups[(length, depth)] = [
                needle_example(tokenizer, length, depth, haystack, rng) for _ in range(settings.examples)
            ]
    return groups


def score_examples(model: torch.nn.Module, tokenizer, examples: list[RecallExample], batch_size: int) -> dict:
    """Exact-match accuracy of greedy continuations, teacher-forced answer token accuracy, mean prompt tokens."""
    prefix = prefix_token_id(tokenizer)
    prompts = [[prefix, *tokenizer.encode(e.prompt)] for e in examples]
    answers = [tokenizer.encode(e.prompt + e.answer)[len(p) - 1 :] for e, p in zip(examples, prompts)]
    longest_answer = max(len(a) for a in answers)
    generated = greedy_generate(model, prompts, longest_answer + 2, batch_size=batch_size)
    hits = [tokenizer.decode(g).strip().startswith(e.answer.strip()) for g, e in zip(generated, examples)]
    scores = score_continuations(model, list(zip(prompts, answers)), batch_size)
    return {
        "accuracy": sum(hits) / len(hits),
        "token_accuracy": sum(s.correct_tokens for s in scores) / sum(s.tokens for s in scores),
        "answer_logprob": sum(s.logprob for s in scores) / len(scores),
        "prompt_tokens": sum(len(p) for p in prompts) / len(prompts),
        "examples": len(examples),
    }


def model_max_length(model: torch.nn.Module) -> int | None:
    """The longest input to trust a model with: None (any) for ours, whose GSA layers are recurrent and whose
    attention layers use RoPE; a transformers model's max_position_embeddings otherwise."""
    config = model.config
    if getattr(config, "model_type", None) == "gsa":
        return None
    return getattr(config, "max_position_embeddings", None)


def evaluate_recall(model, tokenizer, settings: RecallSettings, tasks=TASKS, progress=None) -> dict:
    """task -> list of {length, depth, accuracy, token_accuracy, ...}; lengths past the model's limit are skipped."""
    limit = model_max_length(model)
    results = {}
    for task in tasks:
        rows = []
        for (length, depth), examples in build_examples(task, tokenizer, settings).items():
            if limit is not None and length > limit:
                rows.append({"length": length, "depth": depth, "skipped": f"model accepts at most {limit} tokens"})
                continue
            row = {"length": length, "depth": depth, **score_examples(model, tokenizer, examples, settings.batch_size)}
            rows.append(row)
            if progress:
                progress(task, row)
        results[task] = rows
    return {"settings": asdict(settings), "results": results}


def _cell(row: dict | None) -> str:
    if row is None or "skipped" in row:
        return "n/a"
    return f"{100 * row['accuracy']:.0f} ({100 * row['token_accuracy']:.0f})"


def format_tables(by_model: dict[str, dict]) -> str:
    """Per task, one row per length and one column per model: "accuracy (token accuracy)" in %; the needle
    task is averaged over depths."""
    names = list(by_model)
    column = max(12, *(len(name) for name in names)) + 2
    out = []
    for task in TASKS:
        if not any(task in r["results"] for r in by_model.values()):
            continue
        lengths = sorted({row["length"] for r in by_model.values() for row in r["results"].get(task, [])})
        header = f"{task + ' (len)':<16}" + "".join(f"{name:>{column}}" for name in names)
        out += [header, "-" * len(header)]
        for length in lengths:
            cells = []
            for name in names:
                rows = [row for row in by_model[name]["results"].get(task, []) if row["length"] == length]
                cells.append(_cell(_mean_row(rows)))
            out.append(f"{length:<16}" + "".join(f"{c:>{column}}" for c in cells))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _mean_row(rows: list[dict]) -> dict | None:
    scored = [r for r in rows if "skipped" not in r]
    if not scored:
        return rows[0] if rows else None
    return {key: sum(r[key] for r in scored) / len(scored) for key in ("accuracy", "token_accuracy")}


def plot_recall(by_model: dict[str, dict], path) -> None:
    """Left: phonebook accuracy by length; right: needle accuracy by length (mean over depths); one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, task in zip(axes, TASKS):
        for name, result in by_model.items():
            rows = result["results"].get(task, [])
            lengths = sorted({r["length"] for r in rows})
            points = [(n, _mean_row([r for r in rows if r["length"] == n])) for n in lengths]
            points = [(n, m) for n, m in points if m is not None and "accuracy" in m]
            if points:
                ax.plot([n for n, _ in points], [100 * m["accuracy"] for _, m in points], marker="o", label=name)
        all_lengths = sorted({r["length"] for result in by_model.values() for r in result["results"].get(task, [])})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (%)")
    axes[0].set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_needle_grid(name: str, result: dict, path) -> None:
    """The usual needle-in-a-haystack picture: accuracy by depth (rows) and length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"].get("needle", []) if "skipped" not in r]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[next(100 * r["accuracy"] for r in rows if r["length"] == n and r["depth"] == d) for n in lengths]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle in a haystack: {name}")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
