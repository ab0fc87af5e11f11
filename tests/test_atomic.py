"""nethook.atomic: a file or directory is either the old complete one, the new one, or absent."""

from __future__ import annotations

import os

import pytest

from nethook.atomic import atomic_dir, atomic_path, write_text


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_path_publishes_on_success(tmp_path, fsync: bool) -> None:
    target = tmp_path / "sub" / "result.bin"
    with atomic_path(target, suffix=".bin", fsync=fsync) as tmp:
        assert tmp.suffix == ".bin" and tmp.parent == target.parent
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_keeps_old_file_on_error(tmp_path) -> None:
    target = write_text(tmp_path / "result.txt", "old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("mid-write")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_dir_replaces_a_directory_whole(tmp_path) -> None:
    target = tmp_path / "group.zarr"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("2")
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_old_directory_on_error(tmp_path) -> None:
    target = tmp_path / "group.zarr"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("half")
            raise KeyboardInterrupt
    assert [p.read_text() for p in target.iterdir()] == ["1"]
    assert leftovers(tmp_path) == []
