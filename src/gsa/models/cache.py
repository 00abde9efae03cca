"""The generation cache: each layer's recurrent slot state (fixed size) or, for attention layers, its keys/values."""

from __future__ import annotations

import torch

from ..layers import KVState, SlotState


class GSACache:
    """Per-layer decoding state for `GSAForCausalLM`.

    GSA layers keep a `SlotState` whose size does not grow with the number of tokens; softmax-attention layers of a
    hybrid keep a `KVState` that does. Passed to the model as `cache=` (or `past_key_values=`) and returned by it.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list[SlotState | KVState | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int):
        return self.states[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for state in self.states:
            if state is not None:
                state.select(beam_idx.to(self._device(state)))

    @staticmethod
    def _device(state) -> torch.device:
        return state.hk.device if isinstance(state, SlotState) else state.k.device

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        total = 0
        for state in self.states:
            if isinstance(state, SlotState):
                tensors = [state.hk, state.hv, *(state.conv or ())]
            elif isinstance(state, KVState):
                tensors = [state.k, state.v, state.valid]
            else:
                tensors = []
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
