"""The HTML report: files written, labels escaped, and the page renders in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from nethook.dissect import label_units, load_results, results_json, save_results
from nethook.report import write_report
from nethook.report.plots import overlay

EVIL = '<script>alert("x")</script>&amp'


def fake_layer(name: str, units: int, seed: int, gallery: bool = True) -> xr.Dataset:
    """A dissection dataset with known IoUs: unit u's best concept is u % concepts."""
    rng = np.random.default_rng(seed)
    names = ["tree", "wheel", EVIL, "red", "brick"]
    cats = ["object", "part", "object", "color", "material"]
    iou = rng.uniform(0, 0.02, size=(units, len(names))).astype(np.float32)
    for u in range(units):
        iou[u, u % len(names)] = 0.05 + 0.01 * u
    da = xr.DataArray(
        iou,
        dims=("unit", "concept"),
        coords={
            "unit": np.arange(units),
            "concept": np.arange(1, len(names) + 1),
            "concept_name": ("concept", names),
            "concept_category": ("concept", cats),
        },
    )
    ds = label_units(da, min_iou=0.04)
    ds["iou"] = da
    ds["threshold"] = ("unit", rng.uniform(0.5, 2, units).astype(np.float32))
    ds["top_index"] = (("unit", "rank"), rng.integers(0, 100, (units, 3)))
    if gallery:
        ds["top_image"] = (
            ("unit", "rank", "y", "x", "rgb"),
            rng.integers(0, 255, (units, 3, 16, 16, 3), dtype=np.uint8),
        )
        ds["top_mask"] = (("unit", "rank", "y", "x"), rng.uniform(size=(units, 3, 16, 16)) > 0.7)
    ds.attrs = {"layer": name, "quantile": 0.005, "min_iou": 0.04, "model": EVIL}
    return ds


@pytest.fixture
def results() -> dict[str, xr.Dataset]:
    return {"features.0": fake_layer("features.0", 4, 0), EVIL: fake_layer(EVIL, 7, 1)}


def test_label_units_picks_argmax_and_threshold() -> None:
    ds = fake_layer("l", 6, 3)
    assert list(ds["label_id"].values) == [1, 2, 3, 4, 5, 1]
    assert ds["detector"].all()
    doc = results_json({"l": ds})
    assert doc["layers"]["l"]["units"][2]["label"] == EVIL
    assert doc["layers"]["l"]["units"][5]["iou"] == pytest.approx(0.1)
    # units 0 and 5 share "tree": 4 unique concepts, two of category object.
    assert doc["layers"]["l"]["unique_detectors"] == {
        "object": 2,
        "part": 1,
        "color": 1,
        "material": 1,
    }


def test_save_and_load_round_trip(tmp_path: Path, results) -> None:
    save_results(results, tmp_path)
    back = load_results(tmp_path)
    assert list(back) == list(results)
    for layer in results:
        np.testing.assert_array_equal(back[layer]["iou"].values, results[layer]["iou"].values)
        assert list(back[layer]["label"].values) == list(results[layer]["label"].values)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["layers"]) == set(results)
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 11


def test_overlay_outlines_mask() -> None:
    img = np.full((6, 6, 3), 200, np.uint8)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    out = overlay(img, mask)
    assert (out[0, 0] == 70).all()  # outside: dimmed
    assert (out[2, 2] == 200).all()  # inside: untouched
    assert (out[1, 1] == [255, 214, 0]).all()  # boundary: outlined


def test_report_escapes_and_links(tmp_path: Path, results) -> None:
    index = write_report(results, tmp_path, progress=False)
    html = index.read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;amp" in html
    assert html.count("<script>") == 1  # only the table sorter
    assert "http://" not in html and "https://" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2 + 11 + 1  # per-layer charts, unit strips, by-layer plot
    for src in srcs:
        assert (tmp_path / src).is_file(), src
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["units"] for row in summary["summary"]] == [4, 7]


# -- headless Chromium over the DevTools pipe ------------------------------------------


class Browser:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str, profile: str) -> None:
        self._to_r, self._to_w = os.pipe()
        self._from_r, self._from_w = os.pipe()
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--allow-file-access-from-files",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        def fds() -> None:
            os.dup2(self._to_r, 3)
            os.dup2(self._from_w, 4)

        self.proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(self._to_r)
        os.close(self._from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_r, 65536)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)


def browser_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among DevTools events."""
    errors = []
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')}")
    return errors


def open_page(url: str, script: str) -> tuple[object, list[str]]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        b = Browser(exe, profile)
        try:
            targets = b.send("Target.getTargets")["targetInfos"]
            pages = [t for t in targets if t["type"] == "page"]
            target = (
                pages[0]["targetId"]
                if pages
                else b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            )
            session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                b.send(f"{domain}.enable", session=session)
            b.send("Page.navigate", {"url": url}, session=session)
            b.wait_event("Page.loadEventFired")
            value = b.send(
                "Runtime.evaluate",
                {"expression": script, "returnByValue": True, "awaitPromise": True},
                session=session,
            )["result"].get("value")
            return value, browser_errors(b.events)
        finally:
            b.close()


CHECK = """
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const table = document.getElementById('units-table');
  const iouHead = table.tHead.rows[0].cells[4];
  iouHead.click();
  const asc = Array.from(table.tBodies[0].rows).map(r => parseFloat(r.cells[4].dataset.sort));
  iouHead.click();
  const desc = Array.from(table.tBodies[0].rows).map(r => parseFloat(r.cells[4].dataset.sort));
  return {
    images: imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
    asc: asc, desc: desc,
    title: document.title,
    evil: Array.from(document.querySelectorAll('b')).map(b => b.textContent),
  };
})()
"""


def test_report_renders_in_chromium(tmp_path: Path, results) -> None:
    rotation = pd.DataFrame(
        {"layer": ["a", "a", EVIL, EVIL], "alpha": [0, 1, 0, 1], "unique": [5, 2, 4, 1]}
    )
    index = write_report(results, tmp_path, rotation=rotation, progress=False)
    value, errors = open_page(index.resolve().as_uri(), CHECK)
    assert errors == []
    assert len(value["images"]) == 15
    assert (tmp_path / "img" / "rotation.png").is_file()
    broken = [src for src, complete, width in value["images"] if not complete or width <= 0]
    assert broken == []
    assert value["asc"] == sorted(value["asc"]) and len(value["asc"]) == 11
    assert value["desc"] == sorted(value["desc"], reverse=True)
    assert EVIL in value["evil"]  # shown as text, not run as markup


def test_browser_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The harness itself can fail: a missing image and a script error are reported."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>undefinedFunction();</script></body></html>'
    )
    script = "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
    value, errors = open_page(page.as_uri(), script)
    assert value == [["missing.png", 0]]
    assert any("undefinedFunction" in e for e in errors), errors
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)
