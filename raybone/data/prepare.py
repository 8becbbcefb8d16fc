"""Turn a labelled radiograph collection into one compact artifact that every training trial reuses.

Artifact folder (written to a temporary sibling, then renamed into place, so it is never half-written):
  images.npy        uint8 [N, S, S] grey radiographs warped to S x S (aspect not kept, as in Chen's paper)
  manifest.parquet  id, label, age_months, sex, split, source, checksum: one row per image, same order
  skipped.csv       file, reason: everything left out and why
  prepared.json     meta: fingerprint, settings, counts, images_sha256, content_sha256, versions
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import raybone
from raybone.data.decode import read_radiograph, warp_image
from raybone.data.phantom import write_phantom_atlas
from raybone.data.sources import SEX_CODES, SourceScan, scan_source
from raybone.errors import DataError, printable
from raybone.files import Legacy, atomic_folder, check_replaceable, file_sha256

DATA_VERSION = 1  # bump when decoding, warping or splitting changes what an artifact contains
DEMO_ATLAS_SIZE = 600
META_FILE = "prepared.json"
MANIFEST_COLUMNS = ["id", "label", "age_months", "sex", "split", "source", "checksum"]
CONTENT_COLUMNS = [c for c in MANIFEST_COLUMNS if c != "source"]  # what a model sees, not where it came from
# What identifies an artifact from before content_sha256: its images, settings and per-class split counts.
_LEGACY_CONTENT_KEYS = (
    "images_sha256",
    "counts",
    "data_version",
    "format",
    "image_size",
    "num_classes",
    "seed",
    "val_fraction",
)
ARTIFACT_FILES = ("images.npy", "manifest.parquet", "skipped.csv", META_FILE)
KIND = "prepared dataset"
DEMO_ATLAS = "demo-atlas"  # the phantom atlas's folder names start so: from_demo_atlas knows it by them
_LEGACY = Legacy(META_FILE, b'"fingerprint"', frozenset(ARTIFACT_FILES))

_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

_console = Console(stderr=True)


@dataclass
class PreparedData:
    path: Path
    images: np.ndarray  # uint8 [N, S, S]
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, row i describes images[i]
    meta: dict

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64)

    @property
    def is_train(self) -> np.ndarray:
        return (self.manifest["split"] == "train").to_numpy(dtype=bool)

    @property
    def sex_code(self) -> np.ndarray:
        """1 male, 0 female, -1 unknown."""
        return self.manifest["sex"].map(SEX_CODES).fillna(-1).to_numpy(dtype=np.int8)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def missing_validation(self) -> str | None:
        """Why there are no validation images, if there are none: a search scores every trial on them."""
        if not self.is_train.all():
            return None
        share = self.meta.get("val_fraction", 0.25)
        needed = max(2, math.ceil(0.5 / share))  # stratified_split rounds n * share and keeps one for training
        return (
            f"{self.meta.get('source', self.path)}: no validation images ({len(self.images)} train / 0 val): the "
            f"split gives each bone-age year {share:g} of its radiographs, rounded, and keeps one for training, so "
            f"a year needs {needed} or more to give one; add radiographs"
        )


def cache_root() -> Path:
    return Path(os.environ.get("RAYBONE_CACHE") or Path.home() / ".cache" / "raybone")


def prepare(
    source,
    *,
    format: str = "auto",
    labels=None,
    out=None,
    image_size: int = 256,
    num_classes: int = 20,
    seed: int = 0,
    val_fraction: float = 0.25,
    progress: bool = True,
    force: bool = False,
) -> PreparedData:
    """Decode, label, warp and split a radiograph collection once; reuse the cached artifact afterwards.

    `out` is written only where raybone may (see raybone.files); `force` replaces a raybone folder there.
    """
    _check_settings(image_size, num_classes, val_fraction)
    if isinstance(source, str) and source == "demo":
        source, format = _demo_atlas(seed, image_size), "rsna"
    source = Path(source)
    if (source / META_FILE).is_file():
        return _announce_loaded(load_prepared(source), "Loaded prepared dataset")
    scan = scan_source(source, format, Path(labels) if labels is not None else None)
    settings = {
        "format": scan.format,
        "image_size": image_size,
        "num_classes": num_classes,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    table, skipped = _label(scan.table, num_classes)
    fingerprint = _fingerprint(scan, table, settings)
    out = Path(out) if out is not None else cache_root() / "prepared" / f"{_source_name(source)}-{fingerprint[:12]}"
    _refuse_inside_source(out, scan.root)
    cached = _cached(out, fingerprint)
    if cached is not None:
        return _announce_loaded(cached, "Using cached prepared dataset")
    check_replaceable(out, KIND, force, _LEGACY)  # before decoding anything
    return _build(scan, table, scan.skipped + skipped, settings, fingerprint, out, progress, force)


def same_data(meta: dict, recorded: dict) -> bool:
    """Whether the artifact with prepared.json `meta` holds the data `recorded` (another artifact's meta) held.

    The fingerprint stamps the source files' dates, so a copied source (same bytes, new dates) is prepared
    again. What it holds is compared instead: the images and the manifest's ids, readings, sexes, split and
    file checksums (content_sha256). An artifact written before that hash is matched by its fingerprint, or
    by its images, settings and per-class counts of each split, which cannot see changed ids or sexes, an age
    changed within its year, or readings swapped between images.
    """
    if meta.get("content_sha256") and recorded.get("content_sha256"):
        return meta["content_sha256"] == recorded["content_sha256"]
    if meta.get("fingerprint") and meta.get("fingerprint") == recorded.get("fingerprint"):
        return True
    return all(meta.get(key) is not None and meta.get(key) == recorded.get(key) for key in _LEGACY_CONTENT_KEYS)


def load_prepared(path) -> PreparedData:
    """Open an artifact written by prepare(), verifying images.npy against the checksum in prepared.json."""
    path = Path(path)
    meta = _read_meta(path)
    images = _read_verified_images(path / "images.npy", meta.get("images_sha256", ""))
    manifest = _read_manifest(path / "manifest.parquet")
    size = meta.get("image_size")
    if images.ndim != 3 or images.shape[1:] != (size, size) or len(manifest) != len(images):
        raise DataError(
            f"{path}: images.npy {images.shape} does not match manifest.parquet ({len(manifest)} rows) "
            f"and image_size {size}; delete the folder and prepare again"
        )
    return PreparedData(path, images, manifest, meta)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded per-class split; returns True where an image is held out for validation.

    Each class keeps round(n * val_fraction) images for validation but never its last training image, so a
    class seen once is always trained on.
    """
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = min(int(np.floor(len(members) * val_fraction + 0.5)), len(members) - 1)
        is_val[rng.choice(members, size=n_val, replace=False)] = True
    return is_val


# ---------------------------------------------------------------- settings, labels, fingerprint


def _check_settings(image_size: int, num_classes: int, val_fraction: float) -> None:
    if not 8 <= image_size <= 4096:
        raise DataError(f"image_size: {image_size} is outside 8..4096 px")
    if num_classes < 1:
        raise DataError(f"num_classes: {num_classes} must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction: {val_fraction} must be in [0, 1)")


def _label(table: pd.DataFrame, num_classes: int) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Bone age class = whole years of the age in months; drop ages beyond the configured classes."""
    labelled = table.assign(label=np.floor(table["age_months"].to_numpy() / 12.0).astype(np.int64))
    beyond = labelled["label"] >= num_classes
    skipped = [
        (path, f"age {age:g} months is beyond the {num_classes} configured classes")
        for path, age in zip(labelled.loc[beyond, "path"], labelled.loc[beyond, "age_months"])
    ]
    kept = labelled.loc[~beyond]
    return kept.iloc[_natural_order(kept["id"].tolist())].reset_index(drop=True), skipped


def _natural_order(ids: list[str]) -> list[int]:
    # "9" before "10": numeric ids sort by value, anything else after them by text.
    return sorted(range(len(ids)), key=lambda i: (0, int(ids[i]), "") if ids[i].isdigit() else (1, 0, ids[i]))


def _fingerprint(scan: SourceScan, table: pd.DataFrame, settings: dict) -> str:
    """Identity of an artifact: candidate files (name, size, mtime), the label CSV bytes and every setting."""
    digest = hashlib.sha256(json.dumps({**settings, "data_version": DATA_VERSION}, sort_keys=True).encode())
    digest.update(file_sha256(scan.labels_csv).encode())
    for relative, size, mtime in sorted(_file_stamp(Path(path), scan.root) for path in table["path"]):
        digest.update(os.fsencode(relative) + f"\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _file_stamp(path: Path, root: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return os.path.relpath(path, root), -1, -1  # decoding will report it
    return os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns


def _source_name(source: Path) -> str:
    name = source.name if source.is_dir() else source.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "source"


def _refuse_inside_source(out: Path, root: Path) -> None:
    if out.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{out}: the prepared dataset must not be written inside the source folder {root}; choose another out"
        )


# ---------------------------------------------------------------- demo atlas


def from_demo_atlas(meta: dict) -> bool:
    """Whether prepared data (its prepared.json, or a model's record of it) came from the synthetic phantom atlas:
    a model of it says nothing true about real radiographs."""
    return Path(str(meta.get("source") or "")).name.startswith(DEMO_ATLAS)


def _demo_atlas(seed: int, image_size: int) -> Path:
    """Generate (once) the phantom atlas for `demo` in the cache."""
    atlas = cache_root() / f"{DEMO_ATLAS}-{seed}-{image_size}"
    if (atlas / "boneage.csv").is_file():
        return atlas
    _say(f"Drawing {DEMO_ATLAS_SIZE} phantom radiographs into {atlas}")
    with atomic_folder(atlas, "demo atlas", keep_existing=lambda: True) as staging:
        write_phantom_atlas(staging, n=DEMO_ATLAS_SIZE, image_size=image_size, seed=seed)
    return atlas


# ---------------------------------------------------------------- building


def _cached(out: Path, fingerprint: str) -> PreparedData | None:
    """The artifact already at `out` if it was built from the same inputs and is intact."""
    if not out.is_dir() or not (out / META_FILE).is_file() or not _same_fingerprint(out, fingerprint):
        return None
    try:
        return load_prepared(out)
    except DataError as err:
        _say(f"Rebuilding {out}: {err}", style="yellow")
        return None


def _build(
    scan: SourceScan,
    table: pd.DataFrame,
    skipped: list,
    settings: dict,
    fingerprint: str,
    out: Path,
    progress: bool,
    force: bool,
) -> PreparedData:
    images, checksums, problems = _decode_all(table["path"].tolist(), settings["image_size"], progress)
    usable = np.array([not problem for problem in problems], dtype=bool)
    skipped = skipped + [(path, problem) for path, problem in zip(table["path"], problems) if problem]
    if not usable.any():
        # No artifact, so no skipped.csv: the message is the only list the user gets.
        raise DataError(f"{scan.labels_csv}: no usable images ({len(skipped)} skipped; {_first_reasons(skipped, 5)})")
    images = _compact(images, usable)
    manifest = _manifest(table.loc[usable], np.asarray(checksums, dtype=object)[usable], settings)
    meta = _meta(scan, manifest, len(skipped), settings, fingerprint)
    result = _write_artifact(out, images, manifest, skipped, meta, force)
    _print_summary(result, skipped, _unclear_sex(table.loc[usable]))
    return result


def _decode_all(paths: list[str], image_size: int, progress: bool):
    """Decode and warp every file on a thread pool (PIL, zlib and hashlib release the GIL)."""
    images = np.zeros((len(paths), image_size, image_size), dtype=np.uint8)
    checksums, problems = [""] * len(paths), [""] * len(paths)
    workers = max(1, min(8, os.cpu_count() or 1))
    with _progress_bar(progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("Decoding radiographs", total=len(paths))
        results = pool.map(lambda path: _load_radiograph(path, image_size), paths)
        for index, (pixels, checksum, problem) in enumerate(results):
            if pixels is not None:
                images[index] = pixels
            checksums[index], problems[index] = checksum, problem
            bar.advance(task)
    return images, checksums, problems


def _load_radiograph(path: str, image_size: int) -> tuple[np.ndarray | None, str, str]:
    """(warped image or None, sha256 of the file or '', problem or '')."""
    try:
        grey, checksum = read_radiograph(path)
        return warp_image(grey, image_size), checksum, ""
    except DataError as err:
        return None, "", str(err).removeprefix(f"{path}: ")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_console,
        disable=not enabled,
        transient=True,
    )


def _compact(images: np.ndarray, usable: np.ndarray) -> np.ndarray:
    # Shift usable rows down in place: a fancy-indexed copy would double peak memory on big datasets.
    for target, source in enumerate(np.flatnonzero(usable)):
        if target != source:
            images[target] = images[source]
    return images[: int(usable.sum())]


def _manifest(table: pd.DataFrame, checksums: np.ndarray, settings: dict) -> pd.DataFrame:
    labels = table["label"].to_numpy(dtype=np.int64)
    is_val = stratified_split(labels, settings["val_fraction"], settings["seed"])
    return pd.DataFrame(
        {
            "id": table["id"].astype(str).to_numpy(),
            "label": labels,
            "age_months": table["age_months"].to_numpy(dtype=np.float64),
            "sex": table["sex"].astype(str).to_numpy(),
            "split": np.where(is_val, "val", "train"),
            "source": table["path"].map(printable).to_numpy(dtype=object),
            "checksum": checksums.astype(str),
        }
    )


def _meta(scan: SourceScan, manifest: pd.DataFrame, n_skipped: int, settings: dict, fingerprint: str) -> dict:
    per_class = {
        split: np.bincount(
            manifest.loc[manifest["split"] == split, "label"], minlength=settings["num_classes"]
        ).tolist()
        for split in ("train", "val")
    }
    return {
        "fingerprint": fingerprint,
        **settings,
        "source": str(scan.root.absolute()),
        "labels_csv": str(scan.labels_csv.absolute()),
        "counts": {
            "images": len(manifest),
            "train": int((manifest["split"] == "train").sum()),
            "val": int((manifest["split"] == "val").sum()),
            "skipped": n_skipped,
            "per_class": per_class,
        },
        "raybone_version": raybone.__version__,
        "data_version": DATA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_artifact(
    out: Path, images: np.ndarray, manifest: pd.DataFrame, skipped: list, meta: dict, force: bool
) -> PreparedData:
    # Another process may have finished the same artifact meanwhile; theirs is as good as ours.
    with atomic_folder(
        out,
        KIND,
        force=force,
        legacy=_LEGACY,
        keep_existing=lambda: _same_fingerprint(out, meta["fingerprint"]) and _intact(out),
    ) as staging:
        np.save(staging / "images.npy", images, allow_pickle=False)
        images_sha256 = file_sha256(staging / "images.npy")
        meta = {**meta, "images_sha256": images_sha256, "content_sha256": _content_sha256(images_sha256, manifest)}
        manifest.to_parquet(staging / "manifest.parquet", index=False)
        shown = [(printable(where), printable(reason)) for where, reason in skipped]
        pd.DataFrame(shown, columns=["file", "reason"]).to_csv(staging / "skipped.csv", index=False)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return PreparedData(out, images, manifest, meta)


def _content_sha256(images_sha256: str, manifest: pd.DataFrame) -> str:
    table = manifest[CONTENT_COLUMNS].to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(f"{images_sha256}\n{table}".encode()).hexdigest()


def _same_fingerprint(out: Path, fingerprint: str) -> bool:
    try:
        return _read_meta(out).get("fingerprint") == fingerprint
    except DataError:
        return False


def _intact(out: Path) -> bool:
    try:
        load_prepared(out)
    except DataError:
        return False
    return True


# ---------------------------------------------------------------- reading an artifact


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a prepared dataset ({META_FILE} missing)") from err
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: unreadable ({err}); delete the folder and prepare again") from err
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: not a JSON object; delete the folder and prepare again")
    return meta


def _read_verified_images(path: Path, expected_sha256: str) -> np.ndarray:
    """Read images.npy once into memory, check its sha256, and view it as an array without a second copy."""
    try:
        buffer = bytearray(path.stat().st_size)
        with path.open("rb") as handle:
            if handle.readinto(buffer) != len(buffer):
                raise OSError("file shrank while reading")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err}); prepare the dataset again") from err
    if hashlib.sha256(buffer).hexdigest() != expected_sha256:
        raise DataError(
            f"{path}: checksum does not match prepared.json (modified or corrupt); delete the folder and prepare again"
        )
    try:
        header = io.BytesIO(bytes(memoryview(buffer)[:65_600]))  # .npy headers are at most 64 KiB
        read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(header))
        if read_header is None:
            raise ValueError("unsupported .npy format version")
        shape, fortran, dtype = read_header(header)
    except ValueError as err:
        raise DataError(f"{path}: not a valid .npy file ({err})") from err
    if fortran or dtype != np.uint8:
        raise DataError(f"{path}: expected a C-ordered uint8 array, found {dtype}; prepare the dataset again")
    return np.frombuffer(buffer, dtype=np.uint8, count=int(np.prod(shape)), offset=header.tell()).reshape(shape)


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        manifest = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err}); delete the folder and prepare again") from err
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; prepare the dataset again")
    return manifest


# ---------------------------------------------------------------- reporting


def _say(text: str, style: str | None = None) -> None:
    _console.print(printable(text), style=style, markup=False, highlight=False, soft_wrap=True)


def _announce_loaded(data: PreparedData, what: str) -> PreparedData:
    counts = data.meta.get("counts", {})
    _say(
        f"{what} {data.path}: {len(data.images)} images ({counts.get('train', '?')} train / "
        f"{counts.get('val', '?')} val)"
    )
    return data


def _print_summary(data: PreparedData, skipped: list, unclear_sex: list) -> None:
    counts = data.meta["counts"]
    _say(
        f"Prepared {counts['images']} usable radiographs ({counts['train']} train / {counts['val']} val) "
        f"at {data.meta['image_size']} px -> {data.path}"
    )
    per_class = zip(counts["per_class"]["train"], counts["per_class"]["val"])
    _console.print(
        "train/val per bone-age year: "
        + "  ".join(f"{year}: {train}/{val}" for year, (train, val) in enumerate(per_class))
    )
    if unclear_sex:
        shown = _first_reasons([(where, repr(value)) for where, value in unclear_sex], 3)
        _say(
            f"warning: {len(unclear_sex)} rows give a sex raybone cannot read ({shown}): kept with sex unknown; "
            "write M/F, male/female, boy/girl, or male true/false",
            style="yellow",
        )
    if skipped:
        _say(f"Skipped {len(skipped)}: {_first_reasons(skipped, 3)}", style="yellow")
        _say(f"Full list: {data.path / 'skipped.csv'}")


def _unclear_sex(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(id, the CSV's word) of each prepared radiograph whose sex parse_sex could not read: kept as unknown."""
    unclear = table[(table["sex"] == "") & (table["sex_given"] != "")]
    return [(f"id {image_id}", given) for image_id, given in zip(unclear["id"], unclear["sex_given"])]


def _first_reasons(skipped: list, n: int) -> str:
    shown = "; ".join(f"{Path(where).name}: {reason}" for where, reason in skipped[:n])
    return shown + (" ..." if len(skipped) > n else "")
