"""What the two offline classification demos share (`pace-llm demo polarity|fashion`: polarity.py,
fashion.py): train one recipe per (seed, method) through launch/train.py, evaluate its merged
model with the demo's `pace-llm eval` command, time both, print PACE vs LoRA.

The LoRA baseline is the same recipe with `pace.mode=off` (σ = 0: no noise, no consistency
term); PACE runs the recipe's `pace.mode` (full). Both share the seed, so they share the
training subset, the adapter and head initialisation and the data order.

Runs are single-process (`python launch/train.py`), one thread each, and `jobs` of them run
side by side (default 2: PACE and LoRA of a seed together, one per core). For models this
small, 2 DeepSpeed ranks spend more on start-up (a second process importing torch,
transformers and DeepSpeed) and on gradient all-reduces than they save, and 2 OpenMP
threads in one process slow down badly (4-6x measured) whenever the other core is busy.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pace_llm.distributed.launcher import launch_env, run_logged, train_command
from pace_llm.files import fresh_dir

METHODS = {"LoRA": ["pace.mode=off"], "PACE": []}


def _run(cmd: list[str], log: Path, launcher: str = "python") -> float:
    """Seconds cmd took; its output goes to `log` (the error shows its tail)."""
    started = time.time()
    # one thread per run (a user's OMP_NUM_THREADS wins for single-process runs); 2 ranks on 2 cores
    threads = 1 if launcher == "deepspeed" else os.environ.get("OMP_NUM_THREADS", "1")
    returncode = run_logged(cmd, log, launch_env(threads=threads))
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {returncode}:\n{log.read_text()[-3000:]}")
    return time.time() - started


def train_and_evaluate(
    recipe: Path, out: Path, overrides: list[str], eval_cmd: list[str], launcher: str = "python"
) -> dict:
    """A fresh run of launch/train.py, then `python eval_cmd... --model OUT/merged --output OUT/eval.json`.
    Returns the eval JSON with train_seconds / eval_seconds added. Log: OUT.log."""
    fresh_dir(out)
    log = out.parent / f"{out.name}.log"
    log.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(launcher, recipe, [f"output_dir={out}", *overrides], nproc=2)
    train_seconds = _run(cmd, log, launcher)
    eval_seconds = _run(
        [sys.executable, *eval_cmd, "--model", str(out / "merged"), "--output", str(out / "eval.json")], log
    )
    result = json.loads((out / "eval.json").read_text())
    return {**result, "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1)}


def run_all(jobs: list[dict], workers: int, on_done=None) -> list[dict]:
    """jobs: dicts with the train_and_evaluate arguments plus any labels (seed, method);
    returns them with the results merged in, in the order given."""

    def one(job):
        labels = {k: v for k, v in job.items() if k not in ("recipe", "out", "overrides", "eval_cmd", "launcher")}
        print(f"[demo] training {labels} -> {job['out']}", flush=True)
        result = {
            **labels,
            **train_and_evaluate(
                job["recipe"], job["out"], job["overrides"], job["eval_cmd"], job.get("launcher", "python")
            ),
            "output_dir": str(job["out"]),
        }
        if on_done is not None:
            on_done(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, jobs))


def add_common_args(parser, output_dir: str) -> None:
    """The options both demos take: seeds, parallel runs, launcher, output folder, overrides."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--launcher", choices=["python", "deepspeed"], default="python")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both methods (section.key=value)")


def seed_jobs(args, recipe: Path, out: Path, overrides: dict, eval_cmd: list[str]) -> list[dict]:
    """One job per (seed, method); `overrides[seed]` comes before the method's and the user's."""
    return [
        {
            "seed": seed,
            "method": method,
            "recipe": recipe,
            "out": out / f"{method.lower()}-s{seed}",
            "overrides": [*overrides[seed], *extra, *args.overrides],
            "eval_cmd": eval_cmd,
            "launcher": args.launcher,
        }
        for seed in args.seeds
        for method, extra in METHODS.items()
    ]


def run_and_report(
    jobs: list[dict],
    args,
    out: Path,
    metric: str,
    metric_label: str,
    nll_key: str,
    title: str,
    started: float,
    complete=None,
) -> list[dict]:
    """Runs the jobs, saving and printing each result as it lands (`complete(result)` first
    adds derived fields), then prints the PACE vs LoRA table, mean NLL and wall time."""
    done: list[dict] = []

    def finished(result):
        if complete is not None:
            complete(result)
        done.append(result)
        save(done, out / "results.json")
        print(
            f"[demo] {result['method']} seed {result['seed']}: {metric_label} {result[metric]:.3f}, test NLL "
            f"{result[nll_key]:.3f} (trained in {result['train_seconds']:.0f} s)",
            flush=True,
        )

    results = run_all(jobs, args.jobs, finished)
    print()
    print(table(results, metric, title))
    nll = {m: sum(r[nll_key] for r in results if r["method"] == m) / len(args.seeds) for m in METHODS}
    print(f"mean test NLL: LoRA {nll['LoRA']:.3f}, PACE {nll['PACE']:.3f}")
    print(
        f"overrides: {' '.join(args.overrides) or 'none'}; {args.jobs} run(s) side by side; "
        f"results: {out / 'results.json'}; wall time {(time.time() - started) / 60:.1f} min"
    )
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def table(results: list[dict], metric: str, title: str) -> str:
    """Per seed: LoRA, PACE, PACE − LoRA (x100) and training wall times; then mean ± std."""
    seeds = sorted({r["seed"] for r in results})
    get = {(r["seed"], r["method"]): r for r in results}
    head = (
        f"{'seed':>6} | {'LoRA':>11} | {'PACE':>11} | {'PACE - LoRA':>11} | {'LoRA train s':>12} | {'PACE train s':>12}"
    )
    lines = [title, head, "-" * len(head)]
    deltas = []
    for s in seeds:
        lora, pace = get[s, "LoRA"], get[s, "PACE"]
        deltas.append(100 * (pace[metric] - lora[metric]))
        lines.append(
            f"{s:>6} | {100 * lora[metric]:>11.1f} | {100 * pace[metric]:>11.1f} | {deltas[-1]:>+11.1f} | "
            f"{lora['train_seconds']:>12.0f} | {pace['train_seconds']:>12.0f}"
        )
    lines.append("-" * len(head))
    (ml, sl), (mp, sp) = (mean_std([100 * get[s, m][metric] for s in seeds]) for m in ("LoRA", "PACE"))
    md, sd = mean_std(deltas)
    tl, tp = (sum(get[s, m]["train_seconds"] for s in seeds) / len(seeds) for m in ("LoRA", "PACE"))
    lines.append(
        f"{'mean':>6} | {ml:>5.1f} ± {sl:<3.1f} | {mp:>5.1f} ± {sp:<3.1f} | {md:>+5.1f} ± {sd:<3.1f} | "
        f"{tl:>12.0f} | {tp:>12.0f}"
    )
    lines.append(
        f"PACE better on {sum(d > 0 for d in deltas)} of {len(seeds)} seeds, worse on "
        f"{sum(d < 0 for d in deltas)} (± is the standard deviation over seeds)"
    )
    return "\n".join(lines)


def save(results: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(results, key=lambda r: (r["seed"], r["method"])), indent=2) + "\n")
