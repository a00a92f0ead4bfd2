"""pace_llm.files: folders written whole (atomic_dir) and built once (prepare_once)."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from pace_llm.files import (
    DEMO_MARKER,
    MARKER,
    OutputFolderError,
    atomic_dir,
    check_deletable,
    fresh_dir,
    prepare_once,
    read_rows,
    truncate_rows,
)


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


def test_a_demo_deletes_only_folders_it_made(tmp_path):
    """fresh_dir empties a folder it marked before (or a new or empty one) and refuses a folder of
    someone else's, the checkout, home, the root and their ancestors, naming the folder."""
    out = fresh_dir(tmp_path / "demo")
    (out / "old-result.json").write_text("{}")
    assert fresh_dir(out) == out and sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]
    (tmp_path / "empty").mkdir()
    fresh_dir(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputFolderError, match=f"{mine} exists and was not made by a pace-llm demo"):
        fresh_dir(mine)
    assert (mine / "thesis.tex").exists()
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        fresh_dir(mine / "thesis.tex")
    legacy = tmp_path / "demo-gsm8k"  # written by a demo before the marker existed
    legacy.mkdir()
    (legacy / "demo.log").write_text("...")
    assert list(fresh_dir(legacy).iterdir()) == [legacy / DEMO_MARKER]
    checkout = Path(__file__).resolve().parents[1]
    for folder in (checkout, checkout.parent, Path.home(), Path("/")):  # the check alone: nothing here may be deleted
        with pytest.raises(OutputFolderError, match="choose a folder of its own"):
            check_deletable(folder)
    assert (checkout / "README.md").exists()


class _Planted:
    def __reduce__(self):  # unpickling this would run code
        return (Path("/tmp/pace-llm-planted").write_text, ("ran",))


def test_checkpoint_rank_state_round_trips_as_data_and_runs_no_code(tmp_path):
    """pace_rank*.pt holds the RNG states and the PACE_fast cache as tensors and numbers, read
    back with weights_only=True; a file that needs code to unpickle is refused, unexecuted."""
    import random

    import numpy as np
    import torch

    from pace_llm.core.cache import OutputCache
    from pace_llm.distributed.deepspeed_engine import _rng_state, _set_rng_state, load_rank_state

    cache = OutputCache([2, 1], dim=3)
    cache.write([0, 1], torch.arange(9.0).view(3, 3))
    torch.save({"rng": _rng_state(), "cache": cache.state_dict()}, tmp_path / "pace_rank0.pt")
    drawn = (random.random(), np.random.randn(), torch.rand(1).item())
    state = load_rank_state(tmp_path / "pace_rank0.pt")
    _set_rng_state(state["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == drawn
    restored = OutputCache([2, 1], dim=3)
    assert restored.load_state_dict(state["cache"]) == 2 and torch.equal(restored.values, cache.values)

    Path("/tmp/pace-llm-planted").unlink(missing_ok=True)
    torch.save({"rng": _Planted()}, tmp_path / "pace_rank1.pt")
    with pytest.raises(RuntimeError, match="pace_rank1.pt holds more than tensors and numbers"):
        load_rank_state(tmp_path / "pace_rank1.pt")
    assert not Path("/tmp/pace-llm-planted").exists()


def test_metrics_rows_survive_a_torn_line_and_a_resume_drops_what_it_logs_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    assert read_rows(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert truncate_rows(path, after_step=1) == 1  # resumed from step 1's checkpoint
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a JSON row"):
        read_rows(path)
