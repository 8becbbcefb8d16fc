"""The experiment folder `<storage>/<name>/` and its Parquet tables.

    spec.yaml          the resolved spec the search ran with
    environment.json   package versions, data fingerprint, command
    trials.parquet     one row per trial (final metrics, hyperparameters, checkpoint)
    history.parquet    one row per report of every trial (learning curves)
    train/             the Ray Train runs, one per trial, with their checkpoints
    optuna.db          the Optuna study (SQLite; a copy, when the storage is a URI: see study_dir)
    ...                Ray Tune's own experiment state (used by --resume)

The storage is a local folder (default `results/`) or a URI: `s3://bucket/prefix`, `gs://bucket/prefix`,
`file:///abs/path`. Every read and write here goes through `storage()`, i.e. `pyarrow.fs`, the same
filesystems Ray Tune and Ray Train write the experiment and the checkpoints with. A local folder is
returned as a `Path`, a URI location as a `str`.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path, PurePath

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybone.errors import RayboneError, one_line

TRIALS, HISTORY, STUDY = "trials.parquet", "history.parquet", "optuna.db"
SPEC, ENVIRONMENT = "spec.yaml", "environment.json"
LOCAL_RESULTS = Path("results")  # the default storage; also where a URI storage's optuna.db stays

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters at least: C:/ is a Windows drive


def location_text(location: str | PurePath) -> str:
    """A location as text. A Path that pathlib collapsed from a URI (`s3:/bucket`) gets its `//` back."""
    text = str(location)
    match = _SCHEME.match(text)
    collapsed = match and isinstance(location, PurePath) and not text.startswith(f"{match.group(1)}://")
    if collapsed and match.group(1).lower() != "file":  # file:/abs/path is a valid file URI already
        text = f"{match.group(1)}://{text[match.end() :]}"
    return text


def is_uri(location: str | PurePath) -> bool:
    return bool(_SCHEME.match(location_text(location)))


def is_local(location: str | PurePath) -> bool:
    """A folder of this machine's filesystem: a plain path or a file:// URI."""
    match = _SCHEME.match(location_text(location))
    return match is None or match.group(1).lower() == "file"


def storage(location: str | PurePath) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local folder or a URI; every read and write of results goes through it."""
    text = location_text(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), Path(text).absolute().as_posix()
    return _from_uri(text)


@functools.lru_cache(maxsize=16)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError) as err:  # unknown scheme, no credentials, no such bucket
        raise RayboneError(f"cannot open storage {uri}: {one_line(err)}") from None


def join(location: str | PurePath, *parts: str) -> str | Path:
    """`location/part/...`: a Path for a local folder, a URI (query string kept last) for a URI."""
    text = location_text(location)
    if not is_uri(text):
        return Path(text).joinpath(*parts)
    base, sep, query = text.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def as_location(fs_path: str | None, storage_location: str | PurePath) -> str | None:
    """A path inside `storage_location`'s filesystem (as Ray reports checkpoints) as a location: the same
    path for a local folder, a URI of the storage's scheme for a URI."""
    text = location_text(storage_location)
    if fs_path is None or not is_uri(text):
        return fs_path
    _, root = storage(text)
    fs_path = str(fs_path)
    if fs_path != root and not fs_path.startswith(root.rstrip("/") + "/"):
        return fs_path
    base, sep, query = text.partition("?")
    return base.rstrip("/") + fs_path[len(root.rstrip("/")) :] + sep + query


def exists(location: str | PurePath) -> bool:
    fs, path = storage(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_parquet(df: pd.DataFrame, location: str | PurePath) -> None:
    """Write atomically: a crash mid-write leaves the previous table, never half of one.

    The table goes to a hidden name in the same folder, then moves over the target (a rename on local disks
    and NFS; a server-side copy on object stores, whose readers see the old or the new object, never half).
    """
    fs, path = storage(location)
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, filesystem=fs)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def read_parquet(location: str | PurePath) -> pd.DataFrame:
    """A table written by write_parquet; a one-line RayboneError if it is missing, truncated or not Parquet."""
    fs, path = storage(location)
    try:
        return pq.read_table(path, filesystem=fs).to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise RayboneError(f"{location_text(location)}: unreadable table ({one_line(err)})") from None


def write_text(text: str, location: str | PurePath) -> None:
    fs, path = storage(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(location: str | PurePath) -> str:
    fs, path = storage(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_json(data: dict, location: str | PurePath) -> None:
    write_text(json.dumps(data, indent=2, default=str) + "\n", location)


def copy_file(source: str | PurePath, target: str | PurePath) -> None:
    """Copy one file between any two locations (e.g. the local optuna.db into a URI storage)."""
    source_fs, source_path = storage(source)
    target_fs, target_path = storage(target)
    target_fs.create_dir(posixpath.dirname(target_path), recursive=True)
    pafs.copy_files(source_path, target_path, source_filesystem=source_fs, destination_filesystem=target_fs)


def mirror(location: str | PurePath, target: Path, recursive: bool = True) -> Path:
    """A local copy of the files under `location` (a URI) for readers that need real files (torch.load, SQLite).

    Each file is fetched whole to a hidden name and renamed into place; a file already copied with the same
    size and modification time is not fetched again.
    """
    fs, root = storage(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    except (FileNotFoundError, NotADirectoryError):
        raise RayboneError(f"{location_text(location)}: no such folder") from None
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        local = target / posixpath.relpath(info.path, root)
        stamp = info.mtime_ns or 0
        if local.is_file() and local.stat().st_size == info.size and local.stat().st_mtime_ns == stamp:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        with fs.open_input_stream(info.path) as source, open(partial, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        os.utime(partial, ns=(stamp, stamp))
        os.replace(partial, local)
    return target


def study_dir(results_dir: str | PurePath, name: str) -> Path:
    """The local folder of an experiment's Optuna study (SQLite cannot live on an object store): the
    experiment folder itself for a local storage, `results/<name>/` (from the working directory) for a URI."""
    if is_uri(results_dir):
        return (LOCAL_RESULTS / name).absolute()
    return Path(location_text(results_dir)) / name
