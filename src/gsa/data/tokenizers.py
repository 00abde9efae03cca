"""Tokenizers behind one small interface: bytes, a SentencePiece model (the paper's Mistral tokenizer), or any
Hugging Face tokenizer folder.

Each has `name`, `vocab_size`, `bos_id` / `eos_id` / `pad_id` (None when absent), `encode_batch(texts)`,
`decode(ids)`, a `fingerprint` that changes whenever the ids of some text could change (the token cache is keyed by
it), and `save(folder)`, which writes files that `transformers.AutoTokenizer.from_pretrained(folder)` reads, so a
trained model folder carries its tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

# Byte vocabulary (260): four special tokens first, so bos = 1 and eos = 2 as GSAConfig's defaults and the Mistral
# tokenizer have them, then byte b as id b + BYTE_OFFSET. `gsa eval --tokenizer bytes` uses this class too.
BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_OFFSET = len(BYTE_SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256

MISTRAL_MODEL_FILE = "tokenizer.model.v1"


def _sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _byte_level_characters() -> list[str]:
    """The character byte-level pre-tokenisation shows for each byte 0..255 (the GPT-2 convention): printable
    Latin-1 bytes stand for themselves, every other byte takes the next code point from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    characters, next_free = [], 256
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(next_free))
            next_free += 1
    return characters


class ByteTokenizer:
    """UTF-8 bytes, one token each: <pad>=0, <s>=1, </s>=2, <unk>=3, byte b = b + 4."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = 0, 1, 2
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> None:
        """An equivalent Hugging Face fast tokenizer: byte-level pre-tokenisation (bytes shown as the printable
        characters of the GPT-2 convention) and a BPE model without merges, so each byte is one token."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
        vocab.update({char: byte + BYTE_OFFSET for byte, char in enumerate(_byte_level_characters())})
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
        pad, bos, eos, unk = BYTE_SPECIAL_TOKENS
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                     unk_token=unk, split_special_tokens=True)
        hf.save_pretrained(folder)


class SentencePieceTokenizer:
    """A SentencePiece model file, read with `sentencepiece` (no transformers needed: the GPU image has it)."""

    def __init__(self, model_file: str | os.PathLike, name: str | None = None):
        import sentencepiece

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise ValueError(f"SentencePiece model {self.model_file} does not exist")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{self.model_file} is not a SentencePiece model ({error})") from None
        self.name = name or self.model_file.stem
        self.vocab_size = self.processor.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self.processor.bos_id(), self.processor.eos_id(), self.processor.pad_id())
        )
        self.fingerprint = f"sentencepiece-{hashlib.sha256(self.model_file.read_bytes()).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.model alone: `load_tokenizer(folder)` reads it back with SentencePiece, and transformers reads
        it with `AutoTokenizer.from_pretrained(folder)` where protobuf is installed (it converts the model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.model_file, folder / "tokenizer.model")


class HFTokenizer:
    """Any tokenizer folder `transformers.AutoTokenizer` can load (tokenizer.json / tokenizer_config.json)."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and (p.suffix in (".json", ".model", ".txt")))
        self._adopt(AutoTokenizer.from_pretrained(str(self.folder)), self.folder.name, f"hf-{_sha256_of_files(files)}")

    @classmethod
    def from_loaded(cls, tokenizer, name: str | None = None) -> HFTokenizer:
        """A transformers tokenizer already in memory (loaded or built by the caller). Its fingerprint hashes the
        fast tokenizer's full serialisation, or a slow one's vocabulary and special tokens."""
        self = cls.__new__(cls)
        self.folder = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            content = backend.to_str()
        else:
            content = repr((sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map, type(tokenizer)))
        fingerprint = f"hf-{hashlib.sha256(content.encode()).hexdigest()[:16]}"
        self._adopt(tokenizer, name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, fingerprint)
        return self

    def _adopt(self, tokenizer, name: str, fingerprint: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.fingerprint = fingerprint

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(folder))


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def mistral_tokenizer_file() -> Path:
    """The Mistral-7B v0.1 SentencePiece model (32000 tokens, bos 1, eos 2) that the PyPI package `mistral-common`
    ships. Located without importing the package, which is installed without its dependencies."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "tokenizer 'mistral' needs the PyPI package mistral-common (pip install --no-deps mistral-common), "
            "or pass --tokenizer PATH/tokenizer.model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MISTRAL_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"mistral-common is installed but {path} is missing; pass --tokenizer PATH/tokenizer.model")
    return path


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """"bytes", "mistral", a SentencePiece .model file, or a folder: a Hugging Face tokenizer folder, or one
    holding a tokenizer.model and no tokenizer.json (read with SentencePiece)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "mistral":
        return SentencePieceTokenizer(mistral_tokenizer_file(), name="mistral")
    path = Path(spec)
    if path.is_file():
        return SentencePieceTokenizer(path)
    if path.is_dir():
        # a tokenizer.json is the complete fast tokenizer; a bare tokenizer.model is read with SentencePiece, which
        # needs neither transformers nor protobuf
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model", name=path.name)
        if (path / "tokenizer_config.json").is_file():
            return HFTokenizer(path)
        raise ValueError(
            f"tokenizer folder {path} has none of tokenizer.json, tokenizer.model, tokenizer_config.json"
        )
    raise ValueError(
        f"unknown tokenizer {str(spec)!r}: expected 'bytes', 'mistral', a SentencePiece .model file or a "
        "tokenizer folder"
    )
