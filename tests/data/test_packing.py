"""Packing: windows cover the stream, targets never cross a document, cu_seqlens marks every start, and a packed
batch gives the model exactly what it would compute on each piece alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsa.data import IGNORE_INDEX, PackedWindows, SampleOrder, make_batch
from gsa.models import GSAConfig, GSAForCausalLM


def stream_of(tokens, spans):
    """The split's tokens end to end, and which span each came from (a reference built without the packer)."""
    pieces = [tokens[a:b] for a, b in spans]
    owner = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(spans)])
    return np.concatenate(pieces), owner


@pytest.fixture
def split():
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 50, 2000)
    # spans out of order and of mixed lengths (shorter and longer than a window), one empty
    spans = np.array([[900, 960], [0, 7], [100, 400], [500, 500], [1200, 1203], [1500, 1990]])
    return tokens, spans


def test_windows_tile_the_stream(split):
    tokens, spans = split
    T = 16
    windows = PackedWindows(tokens, spans, T)
    stream, _ = stream_of(tokens, spans)
    assert len(windows) == (len(stream) - 1) // T
    for i in range(len(windows)):
        window, _ = windows.window(i)
        assert np.array_equal(window, stream[i * T : i * T + T + 1])
    with pytest.raises(IndexError):
        windows.window(len(windows))


def test_targets_skip_document_starts_and_cu_seqlens_marks_them(split):
    tokens, spans = split
    T = 16
    windows = PackedWindows(tokens, spans, T)
    stream, owner = stream_of(tokens, spans)
    indices = [0, 3, len(windows) - 1, 7]
    batch = make_batch(windows, indices)
    assert batch.input_ids.shape == batch.labels.shape == (1, len(indices) * T)
    expected_bounds = {0}
    for row, i in enumerate(indices):
        inputs = batch.input_ids[0, row * T : (row + 1) * T].numpy()
        labels = batch.labels[0, row * T : (row + 1) * T].numpy()
        assert np.array_equal(inputs, stream[i * T : i * T + T])
        for t in range(T):
            here, after = i * T + t, i * T + t + 1
            crosses = owner[after] != owner[here]
            assert labels[t] == (IGNORE_INDEX if crosses else stream[after])
            if t > 0 and owner[here] != owner[here - 1]:
                expected_bounds.add(row * T + t)
        expected_bounds.add((row + 1) * T)
    assert batch.cu_seqlens.tolist() == sorted(expected_bounds)
    assert batch.num_targets == int((batch.labels != IGNORE_INDEX).sum())
    assert windows.num_targets(indices) == batch.num_targets
    assert [windows.num_targets([i]) for i in range(len(windows))] == [
        make_batch(windows, [i]).num_targets for i in range(len(windows))
    ]


def test_unpacked_batch_is_rows(split):
    tokens, spans = split
    windows = PackedWindows(tokens, spans, 8)
    packed, rows = make_batch(windows, [1, 2, 5]), make_batch(windows, [1, 2, 5], pack_documents=False)
    assert rows.cu_seqlens is None and rows.input_ids.shape == (3, 8)
    assert torch.equal(rows.input_ids.reshape(1, -1), packed.input_ids)
    assert torch.equal(rows.labels.reshape(1, -1), packed.labels)
    silent = make_batch(windows, [1], predict=False)
    assert silent.num_targets == 0


def test_packed_batch_equals_each_document_alone():
    """The point of cu_seqlens: the model's output on a packed batch is its output on every piece by itself."""
    torch.manual_seed(0)
    config = GSAConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=4,
                       intermediate_size=64)
    model = GSAForCausalLM(config).double().eval()
    tokens = np.random.default_rng(2).integers(3, 50, 300)
    spans = np.array([[0, 9], [20, 61], [100, 103], [150, 260]])
    batch = make_batch(PackedWindows(tokens, spans, 24), [0, 2, 4])
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, use_cache=False).logits
        bounds = batch.cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            alone = model(input_ids=batch.input_ids[:, a:b], use_cache=False).logits
            assert torch.allclose(packed[:, a:b], alone, rtol=1e-10, atol=1e-10)


def test_sample_order_visits_every_window_once_per_epoch():
    order = SampleOrder(num_windows=50, seed=3)
    first, second = order.indices(0, 50), order.indices(50, 50)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # a new order each epoch
    again = SampleOrder(num_windows=50, seed=3)
    assert [again[i] for i in (77, 3, 99, 0)] == [second[27], first[3], second[49], first[0]]
    assert SampleOrder(50, seed=4).indices(0, 50) != first
    with pytest.raises(ValueError, match="no complete window"):
        SampleOrder(0, seed=0)
