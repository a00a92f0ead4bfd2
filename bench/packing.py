"""Padded vs packed training steps (data.packing): tokens/s, supervised tokens/s, step time
and padding, on the same samples, interleaved.

    python bench/packing.py                  # SmolLM2-135M-Instruct, CPU, fp32, 1 thread (~7-11 min)
    python bench/packing.py --mode full      # with full PACE's paired forward (about twice as long)
    python bench/packing.py --smoke          # a tiny Llama, short lengths, seconds (the test)

Three ways to make a micro-batch, each run by the same training step on the same model
(PaceObjective(--mode) forward and loss, default `noise`: PACE's per-sample noise, no second
forward; backward; AdamW step):
  padded  --batches samples, the unpacked collate: one row per sample, padded to the longest
  packed  the same samples in rows of up to max_length tokens (data.packing: best-fit-decreasing
          by pace_llm.core.packing), padded only to the longest row
  budget  train.micro_batch_tokens: whole samples up to a token budget, grouped by the
          trainer's TokenBatchSampler over the length table and packed into one row of the
          budget; the budget is the padded micro-batch's mean real tokens (batch x mean sample
          length; at least max_length, --budget to set it), so each arm carries about the same
          tokens per micro-batch and differs only in padding and layout
  segment budget's micro-batch with model.attn_implementation=segment_sdpa: causal attention per
          packed sample (Σ n² scores per row instead of the masked T², core/segment_attention.py)

Lengths (prompt + answer tokens; the ids themselves are random: speed does not depend on them):
  gsm   the GSM-Symbolic training set (pace_llm.assets, 1,000 variants) encoded as
        recipes/demo_gsm8k.yaml encodes it: SmolLM2's chat template, max_length 384, answer
        tokens supervised.
  chat  long-tailed, chat-like: log-normal lengths, median 100 tokens, σ 0.8 (p90 ~280,
        p99 ~640), at most 1,024 = max_length; the last 40% of each sample supervised.
(--smoke: both log-normal, median 16 tokens, σ 0.3 (gsm) and 0.8 (chat), at most 64.)

Timing (bench/common.py): for each lengths x micro-batch size, --rounds rounds (the first
configuration after an untimed warm-up round); each round draws a micro-batch (padded and packed
hold the same samples) and the round's next budget micro-batch, and runs the three in a rotating
order. tokens/s counts the samples' tokens (not the padding); the ratios are medians over rounds
of (arm tokens/s / padded tokens/s) in the same round.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import common  # bench/common.py: this script's folder is first on sys.path
import train_overhead  # its model loading: SmolLM2 from pace_llm.assets, or a tiny Llama

LENGTHS = {"gsm": 384, "chat": 1024}  # the kinds of lengths, and their max_length
ARMS = ("padded", "packed", "budget", "segment")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a causal-LM folder")
    p.add_argument("--batches", default="8,2", help="micro-batch sizes (samples)")
    p.add_argument("--lengths", default="gsm,chat", help=f"length distributions: {', '.join(LENGTHS)}")
    p.add_argument(
        "--mode",
        default="noise",
        choices=["off", "noise", "fast", "lazy_half", "full"],
        help="PACE objective (fast: no cache is filled, so no consistency term)",
    )
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per lengths x micro-batch size")
    p.add_argument("--budget", type=int, default=None, help="tokens per budget micro-batch (default: see below)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    common.add_run_args(p, smoke_help="tiny Llama, short lengths, 2 rounds")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lengths = args.lengths.split(",")
    if any(k not in LENGTHS for k in args.lengths):
        p.error(f"--lengths: choose from {', '.join(LENGTHS)}")
    if args.mode == "fast":
        p.error("--mode fast needs a filled cache: use noise (the same forward and backward)")
    if args.smoke:
        args.model, args.rounds = "tiny", 2
    args.device, args.dtype = "cpu", "fp32"  # what train_overhead.load_model reads
    args.name = args.name or ("packing_smoke" if args.smoke else f"packing_{args.model}_cpu_fp32")
    return args


# --------------------------------------------------------------------------- lengths


def gsm_lengths() -> list[tuple[int, int]]:
    """(tokens, supervised tokens) of each GSM-Symbolic training sample, encoded as the demo trains."""
    from pace_llm import assets
    from pace_llm.config import load_recipe
    from pace_llm.models import load_tokenizer
    from pace_llm.tasks import get_task

    train_file, _ = assets.gsm_symbolic_files()
    recipe = load_recipe(
        str(common.ROOT / "recipes" / "demo_gsm8k.yaml"),
        [f"model.name={assets.smollm2_dir()}", f"data.train={train_file}", "data.eval=null"],
    )
    train, _ = get_task(recipe, load_tokenizer(recipe.model.name)).datasets()
    return [(len(ids), sum(x != -100 for x in labels[1:])) for ids, labels in zip(train["input_ids"], train["labels"])]


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    lengths = [min(cap, max(8, round(rng.lognormvariate(0, sigma) * median))) for _ in range(n)]
    return [(n_tokens, round(0.4 * n_tokens)) for n_tokens in lengths]


def length_table(kind: str, smoke: bool, seed: int) -> tuple[list[tuple[int, int]], int]:
    """(lengths, max_length) of a kind of lengths."""
    if smoke:
        return lognormal_lengths(256, 16, 0.3 if kind == "gsm" else 0.8, 64, seed), 64
    if kind == "gsm":
        return gsm_lengths(), LENGTHS[kind]
    return lognormal_lengths(1000, 100, 0.8, LENGTHS[kind], seed), LENGTHS[kind]


def materialise(chosen, rng: random.Random, vocab: int) -> list[dict]:
    """Samples of the given (tokens, supervised) lengths: random ids, the last `supervised` labelled."""
    samples = []
    for i, (n, supervised) in enumerate(chosen):
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        samples.append({"input_ids": ids, "labels": [-100] * (n - supervised) + ids[n - supervised :], "sample_id": i})
    return samples


def budget_of(lengths, size: int, max_length: int, args) -> int:
    """The budget micro-batch's tokens: the padded one's mean real tokens, at least max_length."""
    if args.budget:
        return max(args.budget, max_length)
    return max(max_length, round(size * sum(n for n, _ in lengths) / len(lengths)))


def budget_batches(lengths, budget: int, seed: int):
    """An endless stream of the trainer's token-budget micro-batches over the length table
    (TokenBatchSampler, one rank), epoch after epoch: lists of (tokens, supervised)."""
    from pace_llm.core.token_batches import TokenBatchSampler

    sampler = TokenBatchSampler([n for n, _ in lengths], budget, seed=seed)
    epoch = 0
    while True:
        for batch in sampler.batches(epoch):
            yield [lengths[i] for i in batch]
        epoch += 1


# --------------------------------------------------------------------------- the step


class Step:
    """One model, optimizer and objective; `run(batch)` times a training step on it."""

    def __init__(self, args):
        import torch

        import pace_llm
        from pace_llm.core import segment_attention

        model = train_overhead.load_model(args)
        torch.manual_seed(1)
        self.model = pace_llm.apply_pace(
            model, pace_llm.PaceConfig(rank=args.rank, alpha=2 * args.rank, sigma=args.sigma)
        )
        self.model.train()
        segment_attention.register()
        self.objective = pace_llm.PaceObjective(args.mode, lam=1e-3, outputs=pace_llm.TokenOutputs())
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.vocab = self.model.config.vocab_size
        self.step = 0

    def run(self, batch: dict, attention: str = "sdpa") -> float:
        import torch

        self.model.set_attn_implementation(attention)
        start = time.perf_counter()
        with self.objective.scope(self.step, batch):
            loss = self.objective(self.model, batch, self.step).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}")
        self.step += 1
        return seconds


def collates(max_length: int, budget: int) -> dict:
    """{"padded": the causal-LM task's unpacked collate, "packed": its packed one, "budget":
    its packed one with train.micro_batch_tokens (rows of the budget)}."""
    from pace_llm.config import load_recipe
    from pace_llm.tasks import get_task

    overrides = ["model.task=causal_lm", f"data.max_length={max_length}"]
    packed = [*overrides, "data.packing=true"]
    return {
        "padded": get_task(load_recipe(None, overrides)).collate,  # no tokenizer: pad id 0
        "packed": get_task(load_recipe(None, packed)).collate,
        "budget": get_task(load_recipe(None, [*packed, f"train.micro_batch_tokens={budget}"])).collate,
    }


def measure(step: Step, lengths, max_length: int, size: int, args, warm_up: bool, log=print) -> dict:
    """Per arm and round: seconds, tokens, supervised tokens, batch tokens (with padding)."""
    rng = random.Random(f"{args.seed}-{size}-{max_length}")
    budget = budget_of(lengths, size, max_length, args)
    collate = collates(max_length, budget)
    budgeted = budget_batches(lengths, budget, args.seed)
    per_round = {v: [] for v in ARMS}
    for r in range(-1 if warm_up else 0, args.rounds):  # round -1: warm-up, untimed
        samples = materialise(rng.sample(lengths, size), rng, step.vocab)
        batches = {"padded": samples, "packed": samples, "budget": materialise(next(budgeted), rng, step.vocab)}
        batches = {v: collate[v](batches[v]) for v in collate}
        batches["segment"] = batches["budget"]
        for variant in common.rotated(list(ARMS), r):
            batch = batches[variant]
            seconds = step.run(batch, "segment_sdpa" if variant == "segment" else "sdpa")
            if r < 0:
                continue
            tokens = (
                int(batch["attention_mask"].sum()) if variant == "padded" else int((batch["segment_index"] >= 0).sum())
            )
            per_round[variant].append(
                {
                    "seconds": seconds,
                    "tokens": tokens,
                    "batch_tokens": batch["input_ids"].numel(),
                    "supervised": int((batch["labels"][:, 1:] != -100).sum()),
                    "shape": list(batch["input_ids"].shape),
                    "samples": len(batch["sample_id"]),
                }
            )
        if r >= 0:
            log(
                f"  round {r + 1}/{args.rounds}: "
                + "  ".join(
                    f"{v} {last['shape'][0]}x{last['shape'][1]} {last['seconds']:.2f} s"
                    for v, last in ((v, per_round[v][-1]) for v in per_round)
                ),
                flush=True,
            )
    return {"budget_tokens": budget, **per_round}


def summary(measured: dict) -> dict:
    out = {"budget_tokens": measured["budget_tokens"]}
    for arm in ARMS:
        rounds = measured[arm]
        out[arm] = {
            "step_s": common.median([x["seconds"] for x in rounds]),
            "tokens_per_s": common.median([x["tokens"] / x["seconds"] for x in rounds]),
            "supervised_tokens_per_s": common.median([x["supervised"] / x["seconds"] for x in rounds]),
            "tokens_per_micro_batch": sum(x["tokens"] for x in rounds) / len(rounds),
            "samples_per_micro_batch": sum(x["samples"] for x in rounds) / len(rounds),
            "padding": 1 - sum(x["tokens"] for x in rounds) / sum(x["batch_tokens"] for x in rounds),
        }
    for arm in ARMS[1:]:  # tokens/s against padded in the same round
        pairs = zip(measured[arm], measured["padded"])
        ratios = [(a["tokens"] / a["seconds"]) / (p["tokens"] / p["seconds"]) for a, p in pairs]
        out[f"{arm}_ratio"], out[f"{arm}_ratio_per_round"] = common.median(ratios), ratios
    return out


def table(results: dict) -> str:
    rows = []
    for key, s in results.items():
        kind, size = key.split("/")
        rows.append(
            [
                kind,
                size,
                s["budget_tokens"],
                " / ".join(f"{s[a]['tokens_per_micro_batch']:.0f}" for a in ARMS[:3]),
                " / ".join(f"{s[a]['padding']:.1%}" for a in ARMS[:3]),
                " / ".join(f"{s[a]['step_s']:.2f}" for a in ARMS),
                " / ".join(f"{s[a]['tokens_per_s']:.0f}" for a in ARMS),
                f"{s['packed_ratio']:.2f}x",
                f"{s['budget_ratio']:.2f}x",
                f"{s['segment_ratio']:.2f}x",
            ]
        )
    return common.markdown_table(
        [
            "lengths",
            "micro-batch (samples)",
            "budget (tokens)",
            "tokens per micro-batch padded / packed / budget (and segment)",
            "padding padded / packed / budget",
            "step s padded / packed / budget / segment",
            "tokens/s padded / packed / budget / segment",
            "packed / padded tokens/s",
            "budget / padded tokens/s",
            "budget with segment_sdpa / padded tokens/s",
        ],
        rows,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("pace_llm").setLevel(logging.ERROR)
    machine = common.machine_info()
    print(f"building {args.model} (fp32, CPU, {torch.get_num_threads()} thread(s)), PACE mode {args.mode}", flush=True)
    step = Step(args)
    results, raw = {}, {}
    for kind in args.lengths:
        lengths, max_length = length_table(kind, args.smoke, args.seed)
        for size in args.batches:
            print(f"{kind} lengths, micro-batch {size}, rows of up to {max_length} tokens:", flush=True)
            raw[f"{kind}/{size}"] = measure(step, lengths, max_length, size, args, warm_up=not raw)
            results[f"{kind}/{size}"] = summary(raw[f"{kind}/{size}"])
    out = table(results)
    common.save(
        args.name,
        {
            "machine": machine,
            "command": common.command_line(),
            "settings": vars(args),
            "results": results,
            "raw": raw,
            "torch_threads": torch.get_num_threads(),
        },
        out,
        args.out,
    )
    print(
        f"\n{args.name}: {args.model}, PACE mode {args.mode}, {args.rounds} interleaved rounds per row, medians; "
        f"load average {machine['load_average_at_start']}"
    )
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
