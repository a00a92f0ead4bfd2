"""GSM-8K-style evaluation throughput: the vLLM backend against the HF backend, same model,
same prompts, same greedy decoding (pace_llm.generation.Generator, as eval/gsm8k.py uses it).

    python bench/eval_throughput.py                          # SmolLM2-135M-Instruct, 16 prompts (~5-7 min)
    python bench/eval_throughput.py --limit 50 --max-new-tokens 512 --rounds 3
    python bench/eval_throughput.py --model outputs/gsm8k-pace/merged --data test.jsonl
    python bench/eval_throughput.py --smoke                  # a tiny Llama, 4 prompts (the test)

Prompts: the first --limit GSM-8K test problems that ship offline (the 50 originals held
out by pace_llm.assets.gsm_symbolic_split), with the paper's instruction and the model's
chat template (pace_llm.benchmarks.gsm8k.prompt_text + Generator.render), or --data FILE.jsonl.

Each backend runs in its own worker process (vLLM patches torch's threading when it starts),
both load first, then the parent alternates them round by round (hf, vllm, vllm, hf, ...),
each round generating for all prompts; reported: the median round of each, and the median
over rounds of the per-round ratio vLLM / HF. Tokens/s counts generated tokens (a final stop
token included) over the generate call; load time is reported apart. Both workers use
--threads OpenMP threads (default 1: on this shared 2-core machine two threads collapse
whenever another job holds a core; vLLM's own core binding is off, VLLM_CPU_OMP_THREADS_BIND=nobind).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # bench/common.py: this script's folder is first on sys.path

PREFIX = "@@BENCH@@ "


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", default="smollm2", help="smollm2 | a merged HF causal-LM folder")
    p.add_argument("--data", default=None, help=".jsonl with question/answer (default: the offline GSM-8K originals)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per HF generate call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backends", default="hf,vllm")
    common.add_run_args(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.limit, args.max_new_tokens, args.rounds = "tiny", 4, 16, 1
    args.backends = [b for b in args.backends.split(",") if b]
    args.name = args.name or (
        "eval_throughput_smoke"
        if args.smoke
        else f"eval_throughput_{Path(args.model).name if args.model != 'smollm2' else 'smollm2'}"
    )
    return args


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def tiny_folder(root: Path) -> Path:
    """A tiny Llama (head dim 32, as vLLM's CPU attention needs) + the tiny chat tokenizer."""
    from pace_llm.assets.tiny import tiny_model, tiny_tokenizer

    folder = root / "tiny-llama"
    tok = tiny_tokenizer()
    model = tiny_model(
        "llama",
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_questions(args) -> list[dict]:
    if args.data:
        from pace_llm.benchmarks.gsm8k import load_problems as load

        return load(args.data, args.limit)
    if args.smoke:
        from pace_llm.assets.tiny import tiny_arithmetic

        return tiny_arithmetic(args.limit)
    from pace_llm.assets import gsm_symbolic_split

    _, test = gsm_symbolic_split()
    return [{"question": r["question"], "answer": r["answer"]} for r in test[: args.limit]]


# --------------------------------------------------------------------------- worker


def worker(args) -> int:
    """Load one backend, then answer GO lines with one timed generate over all prompts."""
    from pace_llm.benchmarks.gsm8k import prompt_text
    from pace_llm.generation import Generator

    rows = json.loads(Path(args.rows_file).read_text())
    gen = Generator(args.model, backend=args.worker, batch_size=args.batch_size)
    prompts = gen.render([prompt_text(r["question"]) for r in rows])
    prompt_tokens = sum(len(ids) for ids in gen.encode(prompts))
    print(PREFIX + json.dumps({"ready": True, "load_s": gen.load_s, "prompt_tokens": prompt_tokens}), flush=True)
    for line in sys.stdin:
        if line.strip() != "GO":
            break
        out = gen.generate(prompts, max_new_tokens=args.max_new_tokens, progress=False)
        print(
            PREFIX + json.dumps({"seconds": out.seconds, "num_tokens": out.num_tokens, "texts": out.texts}), flush=True
        )
    gen.close()
    return 0


class Worker:
    def __init__(self, backend: str, args, model_dir: str, rows_file: Path, tmp: Path):
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(args.threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            TMPDIR=str(tmp / f"tmp-{backend}"),
            PYTHONUNBUFFERED="1",
        )
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        self.log = tmp / f"{backend}.log"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            backend,
            "--model",
            model_dir,
            "--rows-file",
            str(rows_file),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--batch-size",
            str(args.batch_size),
        ]
        self.backend = backend
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env,
            cwd=common.ROOT,
        )

    def message(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"{self.backend} worker exited ({self.proc.wait()}):\n{self.log.read_text()[-4000:]}")

    def run(self) -> dict:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        return self.message()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------- parent


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from pace_llm.benchmarks.gsm8k import score

    machine = common.machine_info()
    skipped = []
    if "vllm" in args.backends and not vllm_available():
        args.backends.remove("vllm")
        skipped.append("vllm (not installed)")
    rows = load_questions(args)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        if args.model == "tiny":
            model_dir = str(tiny_folder(tmp))
        elif args.model == "smollm2":
            from pace_llm.assets import smollm2_dir

            model_dir = str(smollm2_dir())
        else:
            model_dir = args.model
        rows_file = tmp / "rows.json"
        rows_file.write_text(json.dumps(rows))
        workers = {b: Worker(b, args, model_dir, rows_file, tmp) for b in args.backends}  # load in parallel
        try:
            ready = {b: w.message() for b, w in workers.items()}
            runs = {b: [] for b in workers}
            for r in range(args.rounds):
                order = common.rotated(list(workers), r)
                for b in order:
                    runs[b].append(workers[b].run())
                print(
                    f"round {r + 1}/{args.rounds}: " + "  ".join(f"{b} {runs[b][-1]['seconds']:.2f}s" for b in workers),
                    flush=True,
                )
        finally:
            for w in workers.values():
                w.close()

    per_backend = {}
    first = args.backends[0]
    for b, rs in runs.items():
        seconds = [x["seconds"] for x in rs]
        tokens = [sum(x["num_tokens"]) for x in rs]
        _, metrics = score(rows, rs[-1]["texts"])
        per_backend[b] = {
            "load_s": ready[b]["load_s"],
            "prompt_tokens": ready[b]["prompt_tokens"],
            "generate_s_median": common.median(seconds),
            "generated_tokens": tokens[-1],
            "tokens_per_s": common.median([t / s for t, s in zip(tokens, seconds)]),
            "prompts_per_s": common.median([len(rows) / s for s in seconds]),
            "speedup_vs_" + first: common.median(
                [a["seconds"] and b2["seconds"] / a["seconds"] for a, b2 in zip(rs, runs[first])]
            ),
            "accuracy": metrics["accuracy"],
            "texts": rs[-1]["texts"],
        }
    if len(per_backend) > 1:
        other = [b for b in per_backend if b != first][0]
        same = sum(a == b for a, b in zip(per_backend[first]["texts"], per_backend[other]["texts"]))
        agreement = f"{same}/{len(rows)} identical completions ({first} vs {other})"
    else:
        agreement = "one backend only"
    table = common.markdown_table(
        [
            "backend",
            "prompts",
            "generated tokens",
            "generate s",
            "tokens/s",
            "prompts/s",
            f"speed-up vs {first}",
            "load s",
            "accuracy",
        ],
        [
            [
                b,
                len(rows),
                r["generated_tokens"],
                r["generate_s_median"],
                r["tokens_per_s"],
                r["prompts_per_s"],
                f"{r['speedup_vs_' + first]:.2f}x",
                r["load_s"],
                r["accuracy"],
            ]
            for b, r in per_backend.items()
        ],
    )
    result = {
        "machine": machine,
        "command": common.command_line(),
        "settings": vars(args),
        "model_dir": model_dir,
        "skipped": skipped,
        "agreement": agreement,
        "backends": {b: {k: v for k, v in r.items() if k != "texts"} for b, r in per_backend.items()},
        "completions": {b: r["texts"] for b, r in per_backend.items()},
    }
    common.save(args.name, result, table, args.out)
    print(
        f"\n{args.name}: {args.model}, {len(rows)} prompts, greedy, max {args.max_new_tokens} new tokens, "
        f"HF batch {args.batch_size}, {args.threads} thread(s) each, {args.rounds} interleaved rounds; "
        f"{agreement}; load average {machine['load_average_at_start']}"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    )
    print(table, flush=True)
    return 0


if __name__ == "__main__":  # required: vLLM spawns processes
    sys.exit(main())
