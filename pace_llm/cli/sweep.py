"""Grid-sweep a recipe: every grid point x seed is one training run (pace_llm/sweep.py).

    pace-llm sweep recipes/tiny_cls.yaml --grid pace.lam=0.1,0.5 pace.sigma=0.5,1 \\
        --seeds 0,1 --metric eval_accuracy --direction max --sweep-dir outputs/sweep-tiny-cls
    pace-llm sweep recipes/gsm8k.yaml --grid pace.lam=1,3,10 pace.sigma=0.5,1,1.5 \\
        --seeds 0,1,2 --metric eval_loss --direction min --launcher deepspeed --nproc 8
    # many workers, one sweep: the same command with a shared database, on each machine
    pace-llm sweep recipes/gsm8k.yaml --grid ... --storage postgresql://user@db/pace \\
        --sweep-dir /shared/sweeps/gsm8k --launcher torchrun --nproc 8
    sbatch --array=0-7 launch/slurm/sweep.sbatch recipes/gsm8k.yaml --grid ...   # a Slurm array

(`python launch/sweep.py` takes the same arguments.) Recipe overrides (section.key=value) go
after the recipe, before the flags. Rerunning the same command resumes: finished runs are
kept, killed ones continue from their checkpoint. Results: SWEEP_DIR/sweep.json, sweep.md
(mean ± std over seeds, best marked), heatmap.png (λ x σ grids); each run in
SWEEP_DIR/runs/<parameters>/ (train.log, metrics.jsonl, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pace_llm.config import RecipeError
from pace_llm.sweep import LAUNCHERS, SEED_KEY, Sweep, SweepError, parse_grid, retry_failed, run_worker


def parse_args(argv, prog=None):
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="swept recipe keys")
    p.add_argument("--seeds", help="comma-separated train.seed values (default: the recipe's seed)")
    p.add_argument("--metric", default="eval_loss", help="a key of the runs' metrics.jsonl: eval_loss | eval_accuracy")
    p.add_argument("--direction", choices=("min", "max"), default="min")
    p.add_argument("--sweep-dir", type=Path, help="default: outputs/sweep-<recipe name>")
    p.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///SWEEP_DIR/sweep.db)")
    p.add_argument("--study", help="study name in the storage (default: the sweep folder's name)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="python")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run for deepspeed / torchrun")
    p.add_argument("--n-trials", type=int, help="this worker runs at most N trials, then leaves")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="first queue a retry of each crashed trial (crashes are not retried otherwise)",
    )
    p.add_argument("--heartbeat-interval", type=int, default=30, help="seconds")
    p.add_argument(
        "--grace-period",
        type=int,
        default=120,
        help="seconds without a heartbeat after which a trial is taken as dead and re-queued",
    )
    return p.parse_args(argv)


def main(argv=None, prog=None) -> int:
    """Run one sweep worker until the grid is done (or --n-trials); 2 on a bad grid or recipe."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        grid = parse_grid(args.grid)
        if args.seeds:
            grid.update(parse_grid([f"{SEED_KEY}={args.seeds}"]))
        sweep = Sweep(
            args.recipe,
            args.overrides,
            grid,
            metric=args.metric,
            direction=args.direction,
            sweep_dir=args.sweep_dir or Path("outputs") / f"sweep-{Path(args.recipe).stem}",
            storage=args.storage,
            study_name=args.study,
            launcher=args.launcher,
            nproc=args.nproc,
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
        )
        if args.retry_failed:
            numbers = retry_failed(sweep)
            print(f"[sweep] retrying crashed trials {numbers}" if numbers else "[sweep] no crashed trial to retry")
        run_worker(sweep, args.n_trials)
    except (SweepError, RecipeError) as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    return 0
