"""Folders that appear whole or not at all: built under a temporary sibling name, then renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: Path, keep_existing: Callable[[], bool] = lambda: False) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces `target` in one rename.

    A crash leaves the previous `target` (or nothing), never half a folder. `keep_existing()` is asked just
    before the rename: True keeps what is there (another process finished the same folder first).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if not (target.exists() and keep_existing()):
            _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
