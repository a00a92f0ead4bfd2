"""The study of issue #13 item 5: plain LoRA vs noise only vs PACE full vs PACE fast, each at
the λ, σ it does best with on a validation split, then compared over paired seeds on test data.

    python bench/study.py                      # everything (hours: see --dry-run); rerun the same command to resume
    python bench/study.py --dry-run            # the plan: budget, runs and estimated hours per dataset, commands
    python bench/study.py --summary            # tables from the runs finished so far, no training
    python bench/study.py --only polarity_n64  # some datasets: polarity_n64, polarity_n256, fashion, smollm2_gsm
    python bench/study.py --smoke              # 1 grid point, 1 + 2 seeds, 2 steps per run, every dataset

For each dataset and arm (lora: pace.mode=off; noise: pace.mode=noise over σ; full and fast:
pace.mode=full / fast over λ x σ), with the budget in DATASETS below:
1. sweep: launch/sweep.py over the arm's grid x the sweep seeds, scored on the recipe's
   validation split (data.eval, carved from the training pool), in OUT/<dataset>/sweep-<arm>/
   (sweep.md, heatmap.png; each run's merged/ is deleted once the sweep is done: adapter/ stays);
2. selection: the best point whose every seed finished (mean over seeds; ties: lower eval_loss);
3. paired seeds: launch/sweep.py again, the selected point as a one-point grid over the final
   seeds (new seeds, not those it was selected on) with data.eval = the test split, in
   OUT/<dataset>/final-<arm>/. A seed draws the same training set (data.sample), adapter and head
   initialisation and data order in every arm, so arm - LoRA differences are paired;
4. SmolLM2 only: the `#### N` rate of each paired-seed run's merged model (eval/gsm8k.py, vLLM);
5. tables: RESULTS/study_<dataset>.{json,md} (mean, std, paired differences vs LoRA, sign counts,
   paired t-test and exact sign test), the λ x σ heatmaps, and RESULTS/study.md over all datasets.

Runs are single processes with one thread each (pace_llm/demos/pace_vs_lora.py says why); --jobs
of them run side by side: a job runs one sweep worker at a time, and two jobs share one sweep's
storage when nothing else is ready (the sweep splits its trials between its workers). Progress:
one line per finished run. Everything resumes: rerunning the command skips finished sweeps, runs
and evaluations, and a run killed mid-way continues from its checkpoint once the sweep's grace
period (--grace-period s) has passed. Pause: start it under setsid and kill its process group,
`kill -TERM -- -$(cat OUT/study.pgid)` (runs checkpoint on SIGTERM); rerun the command to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import common  # bench/common.py: this script's folder is first on sys.path

from pace_llm.distributed.launcher import launch_env
from pace_llm.files import read_rows
from pace_llm.sweep import SEED_KEY, Sweep, run_done

ROOT = common.ROOT


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: its fixed overrides and the grid its sweep selects from (one point: no choice)."""

    name: str
    overrides: tuple[str, ...]
    grid: dict[str, tuple[str, ...]]

    def runs(self, d: Dataset) -> int:
        """Training runs: grid points x sweep seeds, plus the final seeds."""
        return math.prod(len(v) for v in self.grid.values()) * len(d.sweep_seeds) + len(d.final_seeds)


def paper_arms(lams: tuple[str, ...], sigmas: tuple[str, ...]) -> tuple[Arm, ...]:
    """LoRA, noise over σ, PACE full and fast over λ x σ (the consistency: the recipe's)."""
    return (
        Arm("lora", (), {"pace.mode": ("off",)}),
        Arm("noise", ("pace.mode=noise",), {"pace.sigma": sigmas}),
        Arm("full", ("pace.mode=full",), {"pace.lam": lams, "pace.sigma": sigmas}),
        Arm("fast", ("pace.mode=fast",), {"pace.lam": lams, "pace.sigma": sigmas}),
    )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset's budget. `prepare()` -> (overrides for every run: model and data paths, test
    split path); `run_seconds`: one run per arm (and one `#### N` evaluation) on the 2-core
    machine with another run beside it (the estimate of --dry-run)."""

    name: str
    recipe: str
    metric: str  # selected on (validation split); also the test table's first metric
    direction: str  # max | min
    arms: tuple[Arm, ...]  # the first is the baseline the others are paired with
    sweep_seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]
    prepare: Callable[[], tuple[list[str], Path]]
    run_seconds: dict[str, float]
    smoke: tuple[str, ...] = ()  # overrides of --smoke runs
    gsm_eval: bool = False  # `#### N` rate of the final runs (vLLM)
    probes: bool = False  # bench/forgetting.py on the final runs (forgetting, FP-distance)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def prepare_polarity() -> tuple[list[str], Path]:
    from pace_llm import assets

    pool, val, test = assets.polarity_split()
    return [f"model.name={assets.minilm_dir()}", f"data.train={rel(pool)}", f"data.eval={rel(val)}"], test


def prepare_fashion() -> tuple[list[str], Path]:
    import torch

    from pace_llm import assets
    from pace_llm.demos import fashion as demo_fashion  # the demo's pre-trained base ViT and its data

    torch.set_num_threads(1)
    folder = assets.cache_dir() / "demo-fashion"
    base = demo_fashion.prepare_base(folder / demo_fashion.BASE_NAME)
    pool, val, test = demo_fashion.prepare_splits(folder)
    return [f"model.name={rel(base)}", f"data.train={rel(pool)}", f"data.eval={rel(val)}"], test


def prepare_gsm() -> tuple[list[str], Path]:
    from pace_llm import assets

    pool, val, test = assets.gsm_symbolic_val_files()
    return [f"model.name={rel(assets.smollm2_dir())}", f"data.train={rel(pool)}", f"data.eval={rel(val)}"], test


CLASSIFIER_ARMS = paper_arms(lams=("0.05", "0.2", "1"), sigmas=("0.5", "1", "1.5"))
PAIRED = dict(sweep_seeds=(0, 1), final_seeds=(100, 101, 102, 103, 104))
# The budget: grids of at most 9 points x 2 seeds, then 5 (SmolLM2: 2) new paired seeds per arm;
# the steps are the recipes'. run_seconds: one run as measured on the shared 2-core machine with
# another run beside it (2026-12-02: polarity n=256 LoRA 186 s for 160 steps, full 287 s; fashion
# LoRA 55 s for 200 steps, full 95 s; SmolLM2 ~22 s a LoRA step, ~48 s a full one, + ~100 s).
DATASETS = {
    d.name: d
    for d in [
        Dataset(
            "polarity_n64",
            "recipes/study/polarity_n64.yaml",
            "eval_accuracy",
            "max",
            CLASSIFIER_ARMS,
            **PAIRED,
            prepare=prepare_polarity,
            run_seconds=dict(lora=125, noise=130, fast=130, full=190),
            smoke=("train.max_steps=2", "data.sample=16", "data.eval_limit=32"),
        ),
        Dataset(
            "polarity_n256",
            "recipes/study/polarity_n256.yaml",
            "eval_accuracy",
            "max",
            CLASSIFIER_ARMS,
            **PAIRED,
            prepare=prepare_polarity,
            run_seconds=dict(lora=215, noise=225, fast=225, full=330),
            smoke=("train.max_steps=2", "data.sample=16", "data.eval_limit=32"),
        ),
        Dataset(
            "fashion",
            "recipes/study/fashion.yaml",
            "eval_accuracy",
            "max",
            CLASSIFIER_ARMS,
            **PAIRED,
            prepare=prepare_fashion,
            run_seconds=dict(lora=85, noise=90, fast=90, full=160),
            smoke=("train.max_steps=2", "data.sample=10", "train.micro_batch_size=5", "data.eval_limit=32"),
        ),
        Dataset(
            "smollm2_gsm",
            "recipes/study/smollm2_gsm.yaml",
            "eval_loss",
            "min",
            paper_arms(lams=("0.003", "0.03"), sigmas=("0.5", "1")),
            sweep_seeds=(0, 1),
            final_seeds=(100, 101),
            prepare=prepare_gsm,
            run_seconds=dict(lora=420, noise=440, fast=450, full=900, gsm_eval=270),
            smoke=("train.max_steps=2", "data.sample=4", "data.eval_limit=4"),
            gsm_eval=True,
        ),
        Dataset(  # #23: the calibrated forms, NEFTune, overfitting LoRA, forgetting (recipe header)
            "smollm2_gsm_forms",
            "recipes/study/smollm2_gsm_forms.yaml",
            "eval_loss",
            "min",
            (
                Arm("lora", (), {"pace.mode": ("off",)}),
                Arm("neftune", ("pace.mode=off",), {"train.neftune_alpha": ("5", "15")}),
                Arm("noise", ("pace.mode=noise",), {"pace.sigma": ("0.5", "1")}),
                *(
                    Arm(
                        f"{mode}_{form.split('_')[0]}",
                        (f"pace.mode={mode}", f"pace.consistency={form}"),
                        {"pace.lam": lams},
                    )
                    for mode in ("full", "fast")
                    for form, lams in (("centred_mse", ("0.3", "3", "30")), ("kl", ("2", "20", "200")))
                ),
            ),
            sweep_seeds=(0,),
            final_seeds=(100, 101, 102),
            prepare=prepare_gsm,
            run_seconds=dict(
                lora=480,
                neftune=480,
                noise=500,
                fast_centred=540,
                fast_kl=560,
                full_centred=1000,
                full_kl=1000,
                gsm_eval=270,
                probe=60,
            ),
            smoke=("train.max_steps=2", "data.sample=4", "data.eval_limit=4", "train.eval_every=0"),
            gsm_eval=True,
            probes=True,
        ),
    ]
}


def rel(path) -> str:
    """A path inside the checkout as a relative one (runs start in the checkout)."""
    path = Path(os.path.abspath(path))  # not resolve(): .cache may be a link out of the checkout
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def smoke_budget(d: Dataset) -> Dataset:
    arms = tuple(dataclasses.replace(a, grid={k: v[:1] for k, v in a.grid.items()}) for a in d.arms)
    return dataclasses.replace(d, arms=arms, sweep_seeds=(0,), final_seeds=(100, 101))


# --- the plan --------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Where things go and the commands that make them."""

    out: Path  # runs: OUT/<dataset>/{sweep,final}-<arm>/
    results: Path  # tables
    smoke: bool
    grace_period: int
    inputs: dict = dataclasses.field(default_factory=dict)  # dataset -> (overrides, test path)
    retry_failed: bool = False  # the sweeps re-run crashed trials (after a fixed cause, e.g. memory)

    def overrides(self, d: Dataset) -> list[str]:
        return [*self.inputs[d.name][0], *(d.smoke if self.smoke else ())]

    def sweep_dir(self, d: Dataset, phase: str, arm: str) -> Path:
        return self.out / d.name / f"{phase}-{arm}"

    def sweep(self, d: Dataset, phase: str, arm: str) -> tuple[Sweep, list[str]]:
        """(the pace_llm Sweep, for its run folders; the launch/sweep.py command) of a phase."""
        extra, grid = list(d.arm(arm).overrides), {k: list(v) for k, v in d.arm(arm).grid.items()}
        seeds = d.sweep_seeds
        if phase == "final":
            grid = {k: [v] for k, v in self.selected(d, arm).items()}
            extra, seeds = [*extra, f"data.eval={rel(self.inputs[d.name][1])}"], d.final_seeds
        overrides = [*self.overrides(d), *extra]
        full_grid = {**grid, SEED_KEY: [str(s) for s in seeds]}
        sweep = Sweep(
            d.recipe,
            overrides,
            full_grid,
            metric=d.metric,
            direction=d.direction,
            sweep_dir=self.sweep_dir(d, phase, arm),
            quiet=True,
        )
        cmd = [
            sys.executable,
            "launch/sweep.py",
            d.recipe,
            *overrides,
            "--grid",
            *(f"{k}={','.join(v)}" for k, v in grid.items()),
            "--seeds",
            ",".join(map(str, seeds)),
            "--metric",
            d.metric,
            "--direction",
            d.direction,
            "--sweep-dir",
            rel(sweep.sweep_dir),
            "--launcher",
            "python",
            "--grace-period",
            str(self.grace_period),
            *(["--retry-failed"] if self.retry_failed else []),
        ]
        return sweep, cmd

    def selected(self, d: Dataset, arm: str) -> dict[str, str]:
        """The arm's best grid point on the validation split (mean over seeds), among the points
        whose every seed finished; ties go to the lower mean eval_loss. RuntimeError, naming the
        sweep, when it has not run or no point finished."""
        sweep, _ = self.sweep(d, "sweep", arm)
        path = sweep.sweep_dir / "sweep.json"
        if not path.exists():
            raise RuntimeError(f"{path} does not exist: the {arm} sweep has not run")
        summary = json.loads(path.read_text())
        seeds = summary["grid"][SEED_KEY]
        complete = [p for p in summary["points"] if p["n"] == len(seeds)]
        if not complete:
            raise RuntimeError(f"{path}: no grid point finished all its seeds")
        sign = 1 if d.direction == "max" else -1

        def tie_break(p):  # lower eval_loss first (the selection metric itself when it is eval_loss)
            return -statistics.fmean(last(sweep.run_dir({**p["params"], SEED_KEY: s}), "eval_loss") for s in seeds)

        return max(complete, key=lambda p: (sign * p["mean"], tie_break(p)))["params"]


def label(params: dict[str, str], short: bool = False) -> str:
    """{"pace.lam": "0.2"} -> "pace.lam=0.2" (short: "lam=0.2")."""
    return " ".join(f"{k.split('.')[-1] if short else k}={v}" for k, v in params.items())


def last(run_dir: Path, key: str) -> float:
    """The last logged value of `key` in a run's metrics.jsonl."""
    values = [row[key] for row in read_rows(run_dir / "metrics.jsonl") if key in row]
    if not values:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} logs no {key}")
    return values[-1]


# --- running: tasks on --jobs threads --------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Task:
    name: str
    run: Callable[[int], bool]  # worker index -> success
    deps: list[Task] = dataclasses.field(default_factory=list)
    max_workers: int = 2
    workers: int = 0
    state: str = "todo"  # todo | done | failed


def run_tasks(tasks: list[Task], jobs: int, say) -> None:
    """Each of `jobs` threads takes the first ready task nobody works on, else joins a ready
    task below its max_workers, else waits for a task to end. A task whose dependency failed
    fails without running."""
    cond = threading.Condition()

    def pick() -> Task | None:
        for t in tasks:
            if t.state == "todo" and any(dep.state == "failed" for dep in t.deps):
                t.state = "failed"
                say(f"{t.name}: skipped (a task it needs failed)")
        ready = [t for t in tasks if t.state == "todo" and all(dep.state == "done" for dep in t.deps)]
        return next((t for t in ready if t.workers == 0), None) or next(
            (t for t in ready if t.workers < t.max_workers), None
        )

    def worker(index: int) -> None:
        while True:
            with cond:
                while (task := pick()) is None and any(t.state == "todo" for t in tasks):
                    cond.wait()
                if task is None:
                    return
                task.workers += 1
            try:
                ok = task.run(index)
            except Exception as err:  # noqa: BLE001 (one task's failure must not stop the others)
                say(f"{task.name}: FAILED: {type(err).__name__}: {err}")
                ok = False
            with cond:  # one worker's clean exit is enough: a sweep worker leaves when no trial is left
                task.workers -= 1
                if task.state == "todo":
                    task.state = "done" if ok else "failed"
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Study:
    def __init__(self, plan: Plan, datasets: list[Dataset], jobs: int):
        self.plan, self.datasets, self.jobs = plan, datasets, jobs
        self.started, self.lock = time.time(), threading.Lock()
        self.total_runs = sum(runs_of(d) for d in datasets)

    def say(self, line: str) -> None:
        elapsed = int(time.time() - self.started)
        with self.lock:
            clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}"
            print(f"[study {clock} {self.runs_done()}/{self.total_runs} runs] {line}", flush=True)

    def runs_done(self) -> int:
        """Finished runs of this study's datasets (an earlier --only run's stay out of the count)."""
        return sum(run_done(run) for d in self.datasets for run in (self.plan.out / d.name).glob("*/runs/*"))

    def env(self, **extra: str) -> dict:
        """One thread per process; this checkout's pace_llm in every subprocess."""
        env = launch_env(threads=1, **extra)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env

    def sweep_task(self, d: Dataset, phase: str, arm: str) -> Callable[[int], bool]:
        def run(worker: int) -> bool:
            sweep, cmd = self.plan.sweep(d, phase, arm)
            if phase == "final":
                self.say(f"{d.name}/{phase}-{arm}: selected {label(self.plan.selected(d, arm))}")
            log = sweep.sweep_dir / f"worker{worker}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    if line.startswith("[trial") and (" done " in line or "FAILED" in line):
                        self.say(f"{d.name}/{phase}-{arm} {line.strip()}")
                proc.wait()
            if proc.returncode != 0:
                self.say(f"{d.name}/{phase}-{arm}: launch/sweep.py exited {proc.returncode} (see {log})")
                return False
            if phase == "sweep":  # base + adapter/ is the merged model; SmolLM2's is 540 MB a run
                for merged in sweep.sweep_dir.glob("runs/*/merged"):
                    shutil.rmtree(merged, ignore_errors=True)
            return True

        return run

    def per_final_run(self, d: Dataset, arm: str, result: str, log_name: str, command, report):
        """A task that runs `command(out)` -> (argv, env) on each of the arm's paired-seed runs
        that has its merged model and no `result` file yet (a rerun skips what is done), its
        output appended to `log_name` in the run folder; `report(result's JSON)` is the line said."""

        def run(worker: int) -> bool:
            sweep, _ = self.plan.sweep(d, "final", arm)
            for point in sweep.points():
                out = sweep.run_dir(point)
                if (out / result).exists() or not (out / "merged").exists():
                    continue
                cmd, env = command(out)
                with open(out / log_name, "a") as fh:
                    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    self.say(f"{d.name}/final-{arm}: {cmd[1]} exited {rc} (see {out / log_name})")
                    return False
                self.say(f"{d.name}/final-{arm}: {out.name}: {report(json.loads((out / result).read_text()))}")
            return True

        return run

    def gsm_eval_task(self, d: Dataset, arm: str) -> Callable[[int], bool]:
        def command(out: Path):
            cmd = [
                sys.executable,
                "eval/gsm8k.py",
                "--model",
                rel(out / "merged"),
                "--data",
                rel(self.plan.inputs[d.name][1]),
                "--backend",
                "vllm",
                "--max-new-tokens",
                "32" if self.plan.smoke else "256",
                "--output",
                rel(out / "gsm8k.json"),
                "--quiet",
                *(["--limit", "2"] if self.plan.smoke else []),
            ]
            env = self.env(
                VLLM_CPU_KVCACHE_SPACE="1",
                VLLM_ENABLE_V1_MULTIPROCESSING="0",
                VLLM_CPU_OMP_THREADS_BIND="nobind",  # one thread, as bench/eval_throughput.py
                TMPDIR=str(out),
            )  # vLLM's sockets: a folder of its own
            return cmd, env

        return self.per_final_run(
            d, arm, "gsm8k.json", "gsm8k_eval.log", command, lambda r: f"#### N rate {r['strict_format_rate']:.2f}"
        )

    def probe_task(self, d: Dataset, arm: str) -> Callable[[int], bool]:
        completions = self.plan.out / d.name / "generic_completions.json"  # made once, shared by the runs

        def command(out: Path):
            return [
                sys.executable,
                "bench/forgetting.py",
                "--run",
                rel(out),
                "--completions",
                rel(completions),
            ], self.env()

        def report(probe: dict) -> str:
            return (
                f"polarity NLL {probe['polarity_nll']:.4f}, KL to base {probe['kl_to_base']:.4g}, "
                f"FP-distance {probe['fp_distance']:.4g}"
            )

        return self.per_final_run(d, arm, "probe.json", "probe.log", command, report)

    def tasks(self) -> list[Task]:
        """Per dataset, in this order: the sweeps, the paired seeds (each after its arm's sweep),
        the probes, the `#### N` evaluations; each the baseline arm first (every comparison
        needs it), then the longest first (so that the jobs end together)."""
        tasks = []
        for d in self.datasets:
            rest = sorted(d.arms[1:], key=lambda a: -d.run_seconds[a.name])
            order = [d.arms[0].name, *(a.name for a in rest)]
            sweeps = {arm: Task(f"{d.name}/sweep-{arm}", self.sweep_task(d, "sweep", arm)) for arm in order}
            finals = {
                arm: Task(f"{d.name}/final-{arm}", self.sweep_task(d, "final", arm), [sweeps[arm]]) for arm in order
            }
            tasks += [*sweeps.values(), *finals.values()]
            if d.probes:
                tasks += [
                    Task(f"{d.name}/probe-{arm}", self.probe_task(d, arm), [finals[arm]], max_workers=1)
                    for arm in order
                ]
            if d.gsm_eval:
                tasks += [
                    Task(f"{d.name}/gsm8k-{arm}", self.gsm_eval_task(d, arm), [finals[arm]], max_workers=1)
                    for arm in order
                ]
        return tasks

    def run(self) -> None:
        tasks = self.tasks()
        self.say(
            f"{len(tasks)} tasks, {self.total_runs} runs ({self.runs_done()} done), {self.jobs} side by side; "
            f"runs in {self.plan.out}"
        )
        run_tasks(tasks, self.jobs, self.say)
        failed = [t.name for t in tasks if t.state != "done"]
        self.say("all tasks done" if not failed else f"failed or skipped: {', '.join(failed)}")


def runs_of(d: Dataset) -> int:
    return sum(a.runs(d) for a in d.arms)


def estimate_hours(d: Dataset, jobs: int) -> float:
    per_final = d.run_seconds.get("gsm_eval", 0) * d.gsm_eval + d.run_seconds.get("probe", 0) * d.probes
    evals = len(d.arms) * len(d.final_seeds) * per_final
    return (sum(a.runs(d) * d.run_seconds[a.name] for a in d.arms) + evals) / jobs / 3600


# --- statistics ------------------------------------------------------------------------------
def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p of Student's t with integer df (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ·(cosθ + 2/3 cos³θ + ...))
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        inside = 2 / math.pi * (theta + s * total)
    else:  # even: sinθ·(1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1 - inside))


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test (ties dropped): 2 P(X <= min) for X ~ Binomial(n, 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(arm: dict[int, float], base: dict[int, float], higher_better: bool) -> dict:
    """arm - base over the seeds both have: mean, std, better/worse/tie counts, paired t-test
    and sign-test p (t-test: None under 2 pairs; a zero spread with a nonzero mean gives p = 0)."""
    seeds = sorted(arm.keys() & base.keys())
    diffs = [arm[s] - base[s] for s in seeds]
    better = sum((x > 0) == higher_better and x != 0 for x in diffs)
    worse = sum(x != 0 for x in diffs) - better
    out = {
        "seeds": seeds,
        "diffs": diffs,
        "n": len(diffs),
        "better": better,
        "worse": worse,
        "ties": len(diffs) - better - worse,
        "sign_p": sign_test_p(better, worse),
        "mean": statistics.fmean(diffs) if diffs else None,
        "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "t_p": None,
    }
    if len(diffs) > 1:
        sd = out["std"]
        out["t_p"] = (
            (1.0 if out["mean"] == 0 else 0.0)
            if sd == 0
            else t_two_sided_p(out["mean"] / (sd / math.sqrt(len(diffs))), len(diffs) - 1)
        )
    return out


# --- tables ----------------------------------------------------------------------------------
METRICS = {  # per dataset kind: (key in a final run's results, label, better: "higher" | "lower" | None, scale)
    "classifier": [
        ("eval_accuracy", "test accuracy %", "higher", 100),
        ("eval_loss", "test NLL", "lower", 1),
        ("train_loss_end", "train loss at end", None, 1),
    ],
    "gsm": [
        ("eval_loss", "held-out answer loss", "lower", 1),
        ("eval_loss_min", "its minimum", "lower", 1),
        ("train_loss_end", "train loss at end", None, 1),
        ("gap", "held-out − train", "lower", 1),
        ("strict_format_rate", "#### N rate %", "higher", 100),
        ("accuracy", "accuracy %", "higher", 100),
        ("polarity_nll", "polarity NLL", "lower", 1),
        ("kl_to_base", "KL to base", "lower", 1),
        ("fp_distance", "FP-distance", "lower", 1),
        ("grad_norm", "grad norm", None, 1),
        ("consistency_grad_ratio", "grad ratio", None, 1),
    ],
}


def final_results(plan: Plan, d: Dataset, arm: str) -> dict[int, dict]:
    """seed -> {metric: value} of the arm's finished paired-seed runs: the held-out metrics at
    the end (and the loss's minimum over the evaluations), train loss over the last 10% of steps,
    means of the logged gradient norm and consistency/task gradient ratio, the probes."""
    try:
        sweep, _ = plan.sweep(d, "final", arm)
    except RuntimeError:
        return {}
    results = {}
    for point in sweep.points():
        out = sweep.run_dir(point)
        if not run_done(out):
            continue
        rows = read_rows(out / "metrics.jsonl")
        series = {k: [r[k] for r in rows if k in r] for k in ("eval_loss", "eval_accuracy", "task_loss", "grad_norm")}
        series["consistency_grad_ratio"] = [r["consistency_grad_ratio"] for r in rows if "consistency_grad_ratio" in r]
        row = {"eval_loss": series["eval_loss"][-1], "eval_loss_min": min(series["eval_loss"])}
        if series["eval_accuracy"]:
            row["eval_accuracy"] = series["eval_accuracy"][-1]
        train = series["task_loss"]
        row["train_loss_end"] = statistics.fmean(train[-max(1, len(train) // 10) :])
        row["gap"] = row["eval_loss"] - row["train_loss_end"]
        for key in ("grad_norm", "consistency_grad_ratio"):
            if series[key]:
                row[key] = statistics.fmean(series[key])
        if (out / "gsm8k.json").exists():
            scores = json.loads((out / "gsm8k.json").read_text())
            row.update(strict_format_rate=scores["strict_format_rate"], accuracy=scores["accuracy"])
        if (out / "probe.json").exists():
            row.update(json.loads((out / "probe.json").read_text()))
        results[int(point[SEED_KEY])] = row
    return results


def mean_std(values) -> str:
    values = list(values)
    if not values:
        return "–"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values) if len(values) > 1 else 0:.2g}"


def summarize(plan: Plan, d: Dataset) -> tuple[dict, str]:
    """(everything, markdown) of one dataset."""
    arms = {}
    for arm in (a.name for a in d.arms):
        try:
            selected = plan.selected(d, arm)
            sweep_summary = json.loads((plan.sweep_dir(d, "sweep", arm) / "sweep.json").read_text())
        except RuntimeError:
            selected, sweep_summary = None, None
        arms[arm] = {
            "selected": selected,
            "sweep": sweep_summary,
            "final": final_results(plan, d, arm),
            "sweep_command": " ".join(plan.sweep(d, "sweep", arm)[1][1:]),
        }
    metrics = METRICS["gsm" if d.gsm_eval else "classifier"]
    metrics = [m for m in metrics if any(m[0] in r for a in arms.values() for r in a["final"].values())]
    grids = "; ".join(
        f"{a.name}: {' '.join(a.overrides) or 'the recipe'}"
        + "".join(f", {k} ∈ {{{', '.join(v)}}}" for k, v in a.grid.items() if len(v) > 1)
        for a in d.arms
    )
    baseline = d.arms[0].name
    lines = [
        f"### {d.name}: `{d.recipe}`",
        "",
        f"Arms ({grids}) x sweep seeds {{{', '.join(map(str, d.sweep_seeds))}}}, selected on the validation "
        f"split by {d.metric} ({d.direction}); then seeds {{{', '.join(map(str, d.final_seeds))}}} at each arm's "
        "selected point, tested on the held-out test split.",
        "",
        "**Paired seeds** (mean ± std over seeds)",
        "",
        f"| arm | selected | val {d.metric} | seeds | " + " | ".join(m[1] for m in metrics) + " |",
        "|---|---|---|---|" + "---|" * len(metrics),
    ]
    for arm, a in arms.items():
        point = next((p for p in (a["sweep"] or {}).get("points", []) if p["params"] == a["selected"]), None)
        val = "–" if point is None else f"{point['mean']:.4g} ± {point['std']:.2g}"
        sel = "–" if a["selected"] is None else label(a["selected"], short=True)
        cells = [mean_std(r[key] * scale for r in a["final"].values() if key in r) for key, _, _, scale in metrics]
        lines.append(f"| {arm} | {sel} | {val} | {len(a['final'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Against {baseline} on the same seed** (Δ = arm − {baseline}, mean ± std; [better / worse / tie, "
        "paired t-test p] where better is defined)",
        "",
        "| arm | " + " | ".join(m[1] for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for arm, a in arms.items():
        if arm == baseline:
            continue
        cells = []
        for key, _, better, scale in metrics:
            vals = {s: r[key] * scale for s, r in a["final"].items() if key in r}
            ref = {s: r[key] * scale for s, r in arms[baseline]["final"].items() if key in r}
            p = paired(vals, ref, better == "higher")
            a.setdefault("paired", {})[key] = p
            if p["mean"] is None:
                cells.append("–")
                continue
            cell = f"{p['mean']:+.3g} ± {p['std'] or 0:.2g}"
            if better:
                tp = "–" if p["t_p"] is None else f"{p['t_p']:.2g}"
                cell += f" [{p['better']}/{p['worse']}/{p['ties']}, {tp}]"
            cells.append(cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Sweeps (validation split; heatmaps: `study_" + d.name + "_<arm>_heatmap.png`):", ""]
    for arm, a in arms.items():
        table = plan.sweep_dir(d, "sweep", arm) / "sweep.md"
        if table.exists():
            lines += [f"{arm}: `python {a['sweep_command']}`", "", table.read_text().strip(), ""]
    return {"dataset": dataclasses.asdict(d) | {"prepare": None}, "arms": arms}, "\n".join(lines)


def write_tables(plan: Plan, datasets: list[Dataset], command: str, machine: dict | None = None) -> str:
    """machine: common.machine_info() from before the runs (its commit and load are the runs'),
    else taken now."""
    machine = machine or common.machine_info()
    for d in datasets:
        result, table = summarize(plan, d)
        for arm in ("full", "fast"):
            png = plan.sweep_dir(d, "sweep", arm) / "heatmap.png"
            if png.exists():
                plan.results.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, plan.results / f"study_{d.name}_{arm}_heatmap.png")
        own = f"{command} --only {d.name}" if "--only" not in command else command
        common.save(f"study_{d.name}", {"machine": machine, "command": own, **result}, table, plan.results)
    # study.md holds every dataset with tables in RESULTS, also those an earlier `--only` run wrote
    # (the study spans sessions dataset by dataset): each under its own header, which has its command
    done = [name for name in DATASETS if (plan.results / f"study_{name}.md").exists()]
    text = "\n\n".join((plan.results / f"study_{name}.md").read_text().strip() for name in done)
    common.save("study", {"machine": machine, "command": command, "datasets": done}, text, plan.results)
    return text


# --- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--only", help=f"comma-separated datasets (default: all of {', '.join(DATASETS)})")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--out-dir", type=Path, help="runs (default outputs/study, --smoke outputs/study-smoke)")
    p.add_argument("--results", type=Path, help="tables (default bench/results, --smoke OUT_DIR/results)")
    p.add_argument(
        "--grace-period",
        type=int,
        default=120,
        help="seconds after which a run of a killed session is taken as dead and resumed",
    )
    p.add_argument("--smoke", action="store_true", help="1 grid point, 1 + 2 seeds, 2 steps per run")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="re-run crashed runs (killed for memory, say) instead of skipping them",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--summary", action="store_true", help="write the tables from what is done, run nothing")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    args.datasets = [smoke_budget(DATASETS[n]) if args.smoke else DATASETS[n] for n in names]
    args.out_dir = (ROOT / (args.out_dir or ("outputs/study-smoke" if args.smoke else "outputs/study"))).resolve()
    args.results = (ROOT / (args.results or (args.out_dir / "results" if args.smoke else "bench/results"))).resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    command, machine = common.command_line(), common.machine_info()  # before the runs: their commit and load
    plan = Plan(args.out_dir, args.results, args.smoke, args.grace_period, retry_failed=args.retry_failed)
    for d in args.datasets:
        hours = "" if args.smoke else f", ~{estimate_hours(d, args.jobs):.1f} h at {args.jobs} side by side"
        print(
            f"[study] {d.name}: {runs_of(d)} runs{hours} ({len(d.arms)} arms, sweep seeds "
            f"{list(d.sweep_seeds)}, final seeds {list(d.final_seeds)})",
            flush=True,
        )
    if not args.smoke:
        print(f"[study] estimated total ~{sum(estimate_hours(d, args.jobs) for d in args.datasets):.1f} h", flush=True)
    for d in args.datasets:
        print(f"[study] preparing {d.name}", flush=True)
        plan.inputs[d.name] = d.prepare()
    if args.dry_run:
        for d in args.datasets:
            for arm in (a.name for a in d.arms):
                print(f"  {d.name}/{arm}: {' '.join(plan.sweep(d, 'sweep', arm)[1])}")
        return 0
    if not args.summary:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "study.pgid").write_text(f"{os.getpgid(0)}\n")  # started under setsid: the group is ours
        print(
            f"[study] pause: kill -TERM -- -{os.getpgid(0)} (runs checkpoint; rerun the command to resume)", flush=True
        )
        Study(plan, args.datasets, args.jobs).run()
    print(write_tables(plan, args.datasets, command, machine))
    print(f"\nwritten: {args.results}/study.md and study_<dataset>.json/.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
