"""``nethook layers SPEC``: paths, types, parameter counts and output shapes from one dry run."""

from __future__ import annotations

import json
import textwrap

import pytest

from nethook.cli import main

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Thrice(nn.Module):
        def __init__(self):
            super().__init__()
            self.step = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2, bias=False)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(3):
                x = self.step(x)
            return self.head(x), None


    def thrice():
        return Thrice()
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def table(text: str) -> dict[str, list[str]]:
    """Rows of the printed table keyed by path, split on runs of two spaces."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = cells[1:]
    return rows


def test_resnet18_table(capsys):
    assert main(["layers", "torchvision:resnet18", "--input-shape", "1,3,64,64"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["(model)"] == ["ResNet", "11,689,512", "[1, 1000]"]
    assert rows["conv1"] == ["Conv2d", f"{64 * 3 * 7 * 7:,}", "[1, 64, 32, 32]"]
    assert rows["layer4"][2] == "[1, 512, 2, 2]"
    assert rows["layer3.0.downsample.0"][:2] == ["Conv2d", f"{128 * 256:,}"]
    assert rows["layer1.0.relu"][2:] == ["[1, 64, 16, 16]", "(2 calls)"]
    assert len(rows) == 68


def test_file_spec_with_shared_and_unused_modules(model_file, capsys):
    assert main(["layers", f"{model_file}:thrice", "--input-shape", "5,4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layers = {row["path"]: row for row in data["layers"]}
    assert layers["step"]["calls"] == 3 and layers["step"]["output"] == "[5, 4]"
    assert layers["step"]["params"] == 4 * 4 + 4
    assert layers["head"]["params"] == 8
    assert layers["unused"]["calls"] == 0 and layers["unused"]["output"] is None
    assert layers[""]["output"] == "tuple([5, 2], None)"


def test_weights_option(tmp_path, model_file, capsys):
    import torch

    from nethook.models import load_model

    torch.save(load_model(f"{model_file}:thrice").state_dict(), tmp_path / "w.pt")
    args = ["layers", f"{model_file}:thrice", "--input-shape", "1,4", "--weights"]
    assert main([*args, str(tmp_path / "w.pt")]) == 0
    capsys.readouterr()
    assert main([*args, str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_pretrained_spec_without_file_explains(capsys):
    assert main(["layers", "torchvision:resnet18:IMAGENET1K_V1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nethook layers: ") and "--weights" in err


def test_failed_dry_run_shows_what_ran_and_how_to_fix(model_file, capsys):
    assert main(["layers", f"{model_file}:thrice", "--input-shape", "2,7"]) == 1
    captured = capsys.readouterr()
    assert "--input-shape" in captured.err and "[2, 7]" in captured.err
    assert table(captured.out)["step"] == ["Linear", "20", "-"]


def test_bad_shape_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["layers", "torchvision:resnet18", "--input-shape", "1,three"])
    assert info.value.code == 2
    assert "comma-separated positive integers" in capsys.readouterr().err
