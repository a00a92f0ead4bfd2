"""The checkpoint folder's rules, without training: one run per output folder, a commit that
never leaves `latest` naming a missing or partial checkpoint, pruning that spares `latest`'s
target, and what a killed save leaves tidied by the next run (2-rank saves and resumes:
test_train.py)."""

import subprocess
import sys

import pytest
from trainrun import ROOT, env

from pace_llm.config import RecipeError
from pace_llm.distributed.deepspeed_engine import commit, lock_output_dir


def checkpoint(root, name, step_file="model"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / step_file).write_text(name)
    return folder


def test_commit_resaves_a_tag_and_prunes_by_step_sparing_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (8, 12, 100):
        checkpoint(root, f"step-{step:08d}")
    tmp = checkpoint(root, "step-00000012.tmp-1-2", "new")
    commit(root, tmp, "step-00000012", keep=1)  # a re-save of 12: latest, though older than 100
    assert (root / "latest").read_text() == "step-00000012"
    assert (root / "step-00000012" / "new").exists() and not (root / "step-00000012" / "model").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000012", "step-00000100"]


def test_the_next_run_tidies_what_a_killed_save_left(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint(root, "step-00000004")
    checkpoint(root, "step-00000008.tmp-77-1")  # killed while writing
    checkpoint(root, "step-00000004.old-77-2")  # killed mid re-save after the new one landed
    checkpoint(root, "step-00000012.old-77-3")  # killed mid re-save before it landed: latest's target
    (root / "latest").write_text("step-00000012")
    lock = lock_output_dir(tmp_path)
    lock.close()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000012"]
    assert (root / "step-00000012" / "model").read_text() == "step-00000012.old-77-3"


def test_one_run_per_output_folder(tmp_path):
    """A second run into a folder another run holds stops before any work, naming the holder."""
    lock = lock_output_dir(tmp_path)
    with pytest.raises(RecipeError, match=r"is in use by another run \(pid \d+ on "):
        lock_output_dir(tmp_path)  # the same process, another open file: flock refuses it too
    cmd = [sys.executable, "launch/train.py", "recipes/tiny.yaml", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"output_dir {tmp_path} is in use by another run" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    lock.close()
    lock_output_dir(tmp_path).close()  # free again
