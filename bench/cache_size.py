"""PACE_fast's cache for the GSM-8K recipe: bytes per sample and in total, against a naive
logits cache, and the cache's read/write time per step against the step time.

    python bench/cache_size.py                       # Phi-3-mini shapes, GSM-8K sizes (~1 min)
    python bench/cache_size.py --step-time-ms 120    # fractions against another step time
    python bench/cache_size.py --smoke               # small shapes, seconds (the test)

Shapes (recipes/gsm8k.yaml): Phi-3-mini-4k-instruct, hidden d = 3,072, vocabulary
V = 32,064, 7,473 GSM-8K training samples, batch 4. What the cache holds per sample: one
row per supervised (answer) token, the final hidden state h in bf16 (pace_llm.core.cache):
2·d bytes per token. A naive cache of the logits: 2·V bytes per token in bf16 (4·V in
the fp32 the authors' vision code uses).

Answer-token counts: the real GSM-8K training answers are not available offline. The proxy
is the 1,000 GSM-Symbolic training variants from pace_llm.assets (generated from 50 GSM-8K
templates, same style, calculator annotations `<<48/2=24>>` included) and, as a check, the
50 GSM-8K test originals held out by the same split, tokenized exactly as training does
(pace_llm.data.tokenize_sft: SmolLM2's chat template, answer + end-of-turn supervised) with
the SmolLM2 tokenizer, which, like Phi-3's, splits numbers into single digits. The total for
7,473 samples is 7,473 × the proxy's mean; pace-method.md's rough figure (128 per sample)
is shown beside it.

Timing: OutputCache.read + .write for a batch of 4 random samples (their real row counts),
with bf16 outputs of d columns, on two caches built as training builds them: in memory
(first --in-memory-samples samples) and memory-mapped on disk (all 7,473: what the default
2 GiB budget gives for the full set). Three scenarios, interleaved step by step, medians:
in memory and memory-mapped in the steady state (samples written in an earlier epoch; both
caches get the first --in-memory-samples samples written once before timing), and
memory-mapped in the first epoch (samples never written: their pages are allocated then). The step time to
compare with is not measurable here (no GPU): the default is an estimate for Phi-3-mini
LoRA on one H100 in bf16, 6·N·tokens FLOPs (forward, backward through the activations,
recomputation under gradient checkpointing) at 40% of 989 TFLOP/s; `--step-time-ms` sets
another. On a GPU the outputs also cross PCIe (3 MB per step, ~0.1-0.3 ms), not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common  # bench/common.py: this script's folder is first on sys.path

PHI3_PARAMS = 3.82e9
H100_BF16_FLOPS = 989e12
STATED_ROWS = 128  # pace-method.md's rough answer length


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--samples", type=int, default=7473)
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=200, help="timed steps per cache")
    p.add_argument(
        "--in-memory-samples",
        type=int,
        default=1000,
        help="samples in the in-memory cache (read/write time does not depend on it)",
    )
    p.add_argument(
        "--step-time-ms", type=float, default=None, help="step time to compare with (default: the H100 estimate)"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of the estimate")
    p.add_argument("--disk-dir", default=None, help="folder of the memory-mapped file (default: $TMPDIR)")
    common.add_run_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.dim, args.vocab, args.steps, args.in_memory_samples = 200, 64, 256, 10, 50
    args.name = args.name or ("cache_size_smoke" if args.smoke else "cache_size")
    return args


def token_counts(smoke: bool) -> tuple[dict, str]:
    """{source: (answer_rows, prompt_tokens)} and a description of where they came from."""
    if smoke:
        import random

        rng = random.Random(0)
        rows = [max(8, int(rng.gauss(128, 40))) for _ in range(200)]
        return {"synthetic N(128, 40)": (rows, [100] * len(rows))}, "synthetic (smoke)"
    import datasets
    import transformers

    from pace_llm import assets
    from pace_llm.benchmarks.gsm8k import INSTRUCTION
    from pace_llm.core.objectives import supervised_counts
    from pace_llm.tasks.causal_lm import tokenize_sft

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir())
    train, test = assets.gsm_symbolic_split()
    out = {}
    for label, rows in (("GSM-Symbolic train variants (proxy)", train), ("GSM-8K test originals (50)", test)):
        ds = datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]} for r in rows])
        ds = ds.add_column("sample_id", list(range(len(ds))))
        tok = tokenize_sft(ds, tokenizer, INSTRUCTION + "{question}", "answer", max_length=1024)
        import torch

        answer = [int(supervised_counts(torch.tensor([r["labels"]]))[0]) for r in tok]
        prompt = [sum(1 for x in r["labels"] if x == -100) for r in tok]
        out[label] = (answer, prompt)
    return out, "SmolLM2-135M-Instruct tokenizer + chat template (pace_llm.data.tokenize_sft)"


def stats(xs: list[int]) -> dict:
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "median": statistics.median(xs),
        "p10": q[0],
        "p90": q[-1],
        "min": min(xs),
        "max": max(xs),
    }


def resample(rows: list[int], n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.choice(rows) for _ in range(n)]


def time_cache(args, counts: list[int]) -> dict:
    """Median ms of read, write and read+write per step, interleaved step by step:
    in memory, memory-mapped in the steady state (entries written in an earlier epoch) and
    memory-mapped in the first epoch (entries never written: the file's holes get pages)."""
    import torch

    from pace_llm.core.cache import OutputCache

    n_mem = min(args.in_memory_samples, len(counts))
    memory = OutputCache(counts[:n_mem], args.dim, memory_budget_bytes=1 << 62)
    mapped = OutputCache(counts, args.dim, memory_budget_bytes=0, disk_dir=args.disk_dir)
    assert memory.path is None and mapped.path is not None
    g = torch.Generator().manual_seed(0)
    fresh = (torch.randperm(len(counts) - n_mem, generator=g) + n_mem).tolist()  # never written
    outputs = {}

    def output(cache, ids):
        rows = int(cache.row_counts[ids].sum())
        if rows not in outputs:
            outputs[rows] = torch.randn(rows, args.dim, generator=g).to(torch.bfloat16)
        return outputs[rows]

    # the steady state: the first n_mem samples written once, in both caches (an epoch)
    for cache in (memory, mapped):
        for start in range(0, n_mem, 64):
            ids = torch.arange(start, min(n_mem, start + 64))
            cache.write(ids, output(cache, ids))
    scenarios = {
        "in memory": (memory, lambda: torch.randint(0, n_mem, (args.batch,), generator=g)),
        "memory-mapped, steady state": (mapped, lambda: torch.randint(0, n_mem, (args.batch,), generator=g)),
        "memory-mapped, first epoch": (mapped, lambda: torch.tensor([fresh.pop() for _ in range(args.batch)])),
    }
    times = {k: {"read": [], "write": [], "both": []} for k in scenarios}
    try:
        for step in range(args.steps + 3):
            for name in common.rotated(list(scenarios), step):
                cache, draw = scenarios[name]
                ids = draw()
                out = output(cache, ids)
                t0 = time.perf_counter()
                cache.read(ids)
                t1 = time.perf_counter()
                cache.write(ids, out)
                t2 = time.perf_counter()
                if step >= 3:  # the first steps warm up the allocator
                    times[name]["read"].append((t1 - t0) * 1e3)
                    times[name]["write"].append((t2 - t1) * 1e3)
                    times[name]["both"].append((t2 - t0) * 1e3)
        result = {
            k: {op: statistics.median(v) for op, v in t.items()}
            | {"nbytes": scenarios[k][0].nbytes, "samples": len(scenarios[k][0].row_counts)}
            for k, t in times.items()
        }
    finally:
        memory.close()
        mapped.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.getLogger("pace_llm").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    sources, tokenizer_note = token_counts(args.smoke)
    proxy_label = next(iter(sources))
    proxy_rows, proxy_prompt = sources[proxy_label]
    distributions = {label: {"answer_tokens": stats(a), "prompt_tokens": stats(p)} for label, (a, p) in sources.items()}

    # sizes
    d, v, n = args.dim, args.vocab, args.samples
    size_rows = []
    per_token = {
        "PACE_fast cache: h, bf16 (ours)": 2 * d,
        "naive: logits, bf16": 2 * v,
        "naive: logits, fp32 (authors' dtype)": 4 * v,
    }
    sizes = {}
    for label, mean_rows in (
        (f"{proxy_label}: mean {statistics.fmean(proxy_rows):.1f}", statistics.fmean(proxy_rows)),
        (f"stated: {STATED_ROWS}", STATED_ROWS),
    ):
        for store, bytes_per_token in per_token.items():
            per_sample = mean_rows * bytes_per_token
            total = per_sample * n
            sizes[(label, store)] = total
            size_rows.append(
                [
                    label,
                    store,
                    f"{per_sample / 2**10:,.0f} KiB",
                    f"{total / 2**30:,.2f} GiB",
                    f"{total / 8 / 2**30:,.2f} GiB",
                    f"{total / sizes[(label, 'PACE_fast cache: h, bf16 (ours)')]:.1f}x",
                ]
            )
    size_table = common.markdown_table(
        ["answer tokens / sample", "store", "per sample", f"total ({n:,} samples)", "per rank (8 GPUs)", "vs ours"],
        size_rows,
    )

    # the real OutputCache at full size (memory-mapped, sparse) and timing
    counts = resample(proxy_rows, n)
    timing = time_cache(args, counts)
    exact = sum(counts) * d * 2
    assert timing["memory-mapped, steady state"]["nbytes"] == exact, (
        timing["memory-mapped, steady state"]["nbytes"],
        exact,
    )

    tokens_per_step = args.batch * (statistics.fmean(proxy_rows) + statistics.fmean(proxy_prompt))
    estimate_ms = 6 * PHI3_PARAMS * tokens_per_step / (args.mfu * H100_BF16_FLOPS) * 1e3
    step_ms = args.step_time_ms or estimate_ms
    step_note = (
        f"{step_ms:.0f} ms (given)"
        if args.step_time_ms
        else f"{step_ms:.0f} ms (estimate: 6 x {PHI3_PARAMS:.3g} params x {tokens_per_step:.0f} tokens / "
        f"({args.mfu:.0%} x 989 TFLOP/s), H100 bf16; full PACE ~2x)"
    )
    time_rows = []
    for name, t in timing.items():
        time_rows.append(
            [
                name,
                f"{t['samples']:,}",
                f"{t['nbytes'] / 2**30:.2f} GiB",
                t["read"],
                t["write"],
                t["both"],
                f"{100 * t['both'] / step_ms:.2f}%",
            ]
        )
    time_table = common.markdown_table(
        ["cache", "samples", "size", "read ms", "write ms", "read+write ms", f"of a {step_ms:.0f} ms step"], time_rows
    )
    dist_rows = [
        [
            label,
            s["answer_tokens"]["n"],
            s["answer_tokens"]["mean"],
            s["answer_tokens"]["median"],
            s["answer_tokens"]["p10"],
            s["answer_tokens"]["p90"],
            s["answer_tokens"]["max"],
            s["prompt_tokens"]["mean"],
        ]
        for label, s in distributions.items()
    ]
    dist_table = common.markdown_table(
        ["answer-token source", "samples", "mean", "median", "p10", "p90", "max", "prompt mean"], dist_rows
    )

    table = "\n\n".join([dist_table, size_table, time_table])
    result = {
        "machine": machine,
        "command": common.command_line(),
        "settings": vars(args),
        "tokenizer": tokenizer_note,
        "distributions": distributions,
        "sizes_bytes": {f"{k[0]} | {k[1]}": val for k, val in sizes.items()},
        "output_cache_nbytes_full": exact,
        "timing_ms": timing,
        "step_time_ms": step_ms,
        "step_time_note": step_note,
        "torch_threads": args.threads,
    }
    common.save(args.name, result, table, args.out)
    print(
        f"\n{args.name}: d={d}, V={v}, {n:,} samples, batch {args.batch}; answer tokens: {proxy_label} "
        f"({tokenizer_note}); step time {step_note}; {args.steps} interleaved steps per cache, "
        f"load average {machine['load_average_at_start']}"
    )
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
