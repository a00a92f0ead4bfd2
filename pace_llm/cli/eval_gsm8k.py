"""GSM-8K accuracy of a fine-tuned model: greedy decoding, the paper's prompt (App. G).

    pace-llm eval gsm8k --model out/merged --data openai/gsm8k --output out/gsm8k.json
    pace-llm eval gsm8k --model BASE --adapter out/adapter --backend vllm ...
    pace-llm eval gsm8k --backend openai --base-url http://127.0.0.1:8000 ...   # pace-llm serve

(`python eval/gsm8k.py` takes the same flags.) Writes FILE.json (accuracy, accuracy_strict,
strict_format_rate, n, settings, timing) and FILE.samples.jsonl (one record per question).
The work is in pace_llm.benchmarks.gsm8k.evaluate_gsm8k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pace_llm import generation
from pace_llm.benchmarks import gsm8k
from pace_llm.benchmarks.evaluation import write_results
from pace_llm.data import DataError
from pace_llm.logs import route_logs


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--model",
        help="merged HF folder, or the base model with --adapter; for "
        "--backend openai optional (tokenizer folder; default: the server's model)",
    )
    p.add_argument("--adapter", help="PEFT adapter folder (pace_llm.save_adapter) on top of --model")
    p.add_argument("--backend", choices=generation.BACKENDS, default=None, help="vllm when importable, else hf")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-model", help="model name on the server (default: from /v1/models)")
    p.add_argument(
        "--data",
        default="openai/gsm8k",
        help="local .jsonl/.json with question/answer, or a hub id (config main, split test)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        help="default 512; a completion also stops at the model's context length",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (hf)")
    p.add_argument("--dtype", default=None, help="default: the checkpoint's (config.json)")
    p.add_argument("--output", help="FILE.json; samples go to FILE.samples.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.backend == "openai" and not args.base_url:
        p.error("--backend openai needs --base-url")
    if args.base_url and args.backend is None:
        args.backend = "openai"
    if args.backend != "openai" and not args.model:
        p.error("--model is required (a merged folder, or the base with --adapter)")
    return args


def main(argv=None, prog=None) -> dict:
    """Evaluate; returns the result (samples left out) for Python callers."""
    args = parse_args(argv, prog)
    if args.output:  # vLLM's engine INFO to FILE.log beside the results; warnings still here
        route_logs(Path(args.output).parent, Path(args.output).stem + ".log")
    try:
        rows = gsm8k.load_problems(args.data, args.limit)
    except DataError as err:
        raise SystemExit(f"[gsm8k] {err}") from None
    result = gsm8k.evaluate_gsm8k(
        args.model,
        rows,
        backend=args.backend,
        adapter=args.adapter,
        base_url=args.base_url,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        served_model=args.served_model,
        dtype=args.dtype,
        verbose=not args.quiet,
    )
    samples = result.pop("samples")
    result["settings"]["data"] = args.data
    result["settings"]["limit"] = args.limit
    if args.output:
        samples_path = write_results(args.output, result, samples)
        print(f"[gsm8k] wrote {args.output} and {samples_path}")
    print(json.dumps({k: result[k] for k in ("accuracy", "accuracy_strict", "strict_format_rate", "n")}))
    return result
