"""The gandissect, ace and intervene commands, driven through argparse on the demo models."""

from __future__ import annotations

import argparse
import json

import pytest
from gan_planted import scenes_seg

from nethook.commands import ace, gandissect, intervene


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nethook")
    sub = parser.add_subparsers()
    for module in (gandissect, ace, intervene):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module", autouse=True)
def registered():
    scenes_seg()


def test_gandissect_writes_results_and_report(tmp_path, capsys):
    code = run(
        ["gandissect", "--layer", "layer2", "--samples", "20", "--batch-size", "10",
         "--concepts", "sky,grass,tree", "--gallery", "2", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    units = results["layers"]["layer2"]["units"]
    assert len(units) == 64
    assert {"unit", "label", "category", "iou", "threshold"} <= set(units[0])
    assert {u["label"] for u in units} <= {"sky", "grass", "tree"}
    assert (tmp_path / "index.html").is_file()
    assert "layer2" in capsys.readouterr().out


def test_unknown_concept_is_a_clear_error(tmp_path, capsys):
    code = run(["ace", "--layer", "layer2", "--concept", "tre", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown concept 'tre'" in err and "tree" in err


def test_layer_that_is_not_a_feature_map(tmp_path, capsys):
    code = run(
        ["gandissect", "--layer", "layer2.conv.weight", "--samples", "4", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "layer2.conv.weight" in capsys.readouterr().err


@pytest.mark.slow
def test_ace_and_intervene(tmp_path, capsys):
    out = tmp_path / "ace"
    code = run(
        ["ace", "--layer", "layer2", "--concept", "sky", "--units", "4", "--epochs", "1",
         "--steps", "1", "--batch-size", "4", "--samples", "8", "--no-context",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    data = json.loads((out / "ace.json").read_text())
    assert len(data["top"]) == 4 and sorted(data["ranking"]) == list(range(64))
    assert (out / "ablation_curve.png").is_file()
    code = run(
        ["intervene", "--layer", "layer2", "--ablate", "sky:4", "--ranking", str(out / "ace.json"),
         "--insert", "sky:4", "--at", "1,2", "--samples", "3", "--out", str(tmp_path / "img")]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "img" / "ablate_sky_4.png").is_file()
    assert (tmp_path / "img" / "insert_sky_4.png").is_file()
    assert "causal search" in capsys.readouterr().out
    assert run(["intervene", "--layer", "layer2", "--ablate", "sky", "--out", str(tmp_path)]) == 2
