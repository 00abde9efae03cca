"""Multi-query associative recall (MQAR), the synthetic recall task of the Zoology benchmark (Arora et al., 2023).

An example of `seq_len` tokens:

    k1 v1 k2 v2 ... kP vP | q . q . q . ...        (P = num_pairs key-value pairs, then the query region)

Keys are distinct tokens of [1, vocab_size / 2), values distinct tokens of [vocab_size / 2, vocab_size): the two
vocabularies are disjoint, so a key can never be mistaken for a value. The query region is cut into two-token
slots; every key is asked exactly once, at the first token of a slot, and the slots are drawn without replacement
with probability proportional to (slot index + 1) ** (power_a - 1), a power law that puts most queries early.
Every other position holds a uniformly random token. Targets are aligned with the inputs (targets[t] is what the
model must predict after reading inputs[: t + 1]): the queried key's value at each query, -100 everywhere else.

Zoology trains on a mixture of task sizes (few pairs in short sequences up to the hardest) and tests on the target;
`training_mixture` gives that mixture for any target: the target and its copies with seq_len and num_pairs halved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARTask:
    vocab_size: int = 8192
    seq_len: int = 512
    num_pairs: int = 64
    power_a: float = 0.01

    def __post_init__(self):
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.vocab_size // 2 - 1 < self.num_pairs:
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves {self.vocab_size // 2 - 1} keys, fewer than num_pairs "
                f"{self.num_pairs}; expected vocab_size >= 2 * (num_pairs + 1)"
            )
        if self.query_slots < self.num_pairs:
            raise ValueError(
                f"seq_len {self.seq_len} leaves {self.query_slots} query slots after {self.num_pairs} pairs; expected "
                f"seq_len >= 4 * num_pairs = {4 * self.num_pairs}"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    @property
    def query_slots(self) -> int:
        return (self.seq_len - 2 * self.num_pairs) // 2

    @property
    def key_range(self) -> tuple[int, int]:
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    def as_dict(self) -> dict:
        return asdict(self)

    def sample(self, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [num_examples, seq_len], on the generator's device."""
        device = generator.device
        B, P = num_examples, self.num_pairs

        def distinct(low: int, high: int) -> torch.Tensor:
            """P distinct tokens of [low, high) per example, in random order."""
            scores = torch.rand(B, high - low, generator=generator, device=device)
            return scores.topk(P, dim=1).indices + low

        keys = distinct(*self.key_range)
        values = distinct(*self.value_range)
        # weighted sampling without replacement as a top-k of log-weights plus Gumbel noise
        slot = torch.arange(1, self.query_slots + 1, device=device, dtype=torch.float64)
        log_weights = (self.power_a - 1) * slot.log()
        uniform = torch.rand(B, self.query_slots, generator=generator, device=device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        slots = (log_weights + gumbel).topk(P, dim=1).indices  # slots[:, i]: where key i is asked

        inputs = torch.randint(0, self.vocab_size, (B, self.seq_len), generator=generator, device=device)
        inputs[:, 0 : 2 * P : 2] = keys
        inputs[:, 1 : 2 * P : 2] = values
        query_positions = 2 * P + 2 * slots
        inputs.scatter_(1, query_positions, keys)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets.scatter_(1, query_positions, values)
        return inputs, targets


def training_mixture(task: MQARTask, levels: int) -> list[MQARTask]:
    """The target task, then up to `levels - 1` copies with seq_len and num_pairs halved again each time (same
    vocabulary, same pairs-to-length ratio); stops before num_pairs would drop below one."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    tasks = [task]
    while len(tasks) < levels and tasks[-1].num_pairs >= 2:
        last = tasks[-1]
        tasks.append(replace(last, seq_len=last.seq_len // 2, num_pairs=last.num_pairs // 2))
    return tasks


def mqar_examples(
    task: MQARTask, num_examples: int, seed: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible set: the same (task, num_examples, seed) gives the same tensors, whatever `device` is
    (drawn on the CPU, then moved)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = task.sample(num_examples, generator)
    return inputs.to(device), targets.to(device)
