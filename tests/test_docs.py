"""Run every ``python`` code block of the user docs, in order, one namespace per page.

Pages whose examples are checked by their own tests (stats, plugins, gandissect)
are left to those tests. store.md's recipe records 1,000 ResNet-18 samples and
seeing.md's names a generator and data of your own: tests/test_store.py,
tests/test_scale.py and tests/seeing/ run the same calls at test size.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["tracing.md", "rewriting.md", "dissect.md", "scenes.md"]


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks((DOCS / page).read_text())
    assert blocks, f"docs/{page} has no python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page}"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"docs/{page} python block {number} failed: {exc!r}\n{block}")
