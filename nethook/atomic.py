"""Write files so that each is either complete or absent: write beside it, then rename.

Every writer in nethook goes through :func:`atomic_path`: a crash or an exception
mid-write leaves no partial file under the final name, and finished files get the
usual permissions (0666 less the umask; ``mkstemp`` alone would leave them 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = ".tmp", fsync: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place.

    Write the file at the yielded path (any library: ``savefig``, ``torch.save``,
    ``np.savez`` ...); ``suffix`` keeps the extension such writers look at. On an
    exception the temporary file is removed and ``path`` is untouched. ``fsync``
    flushes the finished file to disk before the rename, for files that a resumed
    run must be able to trust after a power loss (checkpoints, saved stats).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            fsync_file(tmp)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success swap it into place.

    For results that are directories (Zarr groups). A reader sees the old complete
    directory, the new one, or (for an instant between two renames, when replacing)
    nothing; never a half-written one. On an exception the temporary directory is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a finished file's data to disk (opened read-only, so any file will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file the usual permissions and rename it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
