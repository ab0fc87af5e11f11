"""Run every ``python`` code block of docs/tracing.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "tracing.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_doc_has_examples():
    assert len(python_blocks(DOC.read_text())) >= 10


def test_doc_examples_run(capsys):
    namespace: dict = {"__name__": "docs_tracing"}
    for number, block in enumerate(python_blocks(DOC.read_text()), start=1):
        try:
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"docs/tracing.md python block {number} failed: {exc!r}\n{block}")
