"""Deterministic listings of image folders and CSVs: sorted, with explicit ids, the same on every OS.

The Dacon team lost most of its F1 moving from Windows to Linux; unsorted directory listings joined to
labels by position are the classic cause. Everything here is sorted by a POSIX-style relative path and
every image carries an explicit id.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRef:
    """An image with its explicit id (file stem, or the CSV's id column)."""

    id: str
    path: Path


def list_images(directory: str | Path, *, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[ImageRef]:
    """Image files directly in ``directory``, sorted by name; the id is the file stem (unique required)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist")
    files = sorted(
        (p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    refs = [ImageRef(p.stem, p) for p in files]
    _check_unique(refs, directory)
    return refs


def read_image_csv(csv_path: str | Path, *, id_column: str = "id", path_column: str = "img_path") -> list[ImageRef]:
    """Rows of a CSV such as Dacon's ``train.csv`` (``id,img_path[,label]``); paths relative to the CSV."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {id_column, path_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {sorted(missing)} (found {reader.fieldnames})")
        refs = [ImageRef(row[id_column], (csv_path.parent / row[path_column]).resolve()) for row in reader]
    _check_unique(refs, csv_path)
    return refs


def list_image_source(source: str | Path) -> list[ImageRef]:
    """A folder of images or a CSV of ``id,img_path``, sorted by id."""
    source = Path(source)
    refs = read_image_csv(source) if source.suffix.lower() == ".csv" else list_images(source)
    return sorted(refs, key=lambda ref: ref.id)


def stable_split(
    refs: Sequence[ImageRef], fraction: float, *, salt: str = "waferwatch"
) -> tuple[list[ImageRef], list[ImageRef]]:
    """Split by a hash of each id (not by position or RNG), so adding images never reshuffles the others."""
    first, second = [], []
    for ref in refs:
        bucket = int(hashlib.sha256(f"{salt}:{ref.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (first if bucket < fraction else second).append(ref)
    return first, second


def _check_unique(refs: Sequence[ImageRef], where: Path) -> None:
    seen: set[str] = set()
    for ref in refs:
        if ref.id in seen:
            raise ValueError(f"{where}: image id {ref.id!r} appears twice; ids must be unique")
        seen.add(ref.id)
