"""Read a labelled radiograph collection into one table: id, path, age_months, sex.

Three layouts are understood:
  rsna      <dir>/boneage.csv (id, boneage [months], male) and <dir>/images/<id>.png
  dha       Digital Hand Atlas style: id or path, reading1, reading2 (two radiologists, months), sex/male
  manifest  a CSV of path (relative to the CSV) + age_months | age_years | reading1, reading2, sex
Rows that cannot be used are returned as (file, reason) pairs instead of failing the whole source;
only an unusable CSV raises DataError.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from raybone.data.decode import IMAGE_SUFFIXES, UNSUPPORTED_SUFFIXES
from raybone.errors import DataError
from raybone.files import regular_file_size

FORMATS = ("rsna", "dha", "manifest")
MAX_AGE_MONTHS = 240.0
MAX_LABELS_BYTES = 256 * 2**20
RSNA_CSV = "boneage.csv"
# sex_given: the CSV's own word ('' where it said nothing), so a sex parse_sex cannot read is named, not lost
TABLE_COLUMNS = ["id", "path", "age_months", "sex", "sex_given"]

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass
class SourceScan:
    """What a reader found: usable rows plus everything skipped, and where it came from."""

    format: str
    labels_csv: Path
    root: Path  # folder the images are found in; fingerprints use paths relative to it
    table: pd.DataFrame  # TABLE_COLUMNS, one row per usable radiograph
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or CSV line, reason)


class _Skip(Exception):
    """A row problem: the row is skipped with this message as its reason."""


def scan_source(source: Path, format: str = "auto", labels: Path | None = None) -> SourceScan:
    """Find the label CSV of `source`, pick the reader (auto-detected unless `format` is given) and run it."""
    source = Path(source)
    if format not in ("auto", *FORMATS):
        raise DataError(f"{source}: unknown format '{format}'; use one of auto, {', '.join(FORMATS)}")
    labels_csv = Path(labels) if labels is not None else find_label_csv(source)
    if format == "auto":
        format = detect_format(labels_csv)
    root = source if source.is_dir() else labels_csv.parent
    if format == "rsna":
        table, skipped = read_rsna(root, labels_csv)
    elif format == "dha":
        table, skipped = read_dha(root, labels_csv)
    else:
        table, skipped = read_manifest(labels_csv)
        root = labels_csv.parent
    return SourceScan(format, labels_csv, root, table, skipped)


def find_label_csv(source: Path) -> Path:
    """The label CSV of a source: the file itself, <dir>/boneage.csv, or the one recognisable CSV in <dir>."""
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if not source.is_dir():
        regular_file_size(source, MAX_LABELS_BYTES, DataError)
        return source
    if (source / RSNA_CSV).is_file():
        return source / RSNA_CSV
    candidates = sorted(source.glob("*.csv"))
    recognised = [csv for csv in candidates if _format_of_columns(_columns(csv))]
    if len(recognised) == 1:
        return recognised[0]
    if not recognised:
        raise DataError(
            f"{source}: no label CSV found (expected {RSNA_CSV}); name the label CSV itself instead of the folder"
        )
    names = ", ".join(csv.name for csv in recognised)
    raise DataError(f"{source}: several label CSVs ({names}); name the one to use instead of the folder")


def detect_format(labels_csv: Path) -> str:
    """Tell the layout from the CSV header."""
    columns = _columns(labels_csv)
    detected = _format_of_columns(columns)
    if detected is None:
        raise DataError(
            f"{labels_csv}: cannot tell the label format from columns {sorted(columns)}; expected "
            "id,boneage (RSNA), id|path + reading1,reading2 (Digital Hand Atlas) "
            "or path + age_months|age_years (manifest)"
        )
    return detected


def read_rsna(folder: Path, labels_csv: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """RSNA layout: id, boneage (months), male; images <folder>/images/<id>.png or <folder>/<id>.png."""
    frame = _read_csv(labels_csv)
    _require(frame, labels_csv, ["id", "boneage"])
    index = _ImageIndex(folder)
    table, skipped = _collect(frame, labels_csv, _by_id(index), lambda record: _months(record["boneage"]))
    return table, skipped + index.unclaimed(set(frame["id"]), labels_csv)


def read_dha(folder: Path, labels_csv: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Digital Hand Atlas style: id (or path), reading1, reading2 in months; age is their mean."""
    frame = _read_csv(labels_csv)
    if "id" not in frame.columns and "path" not in frame.columns:
        raise DataError(f"{labels_csv}: missing column(s) 'id' (or 'path')")
    _require(frame, labels_csv, ["reading1", "reading2"])
    if "id" not in frame.columns:
        return _collect(frame, labels_csv, _by_path(labels_csv.parent), _mean_reading)
    index = _ImageIndex(folder)
    table, skipped = _collect(frame, labels_csv, _by_id(index), _mean_reading)
    return table, skipped + index.unclaimed(set(frame["id"]), labels_csv)


def read_manifest(labels_csv: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Manifest: path (inside the CSV's folder), age_months | age_years | reading1+reading2, optional sex."""
    frame = _read_csv(labels_csv)
    _require(frame, labels_csv, ["path"])
    age_of = _manifest_age_reader(frame, labels_csv)
    return _collect(frame, labels_csv, _by_path(labels_csv.parent), age_of)


# ---------------------------------------------------------------- CSV handling


def _read_csv(labels_csv: Path, header_only: bool = False) -> pd.DataFrame:
    if labels_csv.exists():  # a FIFO would hang the reader, a device never end
        regular_file_size(labels_csv, MAX_LABELS_BYTES, DataError)
    try:
        # Everything as text: ids like "0123" must survive, and ages are validated row by row.
        frame = pd.read_csv(
            labels_csv, dtype=str, keep_default_na=False, skipinitialspace=True, nrows=0 if header_only else None
        )
    except FileNotFoundError as err:
        raise DataError(f"{labels_csv}: label CSV not found") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IsADirectoryError) as err:
        raise DataError(f"{labels_csv}: not a readable CSV ({str(err).splitlines()[0]})") from err
    frame.columns = [str(column).strip().lower() for column in frame.columns]
    return frame.apply(lambda column: column.str.strip())


def _columns(labels_csv: Path) -> set[str]:
    return set(_read_csv(labels_csv, header_only=True).columns)


def _format_of_columns(columns: set[str]) -> str | None:
    if {"id", "boneage"} <= columns:
        return "rsna"
    if "path" in columns:
        return "manifest"
    if {"id", "reading1", "reading2"} <= columns:
        return "dha"
    return None


def _require(frame: pd.DataFrame, labels_csv: Path, columns: list[str]) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        quoted = ", ".join(f"'{column}'" for column in missing)
        raise DataError(f"{labels_csv}: missing column(s) {quoted} (found: {', '.join(frame.columns)})")


def _collect(frame: pd.DataFrame, labels_csv: Path, locate: Callable, age_of: Callable):
    """Validate every row; return the usable ones as a table and the rest as (where, reason)."""
    ids = [_row_id(record) for record in frame.to_dict("records")]
    counts = Counter(image_id for image_id in ids if image_id)
    rows, skipped = [], []
    for line, (record, image_id) in enumerate(zip(frame.to_dict("records"), ids), start=2):
        try:
            if counts[image_id] > 1:
                raise _Skip(f"appears {counts[image_id]} times in {labels_csv.name}")
            age_months = age_of(record)
            path = locate(record, image_id)
        except _Skip as problem:
            skipped.append((f"{labels_csv.name} line {line}", f"id {image_id or '?'}: {problem}"))
            continue
        rows.append((image_id, str(path), age_months, parse_sex(record), record.get("sex") or record.get("male") or ""))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"age_months": float}), skipped


def _row_id(record: dict) -> str:
    if "id" in record:
        return record["id"]
    # Without an id column the image's path (minus extension) names it; unique within the folder.
    return PurePosixPath(record["path"].replace("\\", "/")).with_suffix("").as_posix() if record["path"] else ""


# ---------------------------------------------------------------- ages and sex


def _months(text: str, scale: float = 1.0, what: str = "age") -> float:
    """Parse an age (in months, or years with scale=12) and enforce the 0..240-month range."""
    if text == "":
        raise _Skip(f"{what} is missing")
    try:
        value = float(text)
    except ValueError:
        raise _Skip(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _Skip(f"{what} {text!r} is not a number")
    months = value * scale
    if months < 0:
        raise _Skip(f"{what} {text} is negative")
    if months > MAX_AGE_MONTHS:
        raise _Skip(f"{what} {months:g} months is above the {MAX_AGE_MONTHS:g}-month limit")
    return months


def _mean_reading(record: dict) -> float:
    # The Digital Hand Atlas gives two radiologists' readings; the bone age is their mean.
    return (_months(record["reading1"], what="reading1") + _months(record["reading2"], what="reading2")) / 2


def _manifest_age_reader(frame: pd.DataFrame, labels_csv: Path) -> Callable[[dict], float]:
    if "age_months" in frame.columns:
        return lambda record: _months(record["age_months"])
    if "age_years" in frame.columns:
        return lambda record: _months(record["age_years"], scale=12.0)
    if {"reading1", "reading2"} <= set(frame.columns):
        return _mean_reading
    raise DataError(f"{labels_csv}: missing column(s) 'age_months' (or 'age_years', or 'reading1'+'reading2')")


SEX_CODES = {"M": 1, "F": 0, "": -1}  # parse_sex's letters as the codes PreparedData and predict carry


def parse_sex(record: dict) -> str:
    """'M', 'F' or '' when the CSV does not say."""
    sex = record.get("sex", "").lower()
    if sex in ("m", "male", "boy"):
        return "M"
    if sex in ("f", "female", "girl"):
        return "F"
    male = record.get("male", "").lower()
    if male in _TRUE:
        return "M"
    if male in _FALSE:
        return "F"
    return ""


# ---------------------------------------------------------------- finding images


class _ImageIndex:
    """Image files of an RSNA-style folder by stem: <folder>/images/<id>.* first, then <folder>/<id>.*."""

    def __init__(self, folder: Path):
        self.folders = [folder / "images", folder]
        self.by_stem: dict[str, Path] = {}
        self.unsupported: dict[str, Path] = {}  # .gif, .tif, ...: reported, never decoded
        for directory in reversed(self.folders):  # later assignments win: images/ beats the top level
            images, unsupported = _sorted_images(directory)
            self.by_stem |= {path.stem: path for path in images}
            self.unsupported |= {path.stem: path for path in unsupported}
        self.unsupported = {stem: path for stem, path in self.unsupported.items() if stem not in self.by_stem}

    def find(self, image_id: str) -> Path:
        if not image_id:
            raise _Skip("id is empty")
        if image_id in self.by_stem:
            return self.by_stem[image_id]
        if image_id in self.unsupported:
            raise _Skip(_unsupported(self.unsupported[image_id]))
        where = f"{image_id}{'/'.join(IMAGE_SUFFIXES)} in {self.folders[0]} or its parent"
        raise _Skip(f"no image file found ({where})")

    def unclaimed(self, csv_ids: set[str], labels_csv: Path) -> list[tuple[str, str]]:
        """Images nobody labelled, and unsupported ones: reported, never fatal."""
        return [
            (str(path), f"image has no row in {labels_csv.name}")
            for stem, path in sorted(self.by_stem.items())
            if stem not in csv_ids
        ] + [(str(path), _unsupported(path)) for stem, path in sorted(self.unsupported.items()) if stem not in csv_ids]


def _unsupported(path: Path) -> str:
    return f"{path.name}: {path.suffix.lower()} images are not read; raybone reads PNG, JPEG and DICOM"


def _sorted_images(directory: Path) -> tuple[list[Path], list[Path]]:
    """(image files, unsupported image files) of one folder; where one stem has several images, the preferred
    suffix comes last."""
    if not directory.is_dir():
        return [], []
    rank = {suffix: position for position, suffix in enumerate(IMAGE_SUFFIXES)}
    files = [Path(entry.path) for entry in os.scandir(directory) if entry.is_file()]
    images = [path for path in files if path.suffix.lower() in rank]
    unsupported = sorted(path for path in files if path.suffix.lower() in UNSUPPORTED_SUFFIXES)
    return sorted(images, key=lambda path: (path.stem, -rank[path.suffix.lower()])), unsupported


def _by_id(index: _ImageIndex) -> Callable[[dict, str], Path]:
    return lambda record, image_id: index.find(image_id)


def _by_path(folder: Path) -> Callable[[dict, str], Path]:
    return lambda record, image_id: _inside(folder, record["path"])


def _inside(folder: Path, text: str) -> Path:
    """Resolve a CSV path against its folder, refusing anything that escapes it."""
    if not text:
        raise _Skip("path is empty")
    base = folder.resolve()
    path = (base / text).resolve()
    if not path.is_relative_to(base):
        raise _Skip(f"path {text!r} points outside {base}")
    if not path.is_file():
        raise _Skip(f"image {text!r} not found in {base}")
    return path
