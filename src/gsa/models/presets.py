"""Named model sizes: the paper's (spec §3) and small ones for CPU runs and tests."""

from __future__ import annotations

from .configuration_gsa import GSAConfig

PRESETS: dict[str, dict] = {
    # the paper's models: Mistral tokenizer (vocab 32000), 64 slots, τ = 8
    "gsa-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=4, num_slots=64, vocab_size=32000),
    "gsa-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_heads=5, num_slots=64, vocab_size=32000),
    "gsa-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, num_slots=64, vocab_size=32000),
    # ~100M parameters with the Mistral vocabulary: one GPU, minutes
    "gsa-100m": dict(hidden_size=768, num_hidden_layers=12, num_heads=4, num_slots=64, vocab_size=32000),
    # CPU scale: the embedded default trains this on bytes in a few minutes
    "gsa-tiny": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, num_slots=32, vocab_size=260),
}


def _attention_twin(name: str, heads: int) -> dict:
    """The Transformer++ baseline of the same size: every layer softmax attention with RoPE."""
    base = dict(PRESETS[name])
    base["attn"] = {"layers": list(range(base["num_hidden_layers"])), "num_heads": heads, "rope_theta": 10000.0}
    return base


PRESETS["transformer-1.3b"] = _attention_twin("gsa-1.3b", 16)
PRESETS["transformer-100m"] = _attention_twin("gsa-100m", 12)
PRESETS["transformer-tiny"] = _attention_twin("gsa-tiny", 4)


def preset_config(name: str, **overrides) -> GSAConfig:
    """GSAConfig of a named preset, with any field overridden (e.g. vocab_size=len(tokenizer))."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
    return GSAConfig(**{**PRESETS[name], **overrides})
