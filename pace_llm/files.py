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
    """Yields a temporary folder that replaces `path` only when the block succeeds (its files
    synced first, so a power cut cannot leave the renamed folder with empty files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`."""
    folder = Path(folder)
    for path in [*folder.rglob("*"), folder]:
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` entirely or keeps its old content: a synced temporary sibling renamed
    onto it, then the folder synced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines log (metrics.jsonl). A torn last line (the writer was killed
    mid-write) is dropped; a bad line before the last is a ValueError naming file and line."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON row ({err.msg})") from None
    return rows


def truncate_rows(path: str | os.PathLike, after_step: int) -> int:
    """Drops the rows of `path` logged after step `after_step` (and a torn last line): a run
    resumed from that step's checkpoint logs them again. Returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_rows(path)
    kept = [r for r in rows if r.get("step", 0) <= after_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        write_atomic(path, text)
    return len(rows) - len(kept)


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


DEMO_MARKER = ".pace-llm-demo"


class OutputFolderError(ValueError):
    """A folder a demo would delete that is not its own."""


def exit_2_on_foreign_folder(run, *args, **kwargs) -> int:
    """A demo's `run(...)` as a command's exit status: an OutputFolderError is exit 2 with its
    message, before anything was deleted or prepared."""
    import sys

    try:
        return run(*args, **kwargs)
    except OutputFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def fresh_dir(path: str | os.PathLike) -> Path:
    """`path` emptied for a demo's new run and marked as the demo's (DEMO_MARKER)."""
    path = check_deletable(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / DEMO_MARKER).write_text("made by a pace-llm demo, which deletes this folder when it runs again\n")
    return path


def check_deletable(path: str | os.PathLike) -> Path:
    """`path` (resolved) when a demo may delete it: a demo starts fresh by deleting its last
    output, so it deletes only a folder it made. An existing non-empty folder without the
    marker, the checkout, the home folder, the root and any of their ancestors raise an
    OutputFolderError naming the folder."""
    path = Path(path).resolve()
    checkout = Path(__file__).resolve().parents[1]
    for keep in (checkout, Path.home().resolve(), Path(path.anchor)):
        if path == keep or path in keep.parents:
            raise OutputFolderError(
                f"{path} is {'the' if path == keep else 'an ancestor of the'} folder {keep}: "
                "a demo deletes its output folder first; choose a folder of its own"
            )
    # demo.log: a demo's output from before the marker existed (every demo writes it first)
    ours = (path / DEMO_MARKER).exists() or (path / "demo.log").exists()
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{path} is a file, not a folder: choose a folder for the demo's output")
    if path.exists() and any(path.iterdir()) and not ours:
        raise OutputFolderError(
            f"{path} exists and was not made by a pace-llm demo (no {DEMO_MARKER} in it): a demo deletes its "
            "output folder first, so remove it yourself or choose another folder"
        )
    return path
