"""Folders that appear whole or not at all.

Exports, the offline assets and the demos' pre-trained bases are folders that take seconds to
minutes to write and that other processes read by name. Writing them in place would let a
crash (or a second process starting meanwhile) leave a half-written folder that looks
finished, so each is written into a temporary sibling that is renamed onto the final name
once complete (`atomic_dir`). Prepared folders also carry a marker, written last, that says
which recipe version built them: `prepare_once` reuses a folder whose marker matches and
rebuilds it otherwise, under a file lock so that concurrent callers (two training ranks, two
test processes) wait for one build instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

MARKER = ".complete"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a temporary folder that replaces `path` only when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created if missing), released when the block ends."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_prepared(folder: Path, version: int) -> bool:
    """Whether `folder` holds a marker from a build of this `version`."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def prepare_once(
    folder: str | os.PathLike,
    build: Callable[[Path], dict | None],
    version: int,
    log: Callable[[str], None] | None = None,
) -> Path:
    """`folder`, built by `build(tmp_folder) -> metadata` unless already built at `version`.

    The marker `folder/.complete` holds {"version", "seconds", **metadata}; a missing marker
    or another version means a rebuild, which replaces the whole folder. A failing build
    leaves neither the folder nor a marker behind. `log` hears about finished builds.
    """
    folder = Path(folder)
    if is_prepared(folder, version):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_name(f".{folder.name}.lock")):
        if is_prepared(folder, version):  # another process finished it while we waited
            return folder
        with atomic_dir(folder) as tmp:
            start = time.time()
            info = build(tmp) or {}
            marker = {"version": version, "seconds": round(time.time() - start, 1), **info}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if log:
            log(f"{folder.name}: ready in {marker['seconds']} s -> {folder}")
    return folder
