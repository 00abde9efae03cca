"""T2R ("finetuning pretrained Transformers to RNNs", spec §5): a Llama or Mistral checkpoint becomes a GSA one.

Every weight of the source is kept: embeddings, the pre-norms, the q/k/v/o projections, the SwiGLU MLP, the final
norm and the LM head (tied stays tied). RoPE goes, since GSA layers have no positional encoding. Each layer gains
the forget-gate projection f_proj (the only new weights) and the output norm g_norm (weight ones). The grouped-query
layout is kept: q heads, kv heads and head width come from the source, with num_slots slots per kv head.

    from gsa.models.t2r import convert_to_gsa
    report = convert_to_gsa("llama-folder", "gsa-folder")                     # safetensors source
    report = convert_to_gsa("smollm2-folder", "gsa-folder", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

or `gsa convert SRC OUT [--gguf-file NAME]`. GGUF sources need the `gguf` and `accelerate` packages.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import read_safetensors
from .configuration_gsa import GSAConfig
from .modeling_gsa import GSAForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# Why the forget gate starts as random weights whose logits have a standard deviation of about 1:
# - W_f = 0 would give every slot the same gate, so every slot would hold the same summary of the past, the slot
#   softmax would be uniform, and every slot would receive the same gradient: the slots could never tell
#   themselves apart during finetuning. Random rows break that symmetry.
# - With f of standard deviation about 1 and τ = 8, α = sigmoid(f)^(1/τ) spreads around 0.5^(1/8) ≈ 0.92
#   (0.81 at f = -1.5, 0.975 at f = +1.5): slots that average over roughly 5 to 40 recent tokens, a spread of
#   memory lengths for finetuning to choose from, with s = 1 - α away from zero so every slot is written to from
#   the first token. Nearly equal gates (a small spread) leave the converted model closer to the original before
#   any update, but what matters is how fast finetuning recovers it: on SmolLM2-135M, 40 AdamW steps after
#   conversion left held-out perplexity 1293 / 1240 / 1209 for spreads 0.1 / 0.3 / 1 (docs/t2r.md).
# - The logits are f = W_f · (w ⊙ x̂), with x̂ the unit-RMS input of the layer and w its attn_norm weight, so
#   Var f ≈ σ² ‖w‖²; the rows are drawn with σ = gate_logit_std / ‖w‖, which gives the intended spread whatever
#   scale the source model's norms settled at.
DEFAULT_GATE_LOGIT_STD = 1.0


class UnsupportedSourceError(ValueError):
    """The source checkpoint has a feature GSA cannot represent; the message names the field."""


@dataclass
class ConversionReport:
    source: str
    output: str
    model_type: str
    config: GSAConfig
    source_parameters: int
    gsa_parameters: int
    seconds: float
    dropped: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    tokenizer: str = ""

    def summary(self) -> str:
        c = self.config
        lines = [
            f"converted {self.model_type} {self.source} -> GSA {self.output} in {self.seconds:.1f} s",
            f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_heads} q / {c.num_kv_heads} kv, "
            f"head width {c.hidden_size * c.expand_k // c.num_heads:g}, slots {c.num_slots} per kv head, "
            f"τ {c.gate_logit_normalizer:g}, tied embeddings {c.tie_word_embeddings}",
            f"  parameters {self.source_parameters:,} -> {self.gsa_parameters:,}",
            *(f"  added: {line}" for line in self.added),
            *(f"  dropped: {line}" for line in self.dropped),
            f"  tokenizer: {self.tokenizer}",
        ]
        return "\n".join(lines)


def _rope_description(source) -> tuple[str, bool]:
    """('rope_type=..., rope_theta=...', whether the RoPE is scaled); transformers 5 keeps both in
    rope_parameters, older configs in rope_theta / rope_scaling."""
    params = dict(getattr(source, "rope_parameters", None) or getattr(source, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(source, "rope_theta", None))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    details = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    return f"rope_type={rope_type!r}, {details}", rope_type != "default"


def gsa_config_from_source(
    source, num_slots: int = 64, gate_logit_normalizer: float = 8.0
) -> tuple[GSAConfig, list[str]]:
    """The GSAConfig that holds a Llama/Mistral config's weights, and what of the source it drops (as lines).
    Raises UnsupportedSourceError for what cannot be represented."""
    model_type = getattr(source, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedSourceError(
            f"unsupported source model_type {model_type!r}: T2R converts {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    for name, what in (("attention_bias", "q/k/v/o projections"), ("mlp_bias", "MLP projections")):
        if getattr(source, name, False):
            raise UnsupportedSourceError(f"source config has {name}=True: GSA's {what} have no bias")
    if source.hidden_act not in ("silu", "swish"):
        raise UnsupportedSourceError(
            f"source config has hidden_act={source.hidden_act!r}: GSA's MLP is SwiGLU (hidden_act 'silu')"
        )
    hidden, num_heads = source.hidden_size, source.num_attention_heads
    num_kv_heads = getattr(source, "num_key_value_heads", None) or num_heads
    head_dim = getattr(source, "head_dim", None) or hidden // num_heads
    # GSA sizes its heads as hidden_size * expand_k / num_heads; a source head width other than hidden/heads is
    # kept through expand_k = expand_v = head_dim * heads / hidden when that product comes out exact.
    expand = 1 if head_dim * num_heads == hidden else head_dim * num_heads / hidden
    if hidden * expand != head_dim * num_heads or num_heads % num_kv_heads:
        raise UnsupportedSourceError(
            f"source config has head_dim={head_dim} with hidden_size={hidden}, num_attention_heads={num_heads}, "
            f"num_key_value_heads={num_kv_heads}: GSA needs hidden_size * expand_k = head_dim * num_heads exactly "
            "and num_heads a multiple of num_key_value_heads"
        )

    rope, scaled = _rope_description(source)
    dropped = [f"RoPE ({rope}): GSA layers use no positional encoding"]
    if scaled:
        dropped.append("RoPE scaling (see rope_type above): it only stretched the dropped RoPE")
    if getattr(source, "sliding_window", None) is not None:
        dropped.append(
            f"sliding_window={source.sliding_window}: GSA keeps a fixed-size slot memory of the whole past instead"
        )
    if getattr(source, "attention_dropout", 0.0):
        dropped.append(f"attention_dropout={source.attention_dropout}: GSA has no attention probabilities to drop")

    config = GSAConfig(
        vocab_size=source.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=source.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        num_slots=num_slots,
        expand_k=expand,
        expand_v=expand,
        gate_logit_normalizer=gate_logit_normalizer,
        feature_map="swish",
        intermediate_size=source.intermediate_size,
        hidden_act="swish",
        norm_eps=source.rms_norm_eps,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        tie_word_embeddings=bool(source.tie_word_embeddings),
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
    )
    return config, dropped


_LAYER_RENAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_GLOBAL_RENAMES = {
    "model.embed_tokens.weight": "model.embeddings.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# buffers some older exports saved: they describe the RoPE that the conversion drops
_ROPE_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def rename_source_tensors(source_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Llama/Mistral tensor names -> GSA names. A tensor with no place in GSA (a bias, say) is an error."""
    renamed, unknown = {}, []
    for name, tensor in source_state.items():
        if _ROPE_BUFFER.search(name) or (tied and name == "lm_head.weight"):
            continue  # the RoPE is dropped; a tied head is the embedding itself
        match = _LAYER_NAME.match(name)
        if match and match.group(2) in _LAYER_RENAMES:
            renamed[f"model.layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}"] = tensor
        elif name in _GLOBAL_RENAMES:
            renamed[_GLOBAL_RENAMES[name]] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedSourceError(
            f"source tensors with no counterpart in GSA: {sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return renamed


def forget_gate_weight(
    attn_norm_weight: torch.Tensor, rows: int, gate_logit_std: float, generator: torch.Generator
) -> torch.Tensor:
    """[rows, hidden] random W_f whose logits on this layer's normalised input have std ≈ gate_logit_std
    (see DEFAULT_GATE_LOGIT_STD for why)."""
    norm = attn_norm_weight.float().norm().clamp(min=1e-6)
    weight = torch.randn(rows, attn_norm_weight.numel(), generator=generator) * (gate_logit_std / norm)
    return weight.to(attn_norm_weight.dtype)


def build_gsa_model(
    config: GSAConfig,
    source_state: dict[str, torch.Tensor],
    gate_logit_std: float = DEFAULT_GATE_LOGIT_STD,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> GSAForCausalLM:
    """A GSAForCausalLM that holds the source tensors themselves (no copy when dtypes agree) plus the new f_proj
    and g_norm weights."""
    state = rename_source_tensors(source_state, config.tie_word_embeddings)
    if dtype is None:
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = GSAForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.attn."
        norm_weight = state.get(f"model.layers.{i}.attn_norm.weight")
        if norm_weight is None:
            break  # reported below as a missing tensor
        state[prefix + "f_proj.weight"] = forget_gate_weight(
            norm_weight, layer.attn.f_proj.out_features, gate_logit_std, generator
        )
        state[prefix + "g_norm.weight"] = torch.ones(layer.attn.g_norm.hidden_size)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    wrong_shape = [
        f"{name} {list(state[name].shape)} (expected {list(t.shape)})"
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    if missing or wrong_shape:
        raise UnsupportedSourceError(
            f"source tensors do not fit the GSA layout: missing {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"wrong shape {wrong_shape[:10]}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding/head pair counts once)."""
    return sum(p.numel() for p in model.parameters())


def _split_gguf_path(src: str, gguf_file: str | None) -> tuple[str, str | None]:
    if gguf_file is None and src.endswith(".gguf") and os.path.isfile(src):
        return os.path.dirname(os.path.abspath(src)), os.path.basename(src)
    return src, gguf_file


def load_source(src: str, gguf_file: str | None = None, dtype: torch.dtype | None = None):
    """(transformers config, tensors by name, parameter count) of a local Llama/Mistral checkpoint folder."""
    from transformers import AutoConfig

    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint folder {src} does not exist")
    if gguf_file is None:
        config = AutoConfig.from_pretrained(src)
        state = read_safetensors(src)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        tied_head = "lm_head.weight" if config.tie_word_embeddings else None
        parameters = sum(t.numel() for name, t in state.items() if name != tied_head and not _ROPE_BUFFER.search(name))
        return config, state, parameters
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF; say so before it fails deep inside)
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(f"GGUF sources need the packages gguf and accelerate: pip install gguf accelerate ({error})")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=dtype or torch.float32)
    return model.config, dict(model.state_dict()), count_parameters(model)


def save_tokenizer(src: str, out: str, gguf_file: str | None) -> str:
    """Put the source's tokenizer next to the converted weights; returns what was done, for the report."""
    if gguf_file is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src, gguf_file=gguf_file).save_pretrained(out)
        return f"rebuilt from {gguf_file} and saved"
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    return f"copied {', '.join(copied)}" if copied else f"none found in {src}: add one to {out} before use"


def convert_to_gsa(
    src: str,
    out: str,
    num_slots: int = 64,
    gate_logit_normalizer: float = 8.0,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    gate_logit_std: float = DEFAULT_GATE_LOGIT_STD,
    seed: int = 0,
) -> ConversionReport:
    """Convert the Llama/Mistral checkpoint folder `src` (safetensors, or the GGUF file `gguf_file` inside it) into
    the GSA checkpoint folder `out` (safetensors, config.json, tokenizer). dtype: of the written weights (default:
    the source's; float32 for GGUF, which is dequantised). seed: of the new forget-gate weights."""
    start = time.perf_counter()
    src, gguf_file = _split_gguf_path(os.fspath(src), gguf_file)
    source_config, source_state, source_parameters = load_source(src, gguf_file, dtype)
    config, dropped = gsa_config_from_source(source_config, num_slots, gate_logit_normalizer)
    model = build_gsa_model(config, source_state, gate_logit_std, seed, dtype)
    del source_state
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = save_tokenizer(src, out, gguf_file)
    attn = model.model.layers[0].attn
    added = [
        f"attn.f_proj [{attn.f_proj.out_features}, {attn.f_proj.in_features}] per layer "
        f"(forget-gate logits, random, std {gate_logit_std:g} on normalised inputs, seed {seed})",
        f"attn.g_norm [{attn.g_norm.hidden_size}] per layer (ones)",
    ]
    return ConversionReport(
        source=os.path.join(src, gguf_file) if gguf_file else src,
        output=out,
        model_type=source_config.model_type,
        config=config,
        source_parameters=source_parameters,
        gsa_parameters=count_parameters(model),
        seconds=time.perf_counter() - start,
        dropped=dropped,
        added=added,
        tokenizer=tokenizer,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="local Llama/Mistral checkpoint folder (or a .gguf file)")
    parser.add_argument("out", help="folder to write the GSA checkpoint to")
    parser.add_argument("--gguf-file", help="name of the GGUF file inside SRC (needs the gguf and accelerate packages)")
    parser.add_argument("--num-slots", type=int, default=64, help="slots per kv head (default 64, as the paper)")
    parser.add_argument(
        "--gate-logit-normalizer", type=float, default=8.0, help="τ, the forget-gate damping (default 8, as the paper)"
    )
    parser.add_argument(
        "--gate-logit-std",
        type=float,
        default=DEFAULT_GATE_LOGIT_STD,
        help=f"spread of the new forget-gate logits at initialisation (default {DEFAULT_GATE_LOGIT_STD:g})",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="of the written weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new forget-gate weights")


def run(args: argparse.Namespace) -> int:
    report = convert_to_gsa(
        args.src,
        args.out,
        num_slots=args.num_slots,
        gate_logit_normalizer=args.gate_logit_normalizer,
        gguf_file=args.gguf_file,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        gate_logit_std=args.gate_logit_std,
        seed=args.seed,
    )
    print(report.summary())
    return 0
