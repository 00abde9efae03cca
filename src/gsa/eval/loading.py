"""What every evaluation needs to start: a causal LM on a device and its tokenizer.

Models load through `AutoModelForCausalLM` (importing `gsa.models` registers GSA with it), so a folder of ours and
any transformers causal LM folder take the same path. Tokenizers (and documents) come from `gsa.data`, the code
`gsa train` uses: a tokenizer has `encode(text)` (no special tokens added), `decode(ids)`, `bos_id` / `eos_id`
(None when absent) and `save(folder)`, which writes files `AutoTokenizer` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer
from ..models.checkpoint import check_model_folder

TOKENIZER_HINT = (
    "pass --tokenizer bytes for a byte-level model, --tokenizer mistral, a SentencePiece .model file or a "
    "tokenizer folder"
)


def model_tokenizer(model_dir: str | os.PathLike | None, spec=None):
    """The tokenizer named by `spec` (see `gsa.data.load_tokenizer`: "bytes", "mistral", a .model file or a
    folder; a transformers tokenizer object or one of ours is taken as it is), else the one saved in the model
    folder, which may be a Hugging Face tokenizer or a bare SentencePiece tokenizer.model (what `gsa train` saves
    for the Mistral tokenizer)."""
    if isinstance(spec, (ByteTokenizer, SentencePieceTokenizer, HFTokenizer)):
        return spec
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        from transformers import PreTrainedTokenizerBase

        if isinstance(spec, PreTrainedTokenizerBase):
            return HFTokenizer.from_loaded(spec)
        raise ValueError(f"expected a tokenizer name, path or tokenizer object, got {type(spec).__name__}")
    if spec is not None:
        return load_tokenizer(spec)
    if model_dir is None:
        raise ValueError(f"no tokenizer given and no model folder to find one in; {TOKENIZER_HINT}")
    check_model_folder(model_dir, config=False)  # a bare tokenizer folder is one too
    try:
        return load_tokenizer(model_dir)
    except ValueError as error:
        raise ValueError(f"no tokenizer in the model folder ({error}); {TOKENIZER_HINT}") from None


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None): CUDA when present, else CPU; otherwise the named device, which must exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 on CPU; or one of float32 / bfloat16 / float16 / float64."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {', '.join(names)}")
    return names[name]


def load_causal_lm(path: str | os.PathLike, device: str | None = "auto", dtype: str | None = "auto"):
    """A GSA model folder or any transformers causal LM folder, in eval mode on `device`."""
    import gsa.models  # noqa: F401  (registers GSA with the Auto classes)
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    target = resolve_device(device)
    # a GSA folder loads with our class by name: flash-linear-attention registers its own classes for the same
    # model_type ("gsa") with the Auto classes when it is imported, and the last registration wins there
    model_type = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    loader = gsa.models.GSAForCausalLM if model_type == gsa.models.GSAConfig.model_type else AutoModelForCausalLM
    model = loader.from_pretrained(path, dtype=resolve_dtype(dtype, target))
    return model.to(target).eval()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device

