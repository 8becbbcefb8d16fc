"""Files raybone reads and folders it writes, with two promises.

Reads: only regular files (never a FIFO, which would hang, or a device such as /dev/zero, which never ends),
and never more than a stated size.

Writes: a folder appears whole or not at all (built under a hidden sibling name, then renamed into place), and
raybone only ever replaces a folder it wrote itself. Each folder it writes carries a marker, `.raybone.json`,
listing its kind and its files. An existing target is replaced only if it is empty, or marked with the same
kind and holding nothing but the files the marker lists; `force=True` also replaces a marked folder that holds
other files or is of another kind. Anything else is refused with a one-line error naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from raybone.errors import RayboneError

MARKER = ".raybone.json"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


# ---------------------------------------------------------------- reading


def regular_file_size(path, limit: int, error: type[RayboneError] = RayboneError) -> int:
    """The size of `path` if it is a regular file of at most `limit` bytes; else `error('<path>: <reason>')`."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise error(f"{path}: cannot read file ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: is {_FILE_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a file")
    if info.st_size > limit:
        raise error(f"{path}: file is {info.st_size / 2**20:.0f} MiB; larger than the {limit / 2**20:.0f} MiB limit")
    return info.st_size


def read_regular_file(path, limit: int, error: type[RayboneError] = RayboneError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; else `error('<path>: <reason>')`."""
    regular_file_size(path, limit, error)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(f"{path}: cannot read file ({err.strerror or err})") from None
    if len(data) > limit:  # it grew since the check
        raise error(f"{path}: file is larger than the {limit / 2**20:.0f} MiB limit")
    return data


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class Legacy:
    """How raybone versions before the marker left a folder of some kind: a key file holding `needle`, and only
    the names in `files`. Such a folder is replaced like a marked one."""

    key: str
    needle: bytes
    files: frozenset[str]


def check_replaceable(target: Path, kind: str, force: bool = False, legacy: Legacy | None = None) -> None:
    """Refuse, with one line naming `target`, to write a `kind` folder where something raybone did not write is."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise RayboneError(f"{target}: exists and is not a folder; choose another output folder")
    present = _files(target)
    if not present:
        return
    found_kind, written = _written(target, legacy, kind)
    if found_kind is None:
        raise RayboneError(
            f"{target}: exists and was not written by raybone (it holds {_some(present)}); choose another output folder"
        )
    if force:
        return
    if found_kind != kind:
        raise RayboneError(
            f"{target}: holds a raybone {found_kind}, not a {kind}; choose another output folder "
            "or pass --force to replace it"
        )
    if foreign := sorted(present - written - {MARKER}):
        raise RayboneError(
            f"{target}: holds files raybone did not write ({_some(foreign)}); move them, choose "
            "another output folder, or pass --force to replace the folder"
        )


@contextmanager
def atomic_folder(
    target: Path,
    kind: str,
    *,
    force: bool = False,
    legacy: Legacy | None = None,
    keep_existing: Callable[[], bool] = lambda: False,
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces `target` in one rename.

    A crash leaves the previous `target` (or nothing), never half a folder; what a killed run left behind is
    removed by the next write of the same target. `keep_existing()` is asked just before the rename: True keeps
    what is there (another process finished the same folder first).
    """
    target = Path(target).absolute()
    check_replaceable(target, kind, force, legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    staging = target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        _mark(staging, kind)  # at once: a killed run's staging folder is then recognisably raybone's
        yield staging
        _mark(staging, kind, _files(staging) - {MARKER})
        if not (target.exists() and keep_existing()):
            check_replaceable(target, kind, force, legacy)  # again: someone may have written there meanwhile
            _replace(staging, target)
    except OSError as err:  # a full or read-only disk: name the folder the user asked for, not the staging one
        raise OSError(err.errno, err.strerror, str(target)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _mark(folder: Path, kind: str, files: set[str] = frozenset()) -> None:
    from raybone import __version__

    marker = {
        "kind": kind,
        "files": sorted(files),
        "raybone_version": __version__,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _written(folder: Path, legacy: Legacy | None, kind: str) -> tuple[str | None, set[str]]:
    """(kind, files raybone wrote there) from the marker or a legacy signature; (None, set()) if neither."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return str(marker["kind"]), set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if legacy is not None and _files(folder) <= legacy.files:
        try:
            if legacy.needle in (folder / legacy.key).read_bytes()[:65536]:
                return kind, set(legacy.files)
        except OSError:
            pass
    return None, set()


def _remove_leftovers(target: Path) -> None:
    """Staging folders of killed runs (their process is gone) and retired targets, when they carry the marker."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp-(?P<host>[\w-]+)-(?P<pid>\d+)|old)-[0-9a-f]{{8}}")
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if not match or not (sibling / MARKER).is_file():
            continue
        if match["pid"] is None or (match["host"] == _HOST and not _alive(int(match["pid"]))):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(staging: Path, target: Path) -> None:
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, retired)
    try:
        os.replace(staging, target)
    except OSError:
        if target.exists():  # another process published the same folder meanwhile: theirs is complete
            return
        if retired.exists():
            os.replace(retired, target)  # put the previous version back
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def write_file_atomically(path: Path, text: str) -> None:
    """Write a text file under a hidden name and rename it into place: never a half-written file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        partial.unlink(missing_ok=True)
