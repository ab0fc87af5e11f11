"""Reports of nethook results: PNG figures and a static, offline HTML page.

``write_report(results, out)`` takes the per-layer dissection datasets of
:mod:`nethook.dissect` and writes ``index.html``, ``summary.json`` and ``img/*.png``.
"""

from nethook.report.html import write_report

__all__ = ["write_report"]
