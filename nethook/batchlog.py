"""Ragged per-batch records on disk: one file per batch, each complete or absent.

The :class:`~nethook.store.ActivationStore` holds dense, fixed-shape activations in
Zarr. Some passes keep something smaller whose size varies from batch to batch (the
few activations above a running floor, the indices of hot cells), which a fixed-shape
array cannot hold. A :class:`BatchLog` is the resumable home for those: batch ``b``
is the file ``b.safetensors`` (plain arrays behind a JSON header: no pickle, no
zip or checksum to compute, read back in one go), written atomically; a log is
tied to a content key, so a rerun with other inputs never reads a stale log; and
the batches a rerun must still write start at the first one missing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from nethook.atomic import atomic_path, write_text

_META = "log.json"
_SUFFIX = ".safetensors"


class BatchLog:
    """A directory of per-batch records ``{name: array}`` written by one run.

    ``BatchLog(path, key)`` opens the log at ``path`` or creates it; an existing log
    written under another ``key`` is emptied first (its records belong to other
    inputs). :meth:`write` stores a batch, :meth:`read` and :meth:`batches` give them
    back, :meth:`done` counts the batches present from the first on.
    """

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path = Path(path)
        self.key = str(key)
        meta = self.path / _META
        if meta.is_file():
            try:
                same = json.loads(meta.read_text()).get("key") == self.key
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.path)
        if not (self.path / _META).is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(f"*{_SUFFIX}"):
                stale.unlink()
            write_text(self.path / _META, json.dumps({"key": self.key}))

    def _file(self, number: int) -> Path:
        if number < 0:
            raise ValueError(f"batch numbers start at 0, got {number}")
        return self.path / f"{number:08d}{_SUFFIX}"

    def write(self, number: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Store batch ``number``'s arrays (replacing a record of the same number)."""
        arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        for name, a in arrays.items():
            if a.dtype.hasobject:
                raise ValueError(
                    f"batch log {self.path}: array {name!r} holds Python objects; "
                    "records are plain numeric arrays"
                )
        with atomic_path(self._file(number), suffix=_SUFFIX) as tmp:
            save_file(arrays, str(tmp))

    def has(self, number: int) -> bool:
        """Whether batch ``number`` has been written."""
        return self._file(number).is_file()

    def done(self, part: int = 0, parts: int = 1) -> int:
        """How many batches, from the first on, are present (where a rerun starts).

        With ``parts`` (a run split over processes, each writing the batches whose
        number is ``part`` modulo ``parts``): the first of ``part``'s batches missing.
        """
        number = part
        while self.has(number):
            number += parts
        return number

    def read(self, number: int) -> dict[str, np.ndarray]:
        """Batch ``number``'s arrays; a missing batch is an error naming the log."""
        path = self._file(number)
        if not path.is_file():
            raise FileNotFoundError(f"batch log {self.path} has no batch {number}")
        return load_file(str(path))

    def batches(self, first: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``first .. stop - 1`` (default: up to the first missing one), in order."""
        number = first
        while (stop is None and self.has(number)) or (stop is not None and number < stop):
            yield self.read(number)
            number += 1

    def remove(self) -> None:
        """Delete the log and its directory."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        return f"BatchLog({str(self.path)!r}, batches={self.done()})"
