"""The ``nethook`` command line: bad input gets a one-line error, bugs keep their traceback."""

from __future__ import annotations

import pytest

from nethook.cli import main

MODEL = "nethook.demo.scene_cnn:scene_cnn"
SOURCE = "scenes:n=4,size=64,progress=false"


def dissect_argv(tmp_path) -> list[str]:
    return ["dissect", "--model", MODEL, "--source", SOURCE, "--out", str(tmp_path), "--quiet"]


def test_wrong_layer_name_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NETHOOK_TRACEBACK", raising=False)
    code = main([*dissect_argv(tmp_path), "--layers", "blok4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nethook dissect: error: ")
    assert "'blok4'" in err and "closest: 'block4'" in err
    assert "Traceback" not in err


def test_bad_option_value_names_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NETHOOK_TRACEBACK", raising=False)
    code = main([*dissect_argv(tmp_path), "--layers", "block4", "--quantile", "0.7"])
    assert code == 2
    assert "quantile must be a top share in (0, 0.5), got 0.7" in capsys.readouterr().err


def test_parallel_option_reaches_dissect(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NETHOOK_TRACEBACK", raising=False)
    argv = [*dissect_argv(tmp_path), "--layers", "block4", "--no-report", "--batch-size", "2"]
    assert main([*argv, "--parallel", "0"]) == 2
    assert "parallel must be a count of processes >= 1" in capsys.readouterr().err
    assert main([*argv, "--parallel", "2"]) == 0
    assert (tmp_path / "checkpoints" / "pass1.0of2.npz").is_file()


def test_traceback_on_request(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NETHOOK_TRACEBACK", "1")
    from nethook.layers import LayerNotFoundError

    with pytest.raises(LayerNotFoundError, match="blok4"):
        main([*dissect_argv(tmp_path), "--layers", "blok4"])


def test_bugs_keep_their_traceback(monkeypatch) -> None:
    import argparse

    def broken(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug, not bad input")

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=broken)
    monkeypatch.setattr("nethook.cli.build_parser", lambda: parser)
    with pytest.raises(ZeroDivisionError):
        main(["boom"])
