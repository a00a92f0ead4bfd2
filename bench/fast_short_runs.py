"""What PACE_fast's term measures in a short run (#23 item 4), read from the study's sweep runs.

    python bench/fast_short_runs.py                      # after bench/study.py --only smollm2_gsm_forms
    python bench/fast_short_runs.py --out-dir outputs/study

PACE_fast compares a sample's output with its own noisy output from the previous epoch, so from
the second epoch on its term is the noise consistency plus how far the model moved in an epoch.
Full PACE's term, at the same λ, σ and form, is the noise consistency alone. Per epoch, for each
form and λ the sweeps ran in both modes: the mean logged consistency of full and of fast, their
ratio (fast / full: how many times the noise alone the fast term is; 1 = no movement), and each
run's validation loss. Writes bench/results/fast_short_runs.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common

from pace_llm.files import read_rows
from pace_llm.sweep import run_done

FORMS = {"centred": "centred_mse", "kl": "kl"}


def per_epoch(run: Path) -> tuple[dict[int, float], float | None]:
    """({epoch: mean consistency_loss of its steps}, last eval_loss) of one run."""
    rows = read_rows(run / "metrics.jsonl")
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        if "consistency_loss" in r:
            by_epoch.setdefault(int(r["epoch"] - 1e-9) + 1, []).append(r["consistency_loss"])
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {e: statistics.fmean(v) for e, v in sorted(by_epoch.items())}, (evals[-1] if evals else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--out-dir", type=Path, default=common.ROOT / "outputs" / "study")
    p.add_argument("--results", type=Path, default=common.ROOT / "bench" / "results")
    args = p.parse_args(argv)
    base = args.out_dir / "smollm2_gsm_forms"
    result, lines = {}, []
    for short, form in FORMS.items():
        for full_run in sorted((base / f"sweep-full_{short}" / "runs").glob("*")):
            fast_run = base / f"sweep-fast_{short}" / "runs" / full_run.name
            if not (run_done(full_run) and run_done(fast_run)):  # a stopped run has a status file too
                continue
            (full, full_eval), (fast, fast_eval) = per_epoch(full_run), per_epoch(fast_run)
            lam = full_run.name.split(",")[0].split("=")[1]
            epochs = sorted(set(full) & set(fast))
            ratio = {e: fast[e] / full[e] if full[e] else None for e in epochs}
            result[f"{form} λ={lam}"] = {"full": full, "fast": fast, "ratio": ratio, "eval": [full_eval, fast_eval]}
            lines.append(
                [form, lam, *(f"{fast[e]:.3g} / {full[e]:.3g} = {ratio[e]:.1f}x" if ratio[e] else "–" for e in epochs)]
                + [f"{full_eval:.4f}", f"{fast_eval:.4f}"]
            )
    if not lines:
        print(f"no pair of finished full and fast sweep runs under {base}")
        return 1
    epochs = sorted(next(iter(result.values()))["ratio"])
    headers = ["form", "λ", *(f"epoch {e}: fast / full" for e in epochs), "val loss full", "val loss fast"]
    table = common.markdown_table(headers, lines)
    print(table)
    common.save("fast_short_runs", {"command": common.command_line(), "runs": result}, table, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
