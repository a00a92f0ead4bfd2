"""Sweeps (pace_llm/sweep.py, launch/sweep.py): real Optuna on SQLite, real tiny training runs."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from trainrun import ROOT, env, metrics

SWEEP = ROOT / "launch" / "sweep.py"
FAST = ["deepspeed.zero_stage=0", "train.max_steps=4", "train.log_every=1"]


def sweep_command(sweep_dir: Path, recipe: str, *args: str) -> list[str]:
    return [
        sys.executable,
        str(SWEEP),
        recipe,
        *FAST,
        *args,
        "--sweep-dir",
        str(sweep_dir),
        "--heartbeat-interval",
        "1",
        "--grace-period",
        "3",
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # Its own process group: the kill test takes the worker and its training run down together.
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, log: Path, timeout: int = 240) -> str:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return log.read_text()


def trial_states(sweep_dir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(sweep_dir / "sweep.db") as db:
        return db.execute("select number, state from trials order by number").fetchall()


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read through Optuna (the study is named after the sweep folder)."""
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'sweep.db'}").trials


def launches(run_dir: Path) -> list[str]:
    """The training commands the sweep ran in this run's folder (train.log's '$ ...' lines)."""
    return [line for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_two_workers_split_a_2x2x2_grid_and_write_the_table(tmp_path):
    """Two workers started at once on one SQLite study run the 8 trials of a 2 x 2 grid x 2
    seeds between them, each exactly once, and write the mean ± std table; the metric is the
    classifier's eval_accuracy from the runs' own metrics.jsonl."""
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_command(
        sweep_dir,
        "recipes/tiny_cls.yaml",
        "--grid",
        "pace.lam=0.1,0.5",
        "pace.sigma=0.5,1",
        "--seeds",
        "0,1",
        "--metric",
        "eval_accuracy",
        "--direction",
        "max",
    )
    workers = [start(cmd, tmp_path / f"worker{i}.log") for i in range(2)]
    logs = [finish(w, tmp_path / f"worker{i}.log") for i, w in enumerate(workers)]

    started = [[line.split("start")[1].strip() for line in log.splitlines() if "] start" in line] for log in logs]
    assert all(started), f"a worker ran no trial: {started}"  # the grid was split
    assert (
        sorted(started[0] + started[1]) == sorted(set(started[0] + started[1])) and len(started[0] + started[1]) == 8
    ), started  # 8 distinct points, none run twice
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 8 and all(len(launches(r)) == 1 for r in runs)
    assert [state for _, state in trial_states(sweep_dir)] == ["COMPLETE"] * 8
    points = [t.user_attrs["point"] for t in trials(sweep_dir)]  # the point each trial was queued for
    assert len({tuple(p.values()) for p in points}) == 8
    assert all(
        {k: float(v) for k, v in t.params.items()} == {k: float(v) for k, v in t.user_attrs["point"].items()}
        for t in trials(sweep_dir)
    )  # and ran

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["trials_complete"] == 8 and len(summary["points"]) == 4
    assert [p["n"] for p in summary["points"]] == [2, 2, 2, 2]
    assert sum(p["best"] for p in summary["points"]) == 1
    best = next(p for p in summary["points"] if p["best"])
    assert best["mean"] == max(p["mean"] for p in summary["points"])
    for p in summary["points"]:
        assert 0 <= p["mean"] <= 1 and p["std"] >= 0
        for seed, value in p["values"].items():  # the table's numbers are the runs' last eval_accuracy
            point = {**p["params"], "train.seed": seed}
            run = sweep_dir / "runs" / ",".join(f"{k}={v}" for k, v in point.items())
            logged = [
                r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r
            ]
            assert logged[0]["step"] == 0 and logged[-1]["eval_accuracy"] == value
    table = (sweep_dir / "sweep.md").read_text()
    assert "| pace.lam | pace.sigma | eval_accuracy | n |" in table
    assert sum("**" in line for line in table.splitlines() if line.startswith("|")) == 1  # the best, in bold
    assert (sweep_dir / "heatmap.png").stat().st_size > 0


def test_four_workers_claim_every_point_of_a_finished_grid_exactly_once(tmp_path):
    """Claims under contention: the 24 runs are already done (a trial then only reads its run's
    metric), so four workers started at once claim trials back to back. Each point gets one
    trial, none a second or a trial without a point, and the table holds the runs' values."""
    sweep_dir = tmp_path / "sweep"
    grid = {"pace.lam": ["0.1", "0.2", "0.3", "0.4"], "pace.sigma": ["0.5", "1"], "train.seed": ["0", "1", "2"]}
    written = {}
    for i, combo in enumerate(itertools.product(*grid.values())):
        run = sweep_dir / "runs" / ",".join(f"{k}={v}" for k, v in zip(grid, combo))
        run.mkdir(parents=True)
        written[combo] = 1.0 + i / 100
        (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval_loss": written[combo]}) + "\n")
        (run / "run_status.json").write_text(json.dumps({"status": "done"}))
    cmd = sweep_command(sweep_dir, "recipes/tiny.yaml", "--grid", *(f"{k}={','.join(v)}" for k, v in grid.items()))
    workers = [start(cmd, tmp_path / f"worker{i}.log") for i in range(4)]
    logs = [finish(w, tmp_path / f"worker{i}.log") for i, w in enumerate(workers)]

    assert sum(log.count("] start") for log in logs) == 24
    assert [state for _, state in trial_states(sweep_dir)] == ["COMPLETE"] * 24
    claimed = sorted(tuple(t.user_attrs["point"].values()) for t in trials(sweep_dir))
    assert claimed == sorted(written)
    assert {tuple(t.user_attrs["point"].values()): t.value for t in trials(sweep_dir)} == written
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["trials_complete"] == 24 and [p["n"] for p in summary["points"]] == [3] * 8


@pytest.mark.slow
def test_killed_sweep_reruns_no_finished_trial_and_resumes_the_interrupted_one(tmp_path):
    """SIGKILL the sweep (worker + its training run) while its second of 3 trials runs: the
    rerun keeps the finished trial, continues the killed one from its own checkpoint, and runs
    the third, whose grid point the killed trial's retry must not take (its trial number does)."""
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_command(
        sweep_dir,
        "recipes/tiny.yaml",
        "train.max_steps=8",
        "train.save_every=2",
        "--grid",
        "pace.lam=0.1",
        "--seeds",
        "0,1,2",
    )
    worker = start(cmd, tmp_path / "first.log")
    deadline = time.time() + 200
    while True:  # wait until one run is done and the other has a checkpoint
        assert worker.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        runs = sorted((sweep_dir / "runs").glob("*")) if (sweep_dir / "runs").exists() else []
        done = [r for r in runs if (r / "run_status.json").exists()]
        busy = [r for r in runs if r not in done and (r / "checkpoints" / "latest").exists()]
        if done and busy:
            break
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    finished, killed = done[0], busy[0]
    assert not (killed / "run_status.json").exists()
    assert sorted(state for _, state in trial_states(sweep_dir)) == ["COMPLETE", "RUNNING"]

    log = finish(start(cmd, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    (third,) = set((sweep_dir / "runs").iterdir()) - {finished, killed}
    assert log.count("] start") == 2 and killed.name.replace(",", " ") in log  # the killed one and the third
    assert len(launches(finished)) == 1  # the finished run was not rerun
    first, again = launches(killed)
    assert "resume=false" in first and "resume=true" in again  # continued from its checkpoint
    steps = [r["step"] for r in metrics(killed)]
    assert steps[-1] == 8 and steps.count(1) == 1  # the resumed run did not start over
    assert len(launches(third)) == 1 and [r["step"] for r in metrics(third)][-1] == 8
    states = dict(trial_states(sweep_dir))
    assert sorted(states.values()) == ["COMPLETE"] * 3 + ["FAIL"]  # the killed one, retried
    (dead,) = [t for t in trials(sweep_dir) if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials(sweep_dir) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == [0, 1, 2]  # every point, once
    (retry,) = [t for t in complete if t.number > dead.number and t.params == dead.params]  # kept its point
    assert killed.name == ",".join(f"{k}={v}" for k, v in retry.user_attrs["point"].items())
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["trials_complete"] == 3 and summary["points"][0]["n"] == 3


@pytest.mark.slow
def test_a_killed_workers_training_run_checkpoints_and_stops(tmp_path):
    """SIGKILL the sweep worker alone (not its process group): its training child gets SIGTERM
    (PR_SET_PDEATHSIG), checkpoints and stops instead of training on unowned."""
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_command(sweep_dir, "recipes/tiny.yaml", "train.max_steps=400", "--grid", "pace.lam=0.1")
    worker = start(cmd, tmp_path / "worker.log")
    deadline = time.time() + 200
    while not list(sweep_dir.glob("runs/*/metrics.jsonl")):  # training has started
        assert worker.poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    (run,) = sweep_dir.glob("runs/*")
    while not (run / "run_status.json").exists():
        assert time.time() < deadline, (run / "train.log").read_text()[-3000:]
        time.sleep(0.2)
    assert json.loads((run / "run_status.json").read_text()) == {"status": "stopped"}
    assert metrics(run)[-1]["step"] < 400 and (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_run_stopped_on_a_signal_is_requeued_at_once_and_resumed(tmp_path):
    """A run that checkpoints and stops (train.stop_after: what SIGUSR1 / SIGTERM do) makes
    its worker re-queue the trial at once (no grace period, 60 s here, to wait out) and leave,
    cleanly; the next worker takes the retry and continues the run from its checkpoint."""
    sweep_dir = tmp_path / "sweep"
    cmd = [
        *sweep_command(sweep_dir, "recipes/tiny.yaml", "train.stop_after=2", "--grid", "pace.lam=0.1"),
        "--grace-period",
        "60",
    ]
    log = finish(start(cmd, tmp_path / "first.log"), tmp_path / "first.log")
    assert "stopped" in log and "re-queued" in log
    assert [state for _, state in trial_states(sweep_dir)] == ["FAIL", "WAITING"]
    (run,) = (sweep_dir / "runs").iterdir()
    assert json.loads((run / "run_status.json").read_text())["status"] == "stopped"

    log = finish(start(cmd, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert log.count("] start") == 1
    first, again = launches(run)
    assert "resume=false" in first and "resume=true" in again
    steps = [r["step"] for r in metrics(run)]
    assert steps[-1] == 4 and steps.count(1) == 1
    assert [state for _, state in trial_states(sweep_dir)] == ["FAIL", "COMPLETE"]
    assert json.loads((sweep_dir / "sweep.json").read_text())["trials_complete"] == 1


def test_slurm_array_dry_run_prints_each_tasks_command():
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "launch/slurm/sweep.sbatch"),
            "recipes/tiny.yaml",
            "--grid",
            "pace.lam=0.1,0.5",
            "--storage",
            "postgresql://db/pace",
        ],
        cwd=ROOT,
        env=env(PACE_DRY_RUN="1", SLURM_ARRAY_TASK_COUNT="3", SLURM_GPUS_ON_NODE="h100:4"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [line.split("]")[0] for line in out] == ["[array task 0", "[array task 1", "[array task 2"]
    for line in out:
        assert (
            "launch/sweep.py --launcher torchrun --nproc 4 recipes/tiny.yaml --grid pace.lam=0.1,0.5 "
            "--storage postgresql://db/pace" in line
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "eval_acc"], "--metric 'eval_acc': expected one of eval_loss, eval_accuracy"),
        (["--metric", "eval_accuracy"], "--metric eval_accuracy: a causal_lm run logs eval_loss, not accuracy"),
        (["data.eval=null", "--metric", "eval_loss"], "--metric eval_loss: the runs evaluate nothing"),
        (["--storage", "nosuchdb://user:secret@host/db"], "--storage nosuchdb://user:***@host/db: cannot open it"),
        (["output_dir=/tmp/elsewhere"], "output_dir and resume are the sweep's: each run goes to SWEEP_DIR/runs/"),
    ],
)
def test_a_sweep_that_cannot_work_stops_before_any_run(tmp_path, args, message):
    """Named, exit 2, before training anything (a wrong metric used to surface after a full run),
    and a storage password never printed."""
    head = [a for a in args if not a.startswith("--") and "=" in a]
    flags = [a for a in args if a not in head]
    cmd = sweep_command(tmp_path / "s", "recipes/tiny.yaml", *head, "--grid", "pace.lam=0.1", *flags)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "secret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "s" / "runs").exists()


def test_storage_urls_lose_their_password():
    from pace_llm.sweep import redact

    assert redact("postgresql://me:p@ss:w0rd@db.example/pace") == "postgresql://me:***@db.example/pace"
    assert redact("sqlite:////shared/sweep.db") == "sqlite:////shared/sweep.db"


def test_a_failed_heartbeat_is_reported_and_retried_not_fatal(tmp_path, capsys):
    """Optuna's heartbeat thread ends on its first exception; ours reports it and beats again."""
    from optuna.storages import RDBStorage

    from pace_llm.sweep import steady_heartbeats

    storage = steady_heartbeats(RDBStorage)(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    calls = []

    def flaky(self, trial_id):
        calls.append(trial_id)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    original, RDBStorage.record_heartbeat = RDBStorage.record_heartbeat, flaky
    try:
        storage.record_heartbeat(trial._trial_id)  # raises inside, reported
        storage.record_heartbeat(trial._trial_id)  # the next beat goes through
    finally:
        RDBStorage.record_heartbeat = original
    assert calls == [trial._trial_id] * 2
    assert f"heartbeat of trial {trial._trial_id} failed (RuntimeError: database is locked); retrying" in (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_retry_failed_reruns_a_crashed_trial_once_its_cause_is_fixed(tmp_path):
    """A run that crashed (here: its data file missing) is failed and not retried; once the file
    exists, --retry-failed queues it again and the worker completes it."""
    sweep_dir, data = tmp_path / "sweep", tmp_path / "train.jsonl"
    train, grid = [f"data.train={data}", "data.eval=null"], ["--grid", "pace.lam=0.1", "--metric", "loss"]
    cmd = sweep_command(sweep_dir, "recipes/tiny.yaml", *train, *grid)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert "FAILED" in proc.stdout + proc.stderr
    assert [state for _, state in trial_states(sweep_dir)] == ["FAIL"]
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(16)))
    proc = subprocess.run([*cmd, "--retry-failed"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "retrying crashed trials [0]" in proc.stdout
    assert sorted(state for _, state in trial_states(sweep_dir)) == ["COMPLETE", "FAIL"]
