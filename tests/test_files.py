"""pace_llm.files: folders written whole (atomic_dir) and built once (prepare_once)."""

import json
import multiprocessing
import time

import pytest

from pace_llm.files import MARKER, atomic_dir, prepare_once


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"  # the old folder survives a failed rewrite
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left


def test_prepare_once_builds_once_and_rebuilds_on_version(tmp_path):
    folder, calls = tmp_path / "thing", []

    def build(out):
        calls.append(out)
        (out / "data.txt").write_text(f"build {len(calls)}")
        return {"rows": 3}

    assert prepare_once(folder, build, version=1) == folder
    assert prepare_once(folder, build, version=1) == folder and len(calls) == 1
    marker = json.loads((folder / MARKER).read_text())
    assert marker["version"] == 1 and marker["rows"] == 3 and isinstance(marker["seconds"], float)
    assert list(marker)[:2] == ["version", "seconds"]  # the layout the existing caches have
    prepare_once(folder, build, version=2)
    assert len(calls) == 2 and (folder / "data.txt").read_text() == "build 2"
    assert json.loads((folder / MARKER).read_text())["version"] == 2


def test_prepare_once_failing_build_leaves_nothing(tmp_path):
    folder = tmp_path / "thing"

    def broken(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_once(folder, broken, version=1)
    assert not folder.exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no temporary folder either

    # an unmarked folder (a copy by hand, a crash before this scheme) is rebuilt, not trusted
    folder.mkdir()
    (folder / "junk").write_text("x")

    def build(out):
        (out / "ok").write_text("ok")

    prepare_once(folder, build, version=1)
    assert (folder / "ok").exists() and not (folder / "junk").exists()


def _slow_build_in_process(folder, log):
    def build(out):
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)  # long enough for the other process to reach the lock meanwhile
        return {}

    prepare_once(folder, build, version=1)


def test_prepare_once_concurrent_callers_build_once(tmp_path):
    folder, log = tmp_path / "thing", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_build_in_process, args=(folder, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n" and (folder / MARKER).exists()
