"""The example third-party plugin, pip-installed into a temporary site directory.

It is installed the way a user installs any plugin (``pip install``, here with
``--target`` so the venv stays untouched) and then found only through its entry
point: by ``nethook plugins`` and its own subcommand in a fresh interpreter, and by
a plugin manager in this one. docs/plugins.md must show its files verbatim.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nethook.plugins import NethookPluginManager

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "nethook-example-plugin"
DOCS = REPO / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin installed with pip into a fresh directory (from a copy, so
    the build leaves nothing behind in the repository)."""
    tmp = tmp_path_factory.mktemp("example")
    copy = shutil.copytree(
        EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = tmp / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return target


@pytest.fixture
def manager(site, monkeypatch) -> NethookPluginManager:
    """A plugin manager that loaded only the installed example's entry points."""
    monkeypatch.syspath_prepend(str(site))
    (dist,) = importlib.metadata.distributions(path=[str(site)])
    manager = NethookPluginManager()
    manager.load_entry_points(ep for ep in dist.entry_points if ep.group == "nethook")
    return manager


SEPARATOR = "=" * 20 + " next command " + "=" * 20

CLI_SCRIPT = f"""
import sys
from nethook.cli import main
codes = []
for argv in sys.argv[1:]:
    codes.append(main(argv.split()))
    print({SEPARATOR!r}, flush=True)
sys.exit(max(codes))
"""


@pytest.fixture(scope="module")
def cli(site) -> dict[str, str]:
    """stdout of ``nethook <command>`` for each command, all run by one fresh interpreter
    (the ``nethook`` script's ``main``) that sees the plugin only through PYTHONPATH."""
    commands = ["plugins --json", "stripes --n 6 --size 16 --seed 3"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, *commands],
        capture_output=True,
        text=True,
        env=env,
        cwd=site,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = result.stdout.split(SEPARATOR + "\n")
    return dict(zip(commands, outputs, strict=False))


def orientation_from_pixels(image: torch.Tensor) -> str:
    """'horizontal' when every row is constant, 'vertical' when every column is."""
    gray = image[0]
    if (gray == gray[:, :1]).all():
        return "horizontal"
    assert (gray == gray[:1, :]).all()
    return "vertical"


def test_nethook_plugins_lists_the_installed_example(site, cli):
    listing = json.loads(cli["plugins --json"])
    (example,) = [p for p in listing["plugins"] if p["name"] == "example"]
    assert example["ok"], example["errors"]
    assert (example["distribution"], example["version"]) == ("nethook-example-plugin", "0.1.0")
    assert Path(example["location"]) == site / "nethook_example" / "plugin.py"
    assert example["provides"] == {"source": ["stripes"], "intervention": ["clamp"]}
    assert "commands" in example["kinds"]
    assert {"broden", "scenes", "colors", "segmenter"} <= {p["name"] for p in listing["plugins"]}


def test_example_subcommand_runs_and_counts_orientations(cli, manager):
    out = cli["stripes --n 6 --size 16 --seed 3"]
    frequency = {
        m["name"]: float(m["freq"])
        for m in re.finditer(r"^\s*\d+\s+(?P<name>\w+)\s+\w+\s+(?P<freq>[\d.]+)\s*$", out, re.M)
    }
    source = manager.build("source", "stripes:n=6,size=16,seed=3")
    seen = [orientation_from_pixels(source[i]["image"]) for i in range(6)]
    assert frequency == {
        "light": 6,
        "dark": 6,
        "horizontal": seen.count("horizontal"),
        "vertical": seen.count("vertical"),
    }


def test_example_source_labels_match_its_pixels(manager):
    source = manager.build("source", "stripes:n=8,size=12,period=4,seed=1")
    orientation_ids = {"horizontal": 3, "vertical": 4}
    for i in range(len(source)):
        item = source[i]
        dark = item["labels"]["color"][0] == 2
        assert ((item["labels"]["color"][0] == 1) == ~dark).all()
        assert torch.allclose(item["image"][:, dark], torch.tensor(0.1))
        assert torch.allclose(item["image"][:, ~dark], torch.tensor(0.9))
        want = orientation_ids[orientation_from_pixels(item["image"])]
        assert item["image_labels"]["orientation"].tolist() == [want]
    assert (
        source.fingerprint()
        == manager.build("source", "stripes:n=8,size=12,period=4,seed=1").fingerprint()
    )
    with pytest.raises(ValueError, match="period=1; expected an integer >= 2"):
        manager.build("source", "stripes:period=1")


def test_example_intervention_clamps_selected_units(manager):
    from nethook.interventions import from_json

    clamp = manager.build("intervention", "clamp:high=0,units=[1]")
    x = torch.arange(-4.0, 4.0).reshape(1, 2, 2, 2)
    y = clamp(x, "layer")
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.equal(y[:, 1], torch.zeros(1, 2, 2))
    assert torch.equal(from_json(clamp.to_json())(x), y)


def test_docs_show_the_example_files_verbatim():
    text = DOCS.read_text()
    shown = dict(re.findall(r"File `([^`]+)`:\n\n```\w*\n(.*?)\n```\n", text, re.S))
    files = sorted(
        str(p.relative_to(REPO))
        for p in EXAMPLE.rglob("*")
        if p.is_file() and p.suffix in (".py", ".toml") and "build" not in p.parts
    )
    assert sorted(shown) == files
    for path, body in shown.items():
        assert body == (REPO / path).read_text().rstrip("\n"), (
            f"docs/plugins.md is stale for {path}"
        )
