"""Packing documents into fixed-length training windows without letting one document see another.

A split's spans (documents, or parts of documents) are laid end to end into one stream and cut every `seq_len`
tokens. Window i reads stream[i·T : i·T + T + 1]: T inputs and their T next-token targets, so each token after
the first is a target exactly once. A window usually holds the end of one document and the start of the next;
the batch then says where each document starts (`cu_seqlens`), so the model resets its slots there, and the one
target that would ask the model to guess the first token of the next document from the previous one is ignored
(label -100).

Which window feeds which step is a pure function of the sample index (`SampleOrder`): a run resumed at sample n,
or run with another number of processes, reads exactly the data an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedWindows:
    """The fixed-length windows of one split; `window(i)` gives its T + 1 tokens and where documents start."""

    def __init__(self, tokens: np.ndarray, spans: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        lengths = spans[:, 1] - spans[:, 0]
        if (lengths < 0).any():
            raise ValueError("spans must be [start, end) ranges with start <= end")
        spans, lengths = spans[lengths > 0], lengths[lengths > 0]
        self.tokens = tokens
        self.seq_len = seq_len
        self.span_starts = spans[:, 0]
        self.stream_ends = np.cumsum(lengths)
        self.stream_starts = self.stream_ends - lengths
        self.num_tokens = int(self.stream_ends[-1]) if len(lengths) else 0
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def num_targets(self, indices) -> int:
        """How many targets windows `indices` hold (T each, less one per document starting inside), computed
        without reading tokens: each process can count a whole global batch cheaply."""
        begins = np.asarray(indices, dtype=np.int64) * self.seq_len
        starts_inside = (np.searchsorted(self.stream_starts, begins + self.seq_len, side="right")
                         - np.searchsorted(self.stream_starts, begins, side="right"))
        return int(len(begins) * self.seq_len - starts_inside.sum())

    def window(self, index: int) -> tuple[np.ndarray, list[int]]:
        """(tokens [T + 1] int64, document starts: the positions 1..T of the window where a span begins)."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range: this split has {self.num_windows} windows")
        begin, end = index * self.seq_len, index * self.seq_len + self.seq_len + 1
        pieces, starts = [], []
        span = int(np.searchsorted(self.stream_ends, begin, side="right"))
        while span < len(self.stream_ends) and self.stream_starts[span] < end:
            lo = max(begin, int(self.stream_starts[span]))
            hi = min(end, int(self.stream_ends[span]))
            offset = int(self.span_starts[span] - self.stream_starts[span])
            pieces.append(self.tokens[lo + offset : hi + offset])
            if self.stream_starts[span] > begin:
                starts.append(int(self.stream_starts[span]) - begin)
            span += 1
        return np.concatenate(pieces).astype(np.int64), starts


@dataclass
class Batch:
    """Model inputs for one micro-batch. Packed: input_ids / labels [1, B·T] with cu_seqlens [N + 1] marking every
    document and row start; unpacked: [B, T] rows, cu_seqlens None (state is reset only at row starts)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    num_targets: int  # labels that are not IGNORE_INDEX (counted on the host: no device sync to read it)

    def to(self, device: torch.device) -> Batch:
        # to a GPU from pinned host memory: a copy from pageable memory first waits for the stream's queued work
        # (the previous step's), leaving the GPU idle while the host builds the next batches
        pin = torch.device(device).type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(device=device, non_blocking=True)

        cu_seqlens = None if self.cu_seqlens is None else move(self.cu_seqlens)
        return Batch(move(self.input_ids), move(self.labels), cu_seqlens, self.num_targets)

    def model_inputs(self) -> dict:
        """Keyword arguments for GSAForCausalLM: the labels are already the next tokens (shift_labels=False)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "cu_seqlens": self.cu_seqlens,
                "shift_labels": False}


def make_batch(windows: PackedWindows, indices, pack_documents: bool = True, predict: bool = True) -> Batch:
    """The batch of windows `indices`. pack_documents: flatten the rows into one sequence with cu_seqlens at every
    document and row start (no state crosses a document); otherwise [B, T] rows. predict=False gives a batch with
    no targets (all labels -100), for a process that must run a forward pass in lockstep but has no data left."""
    T = windows.seq_len
    rows, labels, boundaries = [], [], [0]
    for row, index in enumerate(indices):
        tokens, starts = windows.window(int(index))
        targets = tokens[1:].copy()
        for start in starts:
            targets[start - 1] = IGNORE_INDEX  # the first token of a document, guessed from the one before
        if not predict:
            targets[:] = IGNORE_INDEX
        rows.append(tokens[:-1])
        labels.append(targets)
        boundaries.extend(row * T + start for start in starts if start < T)
        boundaries.append((row + 1) * T)
    if not rows:
        raise ValueError("a batch needs at least one window index")
    input_ids = torch.from_numpy(np.stack(rows))
    label_ids = torch.from_numpy(np.stack(labels))
    num_targets = int((label_ids != IGNORE_INDEX).sum())
    if not pack_documents:
        return Batch(input_ids, label_ids, None, num_targets)
    return Batch(input_ids.reshape(1, -1), label_ids.reshape(1, -1), torch.tensor(boundaries, dtype=torch.int64),
                 num_targets)


class SampleOrder:
    """Which window the n-th training sample is: each epoch visits every window once, in an order drawn from
    (seed, epoch). A function of n alone, so nothing but n needs saving to resume."""

    def __init__(self, num_windows: int, seed: int):
        if num_windows < 1:
            raise ValueError("the training split has no complete window; use a shorter seq_len or more data")
        self.num_windows = num_windows
        self.seed = seed
        self._epoch, self._order = -1, None

    def __getitem__(self, sample: int) -> int:
        epoch, position = divmod(int(sample), self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._order[position])

    def indices(self, first_sample: int, count: int) -> list[int]:
        return [self[first_sample + i] for i in range(count)]
