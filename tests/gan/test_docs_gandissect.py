"""Run every ``python`` code block of docs/gandissect.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "gandissect.md"


def test_doc_examples_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "docs_gandissect"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"docs/gandissect.md python block {number} failed: {exc!r}\n{block}")
    assert set(namespace["search"].top(3)) == {2, 5, 7}
    assert namespace["effect"].removed == pytest.approx(1.0)
