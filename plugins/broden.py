"""Broden: the densely labelled concept data set of Network Dissection, read as distributed.

A Broden directory (``broden1_224``, ``broden1_227``, ``broden1_384``) holds::

    index.csv        image,split,ih,iw,sh,sw,<one column per category>
    label.csv        number,name,category,frequency,coverage,syns
    category.csv     name,first,last,count,frequency
    c_<category>.csv code,number,name,frequency,coverage
    images/...       the images and segmentation PNGs that index.csv names

Each category cell of ``index.csv`` holds zero or more items separated by ``;``:
the name of a segmentation PNG (relative to ``images/``) whose label at a pixel
is ``R + 256 * G``, or a label number that applies to the whole image. Label
numbers are global (``label.csv``), so they are used as concept ids directly.
Segmentations have their own resolution ``sh x sw`` (half the image size in the
distributed sets). Scene and texture hold whole-image numbers only and become
``image_labels``; every other category becomes a dense ``labels`` map with one
layer per item (several part layers per image, for instance).

Only the CSV metadata is read up front; each item reads its image and PNGs from
disk when asked for, so the set is streamed, never held in memory.

Spec: ``broden:/path/to/broden1_224[,split=train][,categories=object;part][,limit=100]``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from nethook.plugins import hookimpl, parse_kwargs
from nethook.sources import ConceptSource, concept_frame

__all__ = ["BrodenFormatError", "BrodenSource", "broden_source", "decode_segmentation"]

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_COLUMNS = ("number", "name", "category")
CATEGORY_COLUMNS = ("name",)
CODE_COLUMNS = ("code", "number", "name")
WHOLE_IMAGE_CATEGORIES = ("scene", "texture")
"""Categories that Broden gives as label numbers for the whole image."""

_CATEGORY_ITEM = re.compile(r"^([^(]+)\((\d+)\)$")


class BrodenFormatError(ValueError):
    """A Broden file is missing or malformed; names the file (and line) at fault."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


@dataclass(frozen=True)
class _Label:
    """One row of label.csv."""

    number: int
    name: str
    categories: dict[str, int]
    frequency: float


@dataclass(frozen=True)
class _Row:
    """One row of index.csv: the image, its sizes, and per-category items."""

    line: int
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    items: dict[str, tuple[int | str, ...]]


def _csv_rows(path: Path, text: str, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, row)`` for each data row; malformed rows raise naming file and line."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise BrodenFormatError(
            path, f"empty file; expected a header with {', '.join(required)}"
        ) from None
    missing = [name for name in required if name not in header]
    if missing:
        raise BrodenFormatError(
            path, f"header lacks column(s) {', '.join(missing)}; got {', '.join(header)}", 1
        )
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise BrodenFormatError(path, f"not valid CSV ({exc})", reader.line_num) from None
        if not fields:
            continue
        if len(fields) != len(header):
            raise BrodenFormatError(
                path,
                f"row has {len(fields)} fields, expected {len(header)} ({', '.join(header)})",
                reader.line_num,
            )
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _int(path: Path, line: int, column: str, text: str) -> int:
    """Parse a non-negative integer cell or raise naming file, line and column."""
    if not text.strip().isdigit():
        raise BrodenFormatError(
            path, f"column {column!r} is {text!r}; expected a non-negative integer", line
        )
    return int(text)


def _float(text: str) -> float:
    """Parse an optional number cell (NaN when empty or not a number)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def decode_segmentation(path: Path) -> np.ndarray:
    """Read a Broden segmentation PNG -> int64 ``[h, w]`` label numbers (``R + 256 * G``).

    Single-channel PNGs (modes L, I, I;16) hold label numbers directly.
    """
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img, dtype=np.int64)
            return rgb[..., 0] + 256 * rgb[..., 1]
        if img.mode in ("L", "I", "I;16"):
            return np.asarray(img).astype(np.int64)
        raise BrodenFormatError(
            path, f"segmentation PNG has mode {img.mode}; expected RGB (label = R + 256*G)"
        )


class BrodenSource(ConceptSource):
    """A Broden directory as a :class:`nethook.sources.ConceptSource`.

    ``split`` keeps only rows of that split (``train``/``val``); ``categories``
    keeps only those categories (default: every category column of index.csv);
    ``limit`` keeps the first rows. Items hold the image at its own size
    ``ih x iw`` and labels at the segmentation size ``sh x sw``.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        categories: Sequence[str] | str | None = None,
        limit: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise BrodenFormatError(self.path, "not a directory; expected a Broden directory")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(
                f"Broden {self.path}: limit={limit!r}; expected a non-negative integer"
            )
        self.split = split
        self.limit = limit
        digest = hashlib.sha256()
        self.labels = self._read_labels(digest)
        index_path = self.path / "index.csv"
        index_text = self._read(index_path, digest)
        columns = next(csv.reader(io.StringIO(index_text)), [])
        available = [c.strip() for c in columns if c.strip() not in INDEX_COLUMNS]
        selected = self._select(available, categories)
        self.category_info = self._read_categories(selected, digest)
        self.codes = {cat: self._read_codes(cat, digest) for cat in selected}
        rows = self._read_index(index_path, index_text, selected)
        self.image_categories = tuple(c for c in selected if self._is_whole_image(c, rows))
        self.categories = tuple(c for c in selected if c not in self.image_categories)
        self._rows = self._choose(rows)
        self._content = digest.hexdigest()[:16]

    # -- reading the metadata -------------------------------------------------

    def _read(self, path: Path, digest: Any) -> str:
        """Text of a metadata file (fed to the content digest); missing -> clear error."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BrodenFormatError(path, "missing; a Broden directory must contain it") from None
        digest.update(path.name.encode() + b"\0" + data)
        return data.decode("utf-8-sig")

    def _read_labels(self, digest: Any) -> dict[int, _Label]:
        """label.csv -> number -> label (number 0, "none", is skipped)."""
        path = self.path / "label.csv"
        labels: dict[int, _Label] = {}
        for line, row in _csv_rows(path, self._read(path, digest), LABEL_COLUMNS):
            number = _int(path, line, "number", row["number"])
            cats: dict[str, int] = {}
            for part in filter(None, row["category"].split(";")):
                match = _CATEGORY_ITEM.match(part.strip())
                if not match:
                    raise BrodenFormatError(
                        path,
                        f"category {part!r} is malformed; expected name(count), "
                        "e.g. object(12);part(3)",
                        line,
                    )
                cats[match.group(1)] = int(match.group(2))
            if number in labels:
                raise BrodenFormatError(path, f"label number {number} appears twice", line)
            if number:
                labels[number] = _Label(number, row["name"], cats, _float(row.get("frequency", "")))
        return labels

    def _select(self, available: list[str], categories: Sequence[str] | str | None) -> list[str]:
        """The categories to read: all of index.csv's, or the requested ones (validated)."""
        if categories is None:
            return available
        if isinstance(categories, str):
            categories = [c for c in re.split(r"[;+\s]+", categories) if c]
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise ValueError(
                f"Broden {self.path}: no category {', '.join(unknown)}; index.csv has "
                f"{', '.join(available)}"
            )
        return list(categories)

    def _read_categories(self, selected: list[str], digest: Any) -> pd.DataFrame:
        """category.csv as a table; every selected category must be listed there."""
        path = self.path / "category.csv"
        rows = [row for _, row in _csv_rows(path, self._read(path, digest), CATEGORY_COLUMNS)]
        table = pd.DataFrame(rows)
        listed = set(table["name"]) if len(table) else set()
        for cat in selected:
            if cat not in listed:
                raise BrodenFormatError(
                    path, f"category {cat!r} (a column of index.csv) is not listed"
                )
        for column in table.columns:
            if column != "name":
                table[column] = pd.to_numeric(table[column], errors="coerce")
        return table[table["name"].isin(selected)].reset_index(drop=True)

    def _read_codes(self, category: str, digest: Any) -> pd.DataFrame:
        """c_<category>.csv: the category's dense codes -> global label numbers."""
        path = self.path / f"c_{category}.csv"
        records = []
        for line, row in _csv_rows(path, self._read(path, digest), CODE_COLUMNS):
            code = _int(path, line, "code", row["code"])
            number = _int(path, line, "number", row["number"])
            if number not in self.labels:
                raise BrodenFormatError(path, f"label number {number} is not in label.csv", line)
            records.append(
                {
                    "code": code,
                    "number": number,
                    "name": row["name"],
                    "frequency": _float(row.get("frequency", "")),
                }
            )
        return pd.DataFrame(records, columns=["code", "number", "name", "frequency"])

    def _read_index(self, path: Path, text: str, selected: list[str]) -> list[_Row]:
        """Every row of index.csv, validated, with the selected categories' items."""
        rows: list[_Row] = []
        for line, row in _csv_rows(path, text, INDEX_COLUMNS):
            sizes = {c: _int(path, line, c, row[c]) for c in ("ih", "iw", "sh", "sw")}
            if not row["image"]:
                raise BrodenFormatError(path, "column 'image' is empty", line)
            items: dict[str, tuple[int | str, ...]] = {}
            for cat in selected:
                parsed: list[int | str] = []
                for item in filter(None, (s.strip() for s in row[cat].split(";"))):
                    if item.isdigit():
                        if int(item) not in self.labels:
                            raise BrodenFormatError(
                                path, f"{cat} label {item} is not in label.csv", line
                            )
                        parsed.append(int(item))
                    else:
                        parsed.append(item)
                items[cat] = tuple(parsed)
            rows.append(_Row(line, row["image"], row["split"], **sizes, items=items))
        return rows

    def _choose(self, rows: list[_Row]) -> list[_Row]:
        """The rows of the requested split, up to ``limit``."""
        chosen = [row for row in rows if self.split is None or row.split == self.split]
        if self.split is not None and not chosen:
            splits = sorted({row.split for row in rows})
            raise ValueError(
                f"Broden {self.path}: no rows with split={self.split!r} in index.csv; "
                f"splits present: {', '.join(splits) or '(none)'}"
            )
        return chosen[: self.limit] if self.limit is not None else chosen

    def _is_whole_image(self, category: str, rows: list[_Row]) -> bool:
        """Scene/texture (numbers only, checked), or any category of numbers only."""
        if category in WHOLE_IMAGE_CATEGORIES:
            for row in rows:
                for item in row.items[category]:
                    if isinstance(item, str):
                        raise BrodenFormatError(
                            self.path / "index.csv",
                            f"{category} item {item!r} is a file; {category} must be "
                            "whole-image label numbers",
                            row.line,
                        )
            return True
        items = [item for row in rows for item in row.items[category]]
        return bool(items) and all(isinstance(item, int) for item in items)

    # -- the ConceptSource protocol ------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def image_path(self, index: int) -> Path:
        """Path of the image of item ``index``."""
        return self.path / "images" / self._rows[index].image

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self._rows):
            raise IndexError(f"Broden {self.path}: index {index} out of range [0, {len(self)})")
        row = self._rows[index]
        image = self._load_image(row)
        labels = {cat: self._load_layers(row, cat) for cat in self.categories}
        image_labels = {
            cat: torch.tensor(row.items[cat] or (0,), dtype=torch.int64)
            for cat in self.image_categories
        }
        return {"image": image, "labels": labels, "image_labels": image_labels, "index": index}

    def _where(self, row: _Row) -> str:
        """'index.csv line N', for messages about files a row names."""
        return f"named on {self.path / 'index.csv'} line {row.line}"

    def _load_image(self, row: _Row) -> torch.Tensor:
        """The row's image as float32 ``[3, ih, iw]`` in [0, 1]; its size must match."""
        path = self.path / "images" / row.image
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except FileNotFoundError:
            raise BrodenFormatError(path, f"image missing ({self._where(row)})") from None
        if rgb.shape[:2] != (row.ih, row.iw):
            raise BrodenFormatError(
                path,
                f"image is {rgb.shape[0]}x{rgb.shape[1]} (h x w) but index.csv line "
                f"{row.line} says ih x iw = {row.ih}x{row.iw}",
            )
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)

    def _load_layers(self, row: _Row, category: str) -> torch.Tensor:
        """int64 ``[L, sh, sw]``: one layer per item (a PNG, or a whole-image number)."""
        layers = []
        for item in row.items[category] or (0,):
            if isinstance(item, int):
                layers.append(np.full((row.sh, row.sw), item, dtype=np.int64))
                continue
            path = self.path / "images" / item
            try:
                seg = decode_segmentation(path)
            except FileNotFoundError:
                raise BrodenFormatError(
                    path, f"{category} segmentation missing ({self._where(row)})"
                ) from None
            if seg.shape != (row.sh, row.sw):
                raise BrodenFormatError(
                    path,
                    f"segmentation is {seg.shape[0]}x{seg.shape[1]} (h x w) but index.csv "
                    f"line {row.line} says sh x sw = {row.sh}x{row.sw}",
                )
            top = int(seg.max(initial=0))
            if top and top not in self.labels:
                raise BrodenFormatError(path, f"label {top} is not in label.csv")
            layers.append(seg)
        return torch.from_numpy(np.stack(layers))

    def concepts(self) -> pd.DataFrame:
        """Concept table of the selected categories (ids are Broden label numbers).

        A label listed under several categories (e.g. ``object(3);part(36)``) gets the
        one where it occurs most as ``category``; column ``categories`` lists all of
        them. ``frequency`` is label.csv's count of images over the whole Broden set.
        """
        selected = set(self.categories) | set(self.image_categories)
        rows = []
        for label in self.labels.values():
            cats = {c: n for c, n in label.categories.items() if c in selected}
            if cats:
                ranked = sorted(cats, key=lambda c: -cats[c])
                rows.append((label.number, label.name, ranked[0], label.frequency, ranked))
        table = concept_frame(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
        )
        by_id = {r[0]: ";".join(r[4]) for r in rows}
        table["categories"] = table["id"].map(by_id)
        return table

    def category_table(self) -> pd.DataFrame:
        """category.csv restricted to the selected categories (name, first, last, count, ...)."""
        return self.category_info.copy()

    def category_codes(self, category: str) -> pd.DataFrame:
        """c_<category>.csv: columns code (dense, per category), number (global id), name."""
        if category not in self.codes:
            raise ValueError(
                f"Broden {self.path}: no category {category!r}; selected: {', '.join(self.codes)}"
            )
        return self.codes[category].copy()

    def fingerprint_parts(self) -> dict:
        """Content hash of the metadata files plus split, categories and limit."""
        return {
            "format": "broden",
            "metadata": self._content,
            "split": self.split,
            "categories": list(self.categories) + list(self.image_categories),
            "limit": self.limit,
        }

    def __repr__(self) -> str:
        return f"BrodenSource({str(self.path)!r}, split={self.split!r}, n={len(self)})"


def broden_source(arg: str) -> BrodenSource:
    """Factory for ``broden:/path[,split=train][,categories=object;part][,limit=N]``."""
    kwargs = parse_kwargs(arg, positional=("path",))
    if "path" not in kwargs:
        raise ValueError(
            f"broden spec argument {arg!r}: expected broden:/path/to/broden1_224"
            "[,split=train][,categories=object;part][,limit=N]"
        )
    accepted = {"path", "split", "categories", "limit"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"broden spec argument {arg!r}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    kwargs["path"] = str(kwargs["path"])
    if kwargs.get("split") is not None:
        kwargs["split"] = str(kwargs["split"])
    return BrodenSource(**kwargs)


@hookimpl
def nethook_concept_sources() -> dict:
    """Register the ``broden`` concept source."""
    return {"broden": broden_source}
