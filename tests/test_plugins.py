"""The plugin host: discovery through entry points, registry by name, conflicts, breakage.

Plugins here are real distributions written to a temporary site directory (a
``*.dist-info`` with METADATA and entry_points.txt next to their modules), found
with ``importlib.metadata`` exactly as installed ones are.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nethook import hookspec
from nethook.plugins import (
    KINDS,
    NethookPluginManager,
    PluginConflictError,
    UnknownNameError,
    get_plugin_manager,
    get_source,
    parse_kwargs,
    split_spec,
)

REPO = Path(__file__).resolve().parents[1]


def make_dist(site: Path, dist: str, version: str, entry_points: dict, modules: dict) -> None:
    """Write an installed distribution ``dist`` into ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[nethook]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


def entry_points_in(site: Path) -> list[importlib.metadata.EntryPoint]:
    """The ``nethook`` entry points of the distributions in ``site``, by distribution name."""
    dists = sorted(importlib.metadata.distributions(path=[str(site)]), key=lambda d: d.name)
    return [ep for d in dists for ep in d.entry_points if ep.group == "nethook"]


SOURCE_PLUGIN = """
    from nethook.plugins import hookimpl, parse_kwargs

    class Constant:
        def __init__(self, value=0, n=1):
            self.value, self.n = value, n

    @hookimpl
    def nethook_concept_sources():
        return {"{name}": lambda arg: Constant(**parse_kwargs(arg)), "shared": Constant}

    @hookimpl
    def nethook_interventions():
        return {"{name}-zero": lambda arg: (lambda output, layer=None: output * 0)}

    @hookimpl
    def nethook_add_commands(subparsers):
        p = subparsers.add_parser("{name}-hello")
        p.add_argument("--who", default="world")
        p.set_defaults(func=lambda args: print("hello", args.who, "from {name}") or 0)

    @hookimpl
    def nethook_report_sections(report, results):
        return [("{name}", f"<p>{report}: {sorted(results)}</p>")]
"""


def source_plugin(name: str) -> str:
    return SOURCE_PLUGIN.replace("{name}", name)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A site directory on sys.path with three plugins: alpha and beta (which both
    claim the source name "shared"), and broken (fails to import)."""
    site = tmp_path / "site"
    tag = tmp_path.name.replace("-", "_")  # unique module names per test
    make_dist(
        site,
        "alpha-plugin",
        "1.0",
        {"alpha": f"alpha_{tag}"},
        {f"alpha_{tag}": source_plugin("alpha")},
    )
    make_dist(
        site, "beta-plugin", "2.5", {"beta": f"beta_{tag}"}, {f"beta_{tag}": source_plugin("beta")}
    )
    make_dist(
        site,
        "broken-plugin",
        "0.3",
        {"broken": f"broken_{tag}"},
        {
            f"broken_{tag}": "import json\nraise ImportError('needs a library that is not installed')\n"
        },
    )
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def manager(site) -> NethookPluginManager:
    manager = NethookPluginManager()
    manager.load_entry_points(entry_points_in(site))
    return manager


def test_entry_points_register_plugins_with_distribution_and_location(manager, site):
    alpha = manager.infos["alpha"]
    assert alpha.ok
    assert (alpha.distribution, alpha.version) == ("alpha-plugin", "1.0")
    assert Path(alpha.location).parent == site
    manager.collect_all()
    assert alpha.provides == {"source": ("alpha", "shared"), "intervention": ("alpha-zero",)}
    assert alpha.kinds == ("source", "intervention", "commands", "report")
    assert manager.names("source") == ["alpha", "beta", "shared"]


def test_spec_argument_reaches_the_factory(manager):
    built = manager.build("source", "alpha:value=2.5,n=3")
    assert (built.value, built.n) == (2.5, 3)
    assert manager.build("source", "beta").value == 0
    zero = manager.build("intervention", "beta-zero:")
    assert zero(7) == 0
    not_a_spec = object()
    assert manager.build("source", not_a_spec) is not_a_spec


def test_two_plugins_claiming_one_name_is_an_error_naming_both_distributions(manager):
    with pytest.raises(PluginConflictError) as info:
        manager.build("source", "shared")
    assert "alpha-plugin 1.0" in str(info.value) and "beta-plugin 2.5" in str(info.value)
    assert [(kind, name) for kind, name, _ in manager.conflicts()] == [("source", "shared")]


def test_broken_plugin_is_recorded_with_its_traceback_and_breaks_nothing_else(manager):
    broken = manager.infos["broken"]
    assert not broken.ok
    assert "ImportError: needs a library that is not installed" in broken.errors[0]
    assert "broken_" in broken.errors[0] and "line 2" in broken.errors[0]  # the plugin's frame
    assert broken.distribution == "broken-plugin"
    assert manager.build("source", "alpha").n == 1


def test_unknown_name_lists_installed_ones_and_broken_plugins(manager):
    with pytest.raises(UnknownNameError) as info:
        manager.build("source", "gamma:n=1")
    message = str(info.value)
    assert "no source named 'gamma'" in message
    assert "alpha, beta, shared" in message
    assert "broken (ImportError: needs a library" in message


def test_plugin_commands_are_added_and_a_raising_hook_is_contained(site):
    make_dist(
        site,
        "rude-plugin",
        "1.0",
        {"rude": "rude_commands"},
        {
            "rude_commands": """
            from nethook.plugins import hookimpl

            @hookimpl
            def nethook_add_commands(subparsers):
                raise RuntimeError("cannot add my command")
        """
        },
    )
    manager = NethookPluginManager()
    manager.load_entry_points(entry_points_in(site))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    manager.add_commands(sub)
    args = parser.parse_args(["alpha-hello", "--who", "you"])
    assert args.func(args) == 0
    assert "RuntimeError: cannot add my command" in manager.infos["rude"].errors[0]


def test_report_sections_come_from_every_plugin(manager):
    sections = manager.report_sections("dissect", {"iou": 1})
    assert sections == [("alpha", "<p>dissect: ['iou']</p>"), ("beta", "<p>dissect: ['iou']</p>")]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (
            "@hookimpl\ndef nethook_concept_source():\n    return {}\n",
            "unknown hook(s) nethook_concept_source",
        ),
        (
            "@hookimpl\ndef nethook_segmenters():\n    return ['colors']\n",
            "returned list; expected a dict",
        ),
        (
            "@hookimpl\ndef nethook_segmenters():\n    return {'a:b': print}\n",
            "must be a non-empty string without ':'",
        ),
        ("@hookimpl\ndef nethook_segmenters():\n    return {'x': 3}\n", "factory for 'x' is int"),
        ("@hookimpl\ndef nethook_segmenters():\n    raise KeyError('oops')\n", "KeyError: 'oops'"),
        ("@hookimpl\ndef nethook_add_commands(parser):\n    pass\n", "parser"),
    ],
)
def test_a_misbehaving_plugin_is_recorded_not_raised(tmp_path, monkeypatch, body, complaint):
    module = f"odd_{tmp_path.name.replace('-', '_')}"
    make_dist(
        tmp_path,
        "odd-plugin",
        "1.0",
        {"odd": module},
        {module: "from nethook.plugins import hookimpl\n" + body},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = NethookPluginManager()
    manager.load_entry_points(entry_points_in(tmp_path))
    manager.collect_all()
    errors = "\n".join(manager.infos["odd"].errors)
    assert complaint in errors
    assert manager.names("segmenter") == []


def test_same_plugin_name_from_two_distributions_is_reported_with_both(tmp_path, monkeypatch):
    make_dist(tmp_path, "one-dist", "1.0", {"twin": "twin_one"}, {"twin_one": source_plugin("one")})
    make_dist(tmp_path, "two-dist", "2.0", {"twin": "twin_two"}, {"twin_two": source_plugin("two")})
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = NethookPluginManager()
    manager.load_entry_points(entry_points_in(tmp_path))
    problems = [e for info in manager.infos.values() for e in info.errors]
    assert len(problems) == 1
    assert "one-dist 1.0" in problems[0] and "two-dist 2.0" in problems[0]


def test_first_party_plugins_load_through_the_installed_entry_points():
    manager = get_plugin_manager()
    broden = manager.infos["broden"]
    assert broden.ok, broden.errors
    assert broden.distribution == "nethook"
    assert Path(broden.location) == REPO / "plugins" / "broden.py"
    assert {"broden", "scenes", "colors", "segmenter"} <= set(manager.infos)


def test_unknown_source_name_in_the_shared_registry_lists_installed_ones():
    with pytest.raises(UnknownNameError, match=r"no source named 'nosuch'.*broden"):
        get_source("nosuch:/data")


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("", {}),
        ("a=1,b=x", {"a": 1, "b": "x"}),
        ("n=2000, size=128 ,seed=0", {"n": 2000, "size": 128, "seed": 0}),
        (
            "p=0.5,flag=true,off=False,none=none,q='1'",
            {"p": 0.5, "flag": True, "off": False, "none": None, "q": "1"},
        ),
        ("path=/data/broden1_224", {"path": "/data/broden1_224"}),
        ("units=[3, 7],name='a,b',k=(1,2)", {"units": [3, 7], "name": "a,b", "k": (1, 2)}),
    ],
)
def test_parse_kwargs(arg, expected):
    assert parse_kwargs(arg) == expected


def test_parse_kwargs_positional_and_errors():
    assert parse_kwargs("/d/b,split=val", positional=("path",)) == {"path": "/d/b", "split": "val"}
    assert parse_kwargs("1,2", positional=("x", "y")) == {"x": "1", "y": "2"}
    with pytest.raises(ValueError, match=r"item 2 \('x'\) is not key=value"):
        parse_kwargs("a=1,x")
    with pytest.raises(ValueError, match="'a' is given twice"):
        parse_kwargs("a=1,a=2")
    with pytest.raises(ValueError, match="not a valid argument name"):
        parse_kwargs("a b=1")
    with pytest.raises(ValueError, match="expected path first"):
        parse_kwargs("split=val,/d/b", positional=("path",))


def test_split_spec():
    assert split_spec("broden:/data/x:y,split=train") == ("broden", "/data/x:y,split=train")
    assert split_spec("colors") == ("colors", "")
    with pytest.raises(ValueError, match="expected 'name' or 'name:arguments'"):
        split_spec(":x")


def test_every_hook_is_documented_and_every_kind_has_one():
    hooks = {
        name: f
        for name, f in inspect.getmembers(hookspec, inspect.isfunction)
        if name.startswith("nethook_")
    }
    assert set(KINDS.values()) <= set(hooks)
    assert {"nethook_add_commands", "nethook_report_sections"} <= set(hooks)
    for name, function in hooks.items():
        assert len(inspect.getdoc(function) or "") > 80, name


SEPARATOR = "=" * 20 + " next command " + "=" * 20

CLI_SCRIPT = f"""
import sys
from nethook.cli import main
for argv in sys.argv[1:]:
    print(main(argv.split()), flush=True)
    print({SEPARATOR!r}, flush=True)
"""


def run_cli(commands: list[str], site: Path) -> list[tuple[int, str]]:
    """(exit code, stdout) of ``nethook <command>`` for each command, run in order by one
    fresh interpreter (the ``nethook`` script's ``main``) with ``site`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, *commands],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = result.stdout.split(SEPARATOR + "\n")[: len(commands)]
    return [(int(out.rstrip().rsplit("\n", 1)[-1]), out) for out in outputs]


def test_cli_lists_plugins_shows_broken_and_conflicts_and_still_runs_commands(site):
    (check, out), (hello, greeting) = run_cli(["plugins --check", "beta-hello --who tests"], site)
    assert check == 1  # --check: something is wrong
    assert "alpha  [ok]" in out and "alpha-plugin 1.0" in out
    assert "broken  [BROKEN]" in out and "ImportError: needs a library that is not installed" in out
    assert "source 'shared' claimed by alpha-plugin 1.0 (plugin 'alpha'), beta-plugin 2.5" in out
    assert hello == 0
    assert greeting.startswith("hello tests from beta\n")
