"""Grid sweeps over recipe overrides: every grid point x seed is one training run.

    python launch/sweep.py recipes/tiny_cls.yaml --grid pace.lam=0.1,0.5 pace.sigma=0.5,1 \\
        --seeds 0,1 --metric eval_accuracy --direction max

State lives in an Optuna study on a real database (`sqlite:///SWEEP_DIR/sweep.db` by
default, any SQLAlchemy URL so that many workers on many machines share one sweep):

- Trial k of the study is grid point k (Optuna's GridSampler maps trial number to grid
  id, and the storage numbers trials atomically), so workers started at once split the grid
  without running a point twice; a retry (below) keeps its point under a later number, and
  the points that number skipped are handed out after the first N trials. SQLite gets BEGIN
  IMMEDIATE transactions so that its claims are as atomic as PostgreSQL's / MySQL's
  SELECT ... FOR UPDATE (which it lacks).
- A trial's run lives in SWEEP_DIR/runs/<its parameters>, so a rerun finds it: a COMPLETE
  trial is never rerun; a trial whose worker died (its heartbeat stops) is failed after the
  grace period and re-queued by Optuna's RetryHeartbeatStaleTrialCallback, and its retry
  continues the run from its last checkpoint (resume=true). A worker leaves only when every
  grid point has a trial and none is waiting or running, so the last one to leave writes the
  complete table.
- The metric is the last value of --metric in the run's metrics.jsonl (eval_loss, or
  eval_accuracy for classifiers: both need data.eval).

Results: SWEEP_DIR/sweep.json and sweep.md (mean ± std over seeds per point, best marked),
and heatmap.png when the grid is pace.lam x pace.sigma.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import threading
import time
import warnings
from pathlib import Path

from pace_llm.config import RecipeError, _yaml, load_recipe
from pace_llm.files import file_lock
from pace_llm.distributed.launcher import train_command

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"
SEED_KEY = "train.seed"
LAUNCHERS = ("python", "deepspeed", "torchrun")


class SweepError(RuntimeError):
    pass


class RunStopped(SweepError):
    """The run checkpointed and exited on a signal (Slurm time limit, preemption)."""


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


@dataclasses.dataclass
class Sweep:
    recipe: str
    overrides: list[str]
    grid: dict[str, list[str]]          # the swept keys, train.seed included (last)
    metric: str = "eval_loss"
    direction: str = "min"              # min | max
    sweep_dir: Path = Path("outputs/sweep")
    storage: str | None = None          # SQLAlchemy URL; default sqlite:///SWEEP_DIR/sweep.db
    study_name: str | None = None       # default: the sweep folder's name
    launcher: str = "python"
    nproc: int = 1
    heartbeat_interval: int = 30        # seconds between a running trial's heartbeats
    grace_period: int = 120             # a trial silent this long is dead: failed and re-queued
    quiet: bool = False

    def __post_init__(self):
        self.sweep_dir = Path(self.sweep_dir).resolve()
        if self.direction not in ("min", "max"):
            raise SweepError(f"--direction {self.direction!r}: expected min or max")
        if self.launcher not in LAUNCHERS:
            raise SweepError(f"--launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if SEED_KEY not in self.grid:
            self.grid[SEED_KEY] = [str(load_recipe(self.recipe, self.overrides).train.seed)]
        self.grid[SEED_KEY] = self.grid.pop(SEED_KEY)  # seeds last: folder names group by point
        self.storage = self.storage or f"sqlite:///{self.sweep_dir / 'sweep.db'}"
        self.study_name = self.study_name or self.sweep_dir.name

    # --- the grid ------------------------------------------------------------------------
    def search_space(self) -> dict[str, list]:
        """What Optuna stores: the values as the recipe reads them (0.1 a float, 0 an int)."""
        return {key: [_yaml(v) for v in values] for key, values in self.grid.items()}

    def points(self) -> list[dict[str, str]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]

    def raw(self, params: dict) -> dict[str, str]:
        """Optuna's parameter values back to the strings given on the command line."""
        space = self.search_space()
        return {key: self.grid[key][space[key].index(params[key])] for key in self.grid}

    def run_dir(self, point: dict[str, str]) -> Path:
        name = ",".join(f"{key}={value}" for key, value in point.items()).replace("/", "_")
        return self.sweep_dir / "runs" / name

    def check(self) -> None:
        """Every point's recipe loads (keys and types checked) before anything runs."""
        for point in self.points():
            try:
                load_recipe(self.recipe, self.overrides + [f"{k}={v}" for k, v in point.items()])
            except RecipeError as err:
                raise SweepError(f"grid point {point}: {err}") from None

    # --- one run -------------------------------------------------------------------------
    def command(self, point: dict[str, str], resume: bool) -> list[str]:
        overrides = [*self.overrides, *(f"{k}={v}" for k, v in point.items()),
                     f"output_dir={self.run_dir(point)}", f"resume={'true' if resume else 'false'}"]
        return train_command(self.launcher, self.recipe, overrides, script=TRAIN_SCRIPT, nproc=self.nproc)


def read_metric(run_dir: Path, metric: str) -> float:
    """The last logged value of `metric` in the run's metrics.jsonl (the end-of-training eval)."""
    path = run_dir / "metrics.jsonl"
    values = [row[metric] for row in map(json.loads, path.read_text().splitlines()) if metric in row]
    if not values:
        raise SweepError(f"{path} logs no {metric} (eval_loss needs data.eval; eval_accuracy a classifier)")
    return float(values[-1])


def run_status(run_dir: Path) -> str:
    """done | stopped (checkpointed on a signal) | none, as launch/train.py wrote it."""
    status = run_dir / "run_status.json"
    return json.loads(status.read_text()).get("status", "none") if status.exists() else "none"


def run_done(run_dir: Path) -> bool:
    return run_status(run_dir) == "done"


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
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  env=env)  # in the caller's folder, as a direct launch would be
        if proc.returncode == 0 and run_status(run_dir) == "stopped":
            raise RunStopped(f"{run_dir.name} checkpointed and stopped on a signal")
        if proc.returncode != 0 or not run_done(run_dir):
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise SweepError(f"training {run_dir.name} exited {proc.returncode}; end of its train.log:\n{tail}")
    return read_metric(run_dir, sweep.metric)


# --- the study -----------------------------------------------------------------------------
def open_study(sweep: Sweep):
    import optuna
    from sqlalchemy import event

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats, their stale-trial retry and ask/tell with them are marked experimental, and
    # Optuna expects heartbeats under study.optimize: this module records its own (heartbeat()).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    sqlite = sweep.storage.startswith("sqlite")
    if sqlite:
        sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    # Two workers creating the same SQLite file's tables at once can collide: one at a time.
    with file_lock(sweep.sweep_dir / ".storage.lock") if sqlite else contextlib.nullcontext():
        storage = optuna.storages.RDBStorage(
            sweep.storage, heartbeat_interval=sweep.heartbeat_interval, grace_period=sweep.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            engine_kwargs={"connect_args": {"timeout": 120}} if sqlite else None)
        if sqlite:
            _immediate_transactions(storage.engine, event)
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, load_if_exists=True,
                                    direction="minimize" if sweep.direction == "min" else "maximize",
                                    sampler=grid_sampler(sweep.search_space()))
    saved = study.user_attrs.get("grid")
    if saved is not None and saved != sweep.grid:
        raise SweepError(f"study {sweep.study_name!r} in {sweep.storage} was started with the grid {saved}, "
                         f"not {sweep.grid}: use another --sweep-dir or --study")
    study.set_user_attr("grid", sweep.grid)  # the same value from every worker: no race to lose
    study.set_user_attr("metric", sweep.metric)
    return study, storage


def _immediate_transactions(engine, event) -> None:
    """SQLite has no SELECT ... FOR UPDATE, so Optuna's check-then-set claims (a waiting
    trial -> RUNNING, a stale trial -> FAIL) could both succeed in two processes. Starting
    every transaction with BEGIN IMMEDIATE takes the write lock first: the second one sees
    the first one's result (SQLAlchemy's documented pysqlite recipe)."""
    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks would not run them


def grid_sampler(search_space: dict):
    """Optuna's GridSampler (trial k -> grid point k) without the stop() its after_trial calls
    once the grid is covered: stop() works only inside study.optimize, and here the worker
    loop decides when to stop."""
    from optuna.samplers import GridSampler

    class GridPoints(GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridPoints(search_space, seed=0)


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: int):
    """Record the trial's heartbeat every `interval` s while the block runs."""
    stop = threading.Event()

    def beat():
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_worker(sweep: Sweep, n_trials: int | None = None) -> dict:
    """Run trials until none is left (or `n_trials` were run here); returns the summary,
    written to sweep.json / sweep.md from what the study holds now."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    sweep.check()
    study, storage = open_study(sweep)
    n_points, ran = len(sweep.points()), 0
    while n_trials is None or ran < n_trials:
        fail_stale_trials(study)  # dead workers' trials -> FAIL, re-queued as WAITING
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(_points_taken(trials)) >= n_points:  # every grid point has had its trial
            if any(t.state == TrialState.RUNNING for t in trials):
                time.sleep(sweep.heartbeat_interval)  # others' trials: finish, or go stale and come back
                continue
            break
        trial = study.ask()
        if _surplus(trial, study.get_trials(deepcopy=False)):
            # Its grid point already has a trial: another worker took that point (or the last
            # waiting retry) between our look and our ask. Closed at once, marked, and ignored
            # by the results and by _points_taken.
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        space = sweep.search_space()
        point = sweep.raw({key: trial.suggest_categorical(key, space[key]) for key in sweep.grid})
        ran += 1
        _say(sweep, f"[trial {trial.number}] start  {_label(point)}")
        try:
            with heartbeat(storage, trial._trial_id, sweep.heartbeat_interval):
                value = train(sweep, point)
        except RunStopped as err:
            # Not a failure: the trial is left as it is, goes stale, and its retry resumes it.
            _say(sweep, f"[trial {trial.number}] stopped: {err}; this worker leaves")
            break
        except SweepError as err:  # a crashed run: failed, not retried (it would crash again)
            study.tell(trial, state=TrialState.FAIL)
            _say(sweep, f"[trial {trial.number}] FAILED {_label(point)}\n{err}")
            continue
        study.tell(trial, value)
        _say(sweep, f"[trial {trial.number}] done   {_label(point)}  {sweep.metric}={value:.4f}  "
                    f"({_completed(study)}/{n_points} complete)")
    summary = summarize(sweep, study)
    write_results(sweep, summary)
    return summary


def _points_taken(trials) -> set[int]:
    """The grid points (GridSampler's grid_id) that have a trial: done, running, waiting, or
    crashed (not rerun). Not the number of trials: a trial a dead worker left goes FAIL and its
    retry keeps its point under a trial number of its own, and GridSampler gives trial k the
    point k, so counting trials would end the sweep with points never run."""
    return {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs and not t.user_attrs.get("surplus")}


def _surplus(trial, trials) -> bool:
    """A new trial (not a retry) whose point an earlier trial already holds."""
    mine = next(t for t in trials if t.number == trial.number)
    if "failed_trial" in mine.system_attrs:
        return False
    return any(t.system_attrs.get("grid_id") == mine.system_attrs["grid_id"] and t.number < trial.number
               and not t.user_attrs.get("surplus") for t in trials)


def _completed(study) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


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
        point = sweep.raw(t.params)
        seed = point.pop(SEED_KEY)
        values.setdefault(tuple(point.items()), {})[seed] = t.value
    keys = [k for k in sweep.grid if k != SEED_KEY]
    rows = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        by_seed = values.get(tuple(zip(keys, combo)), {})
        scores = list(by_seed.values())
        rows.append({"params": dict(zip(keys, combo)), "values": by_seed, "n": len(scores),
                     "mean": statistics.fmean(scores) if scores else None,
                     "std": statistics.stdev(scores) if len(scores) > 1 else (0.0 if scores else None)})
    scored = [r for r in rows if r["mean"] is not None]
    best = (min if sweep.direction == "min" else max)(scored, key=lambda r: r["mean"]) if scored else None
    for r in rows:
        r["best"] = r is best
    return {"recipe": sweep.recipe, "overrides": sweep.overrides, "metric": sweep.metric,
            "direction": sweep.direction, "grid": sweep.grid, "storage": sweep.storage,
            "study": sweep.study_name, "trials_complete": sum(r["n"] for r in rows),
            "trials_total": len(sweep.points()), "points": rows,
            "best": best["params"] if best else None}


def markdown(summary: dict) -> str:
    keys = [k for k in summary["grid"] if k != SEED_KEY]
    seeds = summary["grid"][SEED_KEY]
    lines = [f"{summary['metric']} ({summary['direction']}), mean ± std over seeds {', '.join(seeds)}; "
             f"{summary['trials_complete']}/{summary['trials_total']} runs complete; ** = best", "",
             "| " + " | ".join(keys + [summary["metric"], "n"]) + " |",
             "|" + "---|" * (len(keys) + 2)]
    for r in summary["points"]:
        score = "–" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
        if r["best"]:
            score = f"**{score}**"
        lines.append("| " + " | ".join([r["params"][k] for k in keys] + [score, str(r["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_results(sweep: Sweep, summary: dict) -> None:
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (sweep.sweep_dir / "sweep.md").write_text(table)
    if [k for k in summary["grid"] if k != SEED_KEY] == ["pace.lam", "pace.sigma"] or \
            [k for k in summary["grid"] if k != SEED_KEY] == ["pace.sigma", "pace.lam"]:
        heatmap(summary, sweep.sweep_dir / "heatmap.png")
    _say(sweep, "\n" + table + f"\nwritten: {sweep.sweep_dir / 'sweep.json'}, {sweep.sweep_dir / 'sweep.md'}")


def heatmap(summary: dict, png: Path) -> Path:
    """Mean metric over λ (rows) x σ (columns); the best cell outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams, sigmas = summary["grid"]["pace.lam"], summary["grid"]["pace.sigma"]
    cell = {(r["params"]["pace.lam"], r["params"]["pace.sigma"]): r for r in summary["points"]}
    grid = [[math.nan if cell[(l, s)]["mean"] is None else cell[(l, s)]["mean"] for s in sigmas] for l in lams]
    fig, ax = plt.subplots(figsize=(1.2 * len(sigmas) + 2.5, 0.9 * len(lams) + 1.8))
    image = ax.imshow(grid, cmap="viridis_r" if summary["direction"] == "min" else "viridis")
    fig.colorbar(image, ax=ax, label=summary["metric"])
    for i, l in enumerate(lams):
        for j, s in enumerate(sigmas):
            r = cell[(l, s)]
            if r["mean"] is not None:
                red, green, blue, _ = image.cmap(image.norm(r["mean"]))
                ink = "black" if 0.3 * red + 0.6 * green + 0.1 * blue > 0.5 else "white"  # readable on its cell
                ax.text(j, i, f"{r['mean']:.3f}\n±{r['std']:.3f}", ha="center", va="center", fontsize=8,
                        color=ink, fontweight="bold" if r["best"] else "normal")
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
