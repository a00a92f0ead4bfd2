"""Grid sweeps over recipe overrides: every grid point x seed is one training run.

    python launch/sweep.py recipes/tiny_cls.yaml --grid pace.lam=0.1,0.5 pace.sigma=0.5,1 \\
        --seeds 0,1 --metric eval_accuracy --direction max

State lives in an Optuna study on a real database (`sqlite:///SWEEP_DIR/sweep.db` by
default, any SQLAlchemy URL so that many workers on many machines share one sweep), used
through Optuna's public API only:

- A grid point becomes a trial by `study.enqueue_trial(params, user_attrs={"point": ...})`,
  and `study.optimize(objective, n_trials=1)` pops it from the queue and runs it. Which point
  a trial runs is its own queued parameters, never its trial number, so a retry (a new trial
  with the old one's parameters) keeps its point and costs no other point its run.
- Workers claim one at a time, under a file lock in SWEEP_DIR (`.sweep.lock`): fail the dead
  workers' trials, then pop a waiting trial (a retry first), or queue the first point that has
  no trial yet and pop that; the lock is let go once the popped trial holds its parameters.
  Enqueuing is check-then-insert and SQLite has no SELECT ... FOR UPDATE, so without the lock
  two workers could queue or pop the same point. The lock file must be one file for all
  workers: with a database server, SWEEP_DIR on a shared filesystem (the runs live there too).
- A trial's run lives in SWEEP_DIR/runs/<its parameters>, so a rerun finds it: a COMPLETE
  trial is never rerun. A dead worker's trial stops beating (the storage's heartbeat, which
  `study.optimize` records): after the grace period `fail_stale_trials` fails it and the
  storage's RetryHeartbeatStaleTrialCallback queues its retry, which continues the run from
  its last checkpoint (resume=true). A run that checkpointed and stopped on a signal, or a
  worker interrupted mid-trial, re-queues the trial at once, with the same callback. A run
  that crashed is failed and not retried (it would crash again).
- A worker leaves when every grid point has a trial and none is waiting or running, so the
  last one to leave writes the complete table.
- The metric is the last value of --metric in the run's metrics.jsonl (eval_loss, or
  eval_accuracy for classifiers: both need data.eval).

Results: SWEEP_DIR/sweep.json and sweep.md (mean ± std over seeds per point, best marked),
and heatmap.png when the grid is pace.lam x pace.sigma (`write_sweep_results`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path

from pace_llm.config import RecipeError, eval_key, load_recipe
from pace_llm.distributed.launcher import LAUNCHERS, train_command
from pace_llm.files import file_lock, read_rows

SEED_KEY = "train.seed"
POINT_ATTR = "point"  # a trial's user attribute: its grid point, {key: value as given}
SURPLUS_ATTR = "surplus"  # a trial that was handed no grid point (failed at once, ignored)


class SweepError(RuntimeError):
    pass


class RunStopped(SweepError):
    """The run checkpointed and exited on a signal (Slurm time limit, preemption)."""


class TrainingFailed(SweepError):
    """The run crashed, or logged no usable metric: its trial fails and is not retried."""


class Surplus(SweepError):
    """A trial Optuna created outside the queue (no grid point to run): failed and ignored."""


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """["pace.lam=0.02,0.1", "pace.sigma=1"] -> {"pace.lam": ["0.02", "0.1"], "pace.sigma": ["1"]}.
    Values stay the strings the user wrote: they become `key=value` overrides and folder names."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise SweepError(f"--grid {spec!r}: expected section.key=v1,v2,...")
        if key in grid:
            raise SweepError(f"--grid {key} given twice")
        if len(set(items)) != len(items):
            raise SweepError(f"--grid {spec!r} repeats a value")
        grid[key] = items
    return grid


METRICS = ("eval_loss", "eval_accuracy", "loss", "task_loss")  # what a run's metrics.jsonl logs to select on


@dataclasses.dataclass
class Sweep:
    recipe: str
    overrides: list[str]
    grid: dict[str, list[str]]  # the swept keys, train.seed included (last)
    metric: str = "eval_loss"
    direction: str = "min"  # min | max
    sweep_dir: Path = Path("outputs/sweep")
    storage: str | None = None  # SQLAlchemy URL; default sqlite:///SWEEP_DIR/sweep.db
    study_name: str | None = None  # default: the sweep folder's name
    launcher: str = "python"
    nproc: int = 1
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a trial silent this long is dead: failed and re-queued
    quiet: bool = False

    def __post_init__(self):
        self.sweep_dir = Path(self.sweep_dir).resolve()
        if any(o.split("=", 1)[0] in ("output_dir", "resume") for o in self.overrides):
            raise SweepError(
                "output_dir and resume are the sweep's: each run goes to SWEEP_DIR/runs/<point>/ and resumes "
                "from its own checkpoint; choose the folder with --sweep-dir"
            )
        if self.direction not in ("min", "max"):
            raise SweepError(f"--direction {self.direction!r}: expected min or max")
        if self.launcher not in LAUNCHERS:
            raise SweepError(f"--launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        for flag, seconds in (("--heartbeat-interval", self.heartbeat_interval), ("--grace-period", self.grace_period)):
            if not isinstance(seconds, int) or seconds < 1:  # Optuna's storage takes whole seconds
                raise SweepError(f"{flag} {seconds!r}: expected a whole number of seconds >= 1")
        if SEED_KEY not in self.grid:
            self.grid[SEED_KEY] = [str(load_recipe(self.recipe, self.overrides).train.seed)]
        self.grid[SEED_KEY] = self.grid.pop(SEED_KEY)  # seeds last: folder names group by point
        self.storage = self.storage or f"sqlite:///{self.sweep_dir / 'sweep.db'}"
        self.study_name = self.study_name or self.sweep_dir.name

    # --- the grid ------------------------------------------------------------------------
    def search_space(self) -> dict[str, list]:
        """What Optuna stores: each value as the recipe reads it (0.1 a float, 0 an int), read
        from the recipe the value is set in (the first point that has it)."""
        return self.typed_grid

    @functools.cached_property
    def typed_grid(self) -> dict[str, list]:
        first = {key: values[0] for key, values in self.grid.items()}
        space = {}
        for key, values in self.grid.items():
            typed = []
            for value in values:
                read = eval_key(self.load({**first, key: value}), key)
                # Optuna's categorical choices are scalars; anything else stays as written
                typed.append(read if isinstance(read, (str, int, float, bool, type(None))) else value)
            if len(set(map(repr, typed))) != len(typed):
                raise SweepError(f"--grid {key}={','.join(values)}: two values read as the same {typed}")
            space[key] = typed
        return space

    def points(self) -> list[dict[str, str]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]

    def raw(self, params: dict) -> dict[str, str]:
        """Optuna's parameter values back to the strings given on the command line."""
        space = self.search_space()
        return {key: self.grid[key][space[key].index(params[key])] for key in self.grid}

    def typed(self, point: dict[str, str]) -> dict:
        """A point's parameters as Optuna stores them (search_space's values)."""
        space = self.search_space()
        return {key: space[key][self.grid[key].index(point[key])] for key in self.grid}

    def run_dir(self, point: dict[str, str]) -> Path:
        name = ",".join(f"{key}={value}" for key, value in point.items()).replace("/", "_")
        return self.sweep_dir / "runs" / name

    def load(self, point: dict[str, str]):
        """The recipe of one point (keys and types checked)."""
        try:
            return load_recipe(self.recipe, self.overrides + [f"{k}={v}" for k, v in point.items()])
        except RecipeError as err:
            raise SweepError(f"grid point {point}: {err}") from None

    def check(self) -> None:
        """Every point's recipe loads (keys and types checked), and its runs will log the
        metric, before anything runs."""
        if self.metric not in METRICS:
            raise SweepError(f"--metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        for point in self.points():
            recipe = self.load(point)
            if self.metric.startswith("eval_") and not recipe.data.eval:
                raise SweepError(f"--metric {self.metric}: the runs evaluate nothing (set data.eval)")
            if self.metric == "eval_accuracy" and recipe.model.task == "causal_lm":
                raise SweepError("--metric eval_accuracy: a causal_lm run logs eval_loss, not accuracy")
        self.search_space()

    # --- one run -------------------------------------------------------------------------
    def command(self, point: dict[str, str], resume: bool) -> list[str]:
        overrides = [
            *self.overrides,
            *(f"{k}={v}" for k, v in point.items()),
            f"output_dir={self.run_dir(point)}",
            f"resume={'true' if resume else 'false'}",
        ]
        return train_command(self.launcher, self.recipe, overrides, nproc=self.nproc)


def read_metric(run_dir: Path, metric: str) -> float:
    """The last logged value of `metric` in the run's metrics.jsonl (the end-of-training eval)."""
    path = run_dir / "metrics.jsonl"
    values = [row[metric] for row in read_rows(path) if metric in row]
    if not values:
        raise TrainingFailed(f"{path} logs no {metric} (eval_loss needs data.eval; eval_accuracy a classifier)")
    return float(values[-1])


def run_status(run_dir: Path) -> str:
    """done | stopped (checkpointed on a signal) | none, as launch/train.py wrote it."""
    status = run_dir / "run_status.json"
    return json.loads(status.read_text()).get("status", "none") if status.exists() else "none"


def run_done(run_dir: Path) -> bool:
    return run_status(run_dir) == "done"


def _stop_with_parent() -> None:
    """In the training child: SIGTERM when the sweep worker dies (Linux PR_SET_PDEATHSIG), so a
    killed worker's run checkpoints and exits instead of training on while the trial's retry
    starts the same folder (the folder lock would refuse the retry; this ends the orphan)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the orphan finishes its run on its own
        pass


def train(sweep: Sweep, point: dict[str, str]) -> float:
    """Train one point (or continue it from its checkpoint) and return its metric. A run that
    finished before its worker died is only read."""
    run_dir = sweep.run_dir(point)
    if not run_done(run_dir):
        resume = (run_dir / "checkpoints" / "latest").exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = sweep.command(point, resume)
        with open(run_dir / "train.log", "a") as log:
            # a run killed mid-line (a progress bar has no newline) must not swallow this one
            ends_mid_line = log.tell() > 0 and (run_dir / "train.log").read_bytes()[-1:] != b"\n"
            log.write(("\n" if ends_mid_line else "") + "$ " + " ".join(command) + "\n")
            log.flush()
            proc = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_with_parent
            )  # in the caller's folder, as a direct launch would be
        # the run's own status, not the exit code: torchrun exits non-zero after forwarding a
        # signal, and run_status.json is removed when an attempt starts, so "stopped" is this one's
        if run_status(run_dir) == "stopped":
            raise RunStopped(f"{run_dir.name} checkpointed and stopped on a signal")
        if proc.returncode != 0 or not run_done(run_dir):
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise TrainingFailed(f"training {run_dir.name} exited {proc.returncode}; end of its train.log:\n{tail}")
    value = read_metric(run_dir, sweep.metric)
    if math.isnan(value):  # Optuna would fail the trial too, but silently
        raise TrainingFailed(f"{run_dir.name}: its last {sweep.metric} is nan")
    return value


# --- the study -----------------------------------------------------------------------------
@contextlib.contextmanager
def _experimental_ok():
    """Heartbeats, fail_stale_trials and the stale-trial retry are marked experimental in
    Optuna (they warn on every use); they are what this module is built on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _lock_path(sweep: Sweep) -> Path:
    return sweep.sweep_dir / ".sweep.lock"


def steady_heartbeats(storage_class):
    """`storage_class` whose heartbeat survives a failed write. Optuna beats from a thread that
    ends on the first exception, silently: one database hiccup and the trial looks dead after
    the grace period, so another worker retries it while it still trains. Here a failed beat is
    printed and the next one tried on schedule."""

    class SteadyHeartbeats(storage_class):
        def record_heartbeat(self, trial_id: int) -> None:
            try:
                super().record_heartbeat(trial_id)
            except Exception as err:  # noqa: BLE001 (any storage error: the beat is retried)
                print(
                    f"[sweep] heartbeat of trial {trial_id} failed ({type(err).__name__}: {err}); retrying", flush=True
                )

    return SteadyHeartbeats


def redact(url: str) -> str:
    """A storage URL without its password: postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+:)[^/]*@", r"\1***@", url)  # up to the last @ before the path


def open_study(sweep: Sweep):
    """The sweep's study, created by the first worker and loaded by the others, on a storage
    that records heartbeats and queues a retry of every trial whose heartbeat went stale."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by run_worker
    sqlite = sweep.storage.startswith("sqlite")
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    # Two workers creating the same SQLite file's tables at once can collide: one at a time.
    with file_lock(_lock_path(sweep)), _experimental_ok():
        try:
            storage = steady_heartbeats(optuna.storages.RDBStorage)(
                sweep.storage,
                heartbeat_interval=sweep.heartbeat_interval,
                grace_period=sweep.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                # a worker waits for another's write (SQLite locks the whole file) instead of failing
                engine_kwargs={"connect_args": {"timeout": 120}} if sqlite else None,
            )
        except Exception as err:  # noqa: BLE001 (SQLAlchemy's URL, driver and connection errors, all named here)
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SweepError(f"--storage {redact(sweep.storage)}: cannot open it ({message})") from None
        # The values come from the queue: the sampler is never asked for one (a trial created
        # outside the queue is failed before it suggests anything).
        study = optuna.create_study(
            storage=storage,
            study_name=sweep.study_name,
            load_if_exists=True,
            direction="minimize" if sweep.direction == "min" else "maximize",
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
    saved = study.user_attrs.get("grid")
    if saved is not None and saved != sweep.grid:
        raise SweepError(
            f"study {sweep.study_name!r} in {redact(sweep.storage)} was started with the grid {saved}, "
            f"not {sweep.grid}: use another --sweep-dir or --study"
        )
    study.set_user_attr("grid", sweep.grid)  # the same value from every worker: no race to lose
    study.set_user_attr("metric", sweep.metric)
    return study


def point_of(sweep: Sweep, trial) -> dict[str, str] | None:
    """The grid point a trial (Trial or FrozenTrial) runs: its queued `point` user attribute,
    else (a study an earlier version of this module started) its parameters; None for a trial
    that has neither, or a point of another grid."""
    point = trial.user_attrs.get(POINT_ATTR)
    if point is not None:
        return {key: point[key] for key in sweep.grid} if set(point) == set(sweep.grid) else None
    if set(trial.params) != set(sweep.grid):
        return None
    try:
        return sweep.raw(trial.params)
    except ValueError:
        return None


def _key(sweep: Sweep, point: dict[str, str]) -> tuple[str, ...]:
    return tuple(point[key] for key in sweep.grid)


def _claim_next(sweep: Sweep, study) -> str:
    """Under the claim lock: "run" when a trial waits in the queue for this worker (a retry,
    or the first point without a trial, queued now), "wait" when none does but others' trials
    run (they finish, or go stale and come back as retries), "done" when every point has had
    its trial ("again": look once more, see below)."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with _experimental_ok():
        fail_stale_trials(study)  # dead workers' trials -> FAIL; the storage's callback queues retries
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    taken = _taken(sweep, trials)
    for point in sweep.points():
        if _key(sweep, point) in taken:
            continue
        study.enqueue_trial(sweep.typed(point), user_attrs={POINT_ATTR: point}, skip_if_exists=True)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return "run"
        # Not queued (skip_if_exists found a trial with its parameters) or already popped: by
        # another worker since we looked, which only a lock file the workers do not share
        # allows (look again), or by a trial that point_of cannot read (an error, or this loop
        # would never end).
        if _key(sweep, point) not in _taken(sweep, study.get_trials(deepcopy=False)):
            raise SweepError(
                f"study {sweep.study_name!r} holds a trial with the parameters of "
                f"{_label(point)} that is not this sweep's: use another --sweep-dir or --study"
            )
        return "again"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def _taken(sweep: Sweep, trials) -> set[tuple[str, ...]]:
    """The grid points that have a trial: done, running, crashed (not rerun), or stale and
    retried. Counted by point, not by trial: a retry is a second trial of its point."""
    return {
        _key(sweep, p) for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and (p := point_of(sweep, t)) is not None
    }


def _requeue(study, number: int) -> None:
    """Queue a retry of trial `number` if it failed: what the storage does for a stale trial,
    done at once for a trial whose run stopped or whose worker was interrupted."""
    import optuna
    from optuna.trial import TrialState

    (trial,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if trial.state == TrialState.FAIL:
        with _experimental_ok():
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)


def retry_failed(sweep: Sweep) -> list[int]:
    """Queue a retry of every crashed trial whose grid point has no finished, running or queued
    trial (a crash is not retried by default: it would crash again; after its cause is fixed,
    e.g. a run killed for memory, this is the way back). Returns the retried trial numbers."""
    from optuna.trial import TrialState

    study = open_study(sweep)
    trials = study.get_trials(deepcopy=False)
    alive = {_key(sweep, p) for t in trials if t.state != TrialState.FAIL and (p := point_of(sweep, t))}
    retried = []
    for t in trials:
        point = point_of(sweep, t)
        if t.state == TrialState.FAIL and point is not None and not t.user_attrs.get(SURPLUS_ATTR):
            if _key(sweep, point) not in alive:
                _requeue(study, t.number)
                alive.add(_key(sweep, point))
                retried.append(t.number)
    return retried


def run_worker(sweep: Sweep, n_trials: int | None = None) -> dict:
    """Run trials until none is left (or `n_trials` were run here); returns the summary,
    written to sweep.json / sweep.md from what the study holds now."""
    sweep.check()
    study = open_study(sweep)
    n_points, ran = len(sweep.points()), 0
    while n_trials is None or ran < n_trials:
        current: dict = {}  # what the objective got: the trial number, its point, its value
        with contextlib.ExitStack() as claim:
            claim.enter_context(file_lock(_lock_path(sweep)))
            step = _claim_next(sweep, study)
            if step == "run":
                # study.optimize pops the queued trial, records its heartbeat while it runs and
                # tells its result; the objective lets the claim lock go once the popped trial
                # is RUNNING with its parameters set.
                try:
                    study.optimize(
                        lambda trial: _objective(sweep, trial, claim, current),  # noqa: B023 (runs now)
                        n_trials=1,
                        catch=(TrainingFailed, Surplus),
                    )
                except BaseException as err:
                    claim.close()
                    if "number" in current:  # its run stopped, or this worker is being stopped
                        _requeue(study, current["number"])
                    if not isinstance(err, RunStopped):
                        raise
                    _say(sweep, f"[trial {current['number']}] stopped: {err}; re-queued, this worker leaves")
                    break
        if step == "done":
            break
        if step == "again":
            continue
        if step == "wait":
            time.sleep(sweep.heartbeat_interval)
            continue
        if "number" not in current:  # a surplus trial: nothing ran
            continue
        ran += 1
        if "value" in current:
            _say(
                sweep,
                f"[trial {current['number']}] done   {_label(current['point'])}  "
                f"{sweep.metric}={current['value']:.4f}  ({_completed(sweep, study)}/{n_points} complete)",
            )
    summary = summarize(sweep, study)
    write_sweep_results(sweep, summary)
    return summary


def _objective(sweep: Sweep, trial, claim: contextlib.ExitStack, current: dict) -> float:
    point = point_of(sweep, trial)
    if point is None:
        # Created by ask() with an empty queue: only if the claim lock did not hold (two
        # machines without a shared lock file). Failed, marked, and ignored by the results.
        trial.set_user_attr(SURPLUS_ATTR, True)
        claim.close()
        raise Surplus(f"trial {trial.number} was handed no grid point")
    space = sweep.search_space()
    for key, value in sweep.typed(point).items():
        if trial.suggest_categorical(key, space[key]) != value:  # the queued values, checked
            raise SweepError(f"trial {trial.number}: {key} is not {point[key]}, the value its point says")
    claim.close()
    current.update(number=trial.number, point=point)
    _say(sweep, f"[trial {trial.number}] start  {_label(point)}")
    try:
        current["value"] = train(sweep, point)
    except TrainingFailed as err:  # a crashed run: failed, not retried (it would crash again)
        _say(sweep, f"[trial {trial.number}] FAILED {_label(point)}\n{err}")
        raise
    return current["value"]


def _completed(sweep: Sweep, study) -> int:
    """Grid points with a COMPLETE trial."""
    from optuna.trial import TrialState

    return len(
        {
            _key(sweep, p)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (p := point_of(sweep, t)) is not None
        }
    )


def _label(point: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in point.items())


def _say(sweep: Sweep, line: str) -> None:
    if not sweep.quiet:
        print(line, flush=True)


# --- results -------------------------------------------------------------------------------
def summarize(sweep: Sweep, study) -> dict:
    """Mean ± std over seeds per grid point, from the study's COMPLETE trials."""
    from optuna.trial import TrialState

    values: dict[tuple, dict[str, float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        point = point_of(sweep, t)
        if point is None:
            continue
        seed = point.pop(SEED_KEY)
        values.setdefault(tuple(point.items()), {})[seed] = t.value
    keys = [k for k in sweep.grid if k != SEED_KEY]
    rows = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        by_seed = values.get(tuple(zip(keys, combo)), {})
        scores = list(by_seed.values())
        rows.append(
            {
                "params": dict(zip(keys, combo)),
                "values": by_seed,
                "n": len(scores),
                "mean": statistics.fmean(scores) if scores else None,
                "std": statistics.stdev(scores) if len(scores) > 1 else (0.0 if scores else None),
            }
        )
    scored = [r for r in rows if r["mean"] is not None]
    best = (min if sweep.direction == "min" else max)(scored, key=lambda r: r["mean"]) if scored else None
    for r in rows:
        r["best"] = r is best
    return {
        "recipe": sweep.recipe,
        "overrides": sweep.overrides,
        "metric": sweep.metric,
        "direction": sweep.direction,
        "grid": sweep.grid,
        "storage": redact(sweep.storage),  # sweep.json is shared and committed: no password
        "study": sweep.study_name,
        "trials_complete": sum(r["n"] for r in rows),
        "trials_total": len(sweep.points()),
        "points": rows,
        "best": best["params"] if best else None,
    }


def markdown(summary: dict) -> str:
    keys = [k for k in summary["grid"] if k != SEED_KEY]
    seeds = summary["grid"][SEED_KEY]
    lines = [
        f"{summary['metric']} ({summary['direction']}), mean ± std over seeds {', '.join(seeds)}; "
        f"{summary['trials_complete']}/{summary['trials_total']} runs complete; ** = best",
        "",
        "| " + " | ".join(keys + [summary["metric"], "n"]) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for r in summary["points"]:
        score = "–" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
        if r["best"]:
            score = f"**{score}**"
        lines.append("| " + " | ".join([r["params"][k] for k in keys] + [score, str(r["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_results(sweep: Sweep, summary: dict) -> None:
    """sweep.json, sweep.md and (a pace.lam x pace.sigma grid) heatmap.png in the sweep folder."""
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (sweep.sweep_dir / "sweep.md").write_text(table)
    if [k for k in summary["grid"] if k != SEED_KEY] == ["pace.lam", "pace.sigma"] or [
        k for k in summary["grid"] if k != SEED_KEY
    ] == ["pace.sigma", "pace.lam"]:
        heatmap(summary, sweep.sweep_dir / "heatmap.png")
    _say(sweep, "\n" + table + f"\nwritten: {sweep.sweep_dir / 'sweep.json'}, {sweep.sweep_dir / 'sweep.md'}")


def heatmap(summary: dict, png: Path) -> Path:
    """Mean metric over λ (rows) x σ (columns); the best cell outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams, sigmas = summary["grid"]["pace.lam"], summary["grid"]["pace.sigma"]
    cell = {(r["params"]["pace.lam"], r["params"]["pace.sigma"]): r for r in summary["points"]}
    grid = [[math.nan if cell[(lam, s)]["mean"] is None else cell[(lam, s)]["mean"] for s in sigmas] for lam in lams]
    fig, ax = plt.subplots(figsize=(1.2 * len(sigmas) + 2.5, 0.9 * len(lams) + 1.8))
    image = ax.imshow(grid, cmap="viridis_r" if summary["direction"] == "min" else "viridis")
    fig.colorbar(image, ax=ax, label=summary["metric"])
    for i, lam in enumerate(lams):
        for j, s in enumerate(sigmas):
            r = cell[(lam, s)]
            if r["mean"] is not None:
                red, green, blue, _ = image.cmap(image.norm(r["mean"]))
                ink = "black" if 0.3 * red + 0.6 * green + 0.1 * blue > 0.5 else "white"  # readable on its cell
                ax.text(
                    j,
                    i,
                    f"{r['mean']:.3f}\n±{r['std']:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=ink,
                    fontweight="bold" if r["best"] else "normal",
                )
            if r["best"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(sigmas)), sigmas)
    ax.set_yticks(range(len(lams)), lams)
    ax.set_xlabel("σ (pace.sigma)")
    ax.set_ylabel("λ (pace.lam)")
    ax.set_title(f"{summary['metric']} ({summary['direction']}) over seeds")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
