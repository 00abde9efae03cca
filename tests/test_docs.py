"""The Python examples of the README and the docs run as written (on the CPU), so they cannot rot unnoticed.

Examples that need what only an earlier command or another machine makes (a trained run folder, a Llama
checkpoint) are listed in SKIPPED with the reason; every other ```python block is run, the blocks of one page in
order in one namespace (later blocks continue earlier ones, as a reader would run them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SKIPPED = {  # page -> why its examples are not run here
    "docs/evaluation.md": "reads runs/tiny-gsa/model, made by the page's earlier `gsa train` command",
    "docs/t2r.md": "converts a Llama checkpoint folder the reader supplies",
}
# What a test may shorten without changing what the example calls: (page, text, replacement)
SHORTENED = [("docs/training.md", '"steps": 100', '"steps": 3')]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_page_with_python_examples_is_run_or_skipped_for_a_reason():
    with_examples = {page for page in PAGES if python_blocks(page)}
    assert {"README.md", "docs/model.md", "docs/operator.md", "docs/training.md"} <= with_examples
    assert set(SKIPPED) <= with_examples, "a skipped page has no examples left: drop it from SKIPPED"


@pytest.mark.parametrize("page", [p for p in PAGES if p not in SKIPPED])
def test_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page} has no Python examples")
    code = "\n".join(blocks)
    for where, text, replacement in SHORTENED:
        if where == page:
            assert text in code, f"{page} no longer has {text!r}: update SHORTENED"
            code = code.replace(text, replacement)
    monkeypatch.chdir(tmp_path)  # examples that save (a model folder, a run) write here
    exec(compile(code, str(ROOT / page), "exec"), {"__name__": "__docs__"})
