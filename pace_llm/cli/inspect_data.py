"""Show what a recipe trains on: the first training samples as the model sees them, with
the supervised tokens marked (green on a terminal, [[...]] otherwise), then per source the
rows, samples, truncated / dropped / skipped counts and the supervised-token distribution.
With data.packing, also how the first micro-batches of training are packed (rows, which
samples with how many tokens each, padding) and the padding of a whole epoch packed vs padded.

    pace-llm inspect recipes/tiny_chat.yaml [section.key=value ...] [--n 3] [--json]
    pace-llm inspect recipes/demo_gsm8k.yaml data.packing=true --n 0 --batches 2

(`python launch/inspect_data.py` takes the same arguments.)

--json prints one JSON object per sample instead (sample_id, source, input_ids, labels,
text, supervised_text) for the first --n samples; the counts go to stderr.
It loads the tokenizer and the data only (no model), through the same task code as training.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def marked(tokenizer, ids, labels, colour: bool) -> str:
    """The decoded sample, each run of supervised tokens wrapped."""
    out, run, run_sup = [], [], None
    for token, label in zip(ids + [None], labels + [None]):
        sup = label is not None and label != -100
        if run and (token is None or sup != run_sup):
            text = tokenizer.decode(run)
            out.append((f"\033[1;32m{text}\033[0m" if colour else f"[[{text}]]") if run_sup else text)
            run = []
        run.append(token)
        run_sup = sup
    return "".join(out)


def distribution(values: list[int]) -> str:
    if not values:
        return "no samples"
    v = np.asarray(values)
    return f"mean {v.mean():.1f}, p50 {np.percentile(v, 50):.0f}, p90 {np.percentile(v, 90):.0f}, max {v.max()}"


def show_packing(task, train, recipe, n_batches: int, out) -> None:
    """The first micro-batches of epoch 0 in a one-process run's order as `collate` packs them,
    then the padding of the whole epoch at train.micro_batch_size (or micro_batch_tokens),
    packed vs padded."""
    from pace_llm.core.cache import ShardedEpochSampler
    from pace_llm.core.packing import padded_tokens
    from pace_llm.core.token_batches import TokenBatchSampler

    size, budget, seed = recipe.train.micro_batch_size, recipe.train.micro_batch_tokens, recipe.train.seed
    lengths = [len(ids) for ids in train["input_ids"]]
    if budget:
        capacity, batches = budget, TokenBatchSampler(lengths, budget, seed=seed).batches(0)
        how = f"micro-batches of up to {budget} tokens (train.micro_batch_tokens) in rows of as many"
    else:
        capacity, order = recipe.data.max_length, list(ShardedEpochSampler(len(train), seed=seed))
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        how = (
            f"micro-batches of {size} samples (train.micro_batch_size) in rows of up to {capacity} "
            "tokens (data.max_length)"
        )
    print(f"--- packing: {how}; epoch 0 of a one-process run", file=out)
    for k, indices in enumerate(batches[:n_batches]):
        batch = task.collate([train[i] for i in indices])
        segment = batch["segment_index"]
        used, longest = int((segment >= 0).sum()), max(lengths[i] for i in indices)
        print(
            f"micro-batch {k}: {len(indices)} samples in {len(segment)} rows of {segment.shape[1]} tokens, "
            f"padding {1 - used / segment.numel():.1%} (padded: {len(indices)} x {longest} tokens, "
            f"padding {1 - used / (len(indices) * longest):.1%})",
            file=out,
        )
        for r, row in enumerate(segment):
            parts = [
                f"#{int(batch['sample_id'][s])} ({int((row == s).sum())})" for s in row.unique().tolist() if s >= 0
            ]
            print(f"  row {r}: {int((row >= 0).sum())} tokens: {', '.join(parts)}", file=out)
    tokens = sum(lengths)
    packed = sum(padded_tokens([lengths[i] for i in b], capacity) for b in batches)
    padded = sum(padded_tokens([lengths[i] for i in b]) for b in batches)
    print(
        f"padding over epoch 0 ({len(batches)} micro-batches, {tokens} tokens): packed {1 - tokens / packed:.1%}, "
        f"padded to each micro-batch's longest sample {1 - tokens / padded:.1%}",
        file=out,
    )
    if budget:  # what sizing the budget reads: memory is held for a full budget every micro-batch
        print(f"token budget filled {tokens / (budget * len(batches)):.1%} on average", file=out)


def main(argv=None, prog=None) -> int:
    """Print the samples and counts; 2 on a bad recipe or data (the message on stderr)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n", type=int, default=3, help="samples to show (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample on stdout")
    parser.add_argument(
        "--batches", type=int, default=2, help="with data.packing: micro-batches whose packing is shown (default 2)"
    )
    args = parser.parse_args(argv)

    import datasets

    from pace_llm.assets.tiny import tiny_tokenizer
    from pace_llm.config import RecipeError, load_recipe
    from pace_llm.data import DataError
    from pace_llm.models import load_tokenizer
    from pace_llm.tasks import get_task

    datasets.disable_progress_bars()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.model.task != "causal_lm":
            raise RecipeError(f"model.task: pace-llm inspect shows causal_lm data, got {recipe.model.task!r}")
        name = recipe.model.name
        tokenizer = tiny_tokenizer() if name.startswith("tiny:") else load_tokenizer(name)
        task = get_task(recipe, tokenizer)
        train, _ = task.datasets()
    except (RecipeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    colour = sys.stdout.isatty() and not args.json
    for sample in train.select(range(min(args.n, len(train)))):
        ids, labels = sample["input_ids"], sample["labels"]
        supervised_ids = [t for t in labels if t != -100]
        if args.json:
            print(
                json.dumps(
                    {
                        "sample_id": sample["sample_id"],
                        "source": task.source_of(sample["sample_id"]),
                        "input_ids": ids,
                        "labels": labels,
                        "text": tokenizer.decode(ids),
                        "supervised_text": tokenizer.decode(supervised_ids),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(
                f"--- sample {sample['sample_id']} ({task.source_of(sample['sample_id'])}): {len(ids)} tokens, "
                f"{len(supervised_ids)} supervised"
            )
            print(marked(tokenizer, ids, labels, colour))
    report = sys.stderr if args.json else sys.stdout
    print("---", file=report)
    for source, stats in task.encode_stats.items():
        print(f"{source}: {stats.summary()}", file=report)
    counts = [sum(x != -100 for x in labels[1:]) for labels in train["labels"]]
    print(f"training set: {len(train)} samples; supervised tokens per sample: {distribution(counts)}", file=report)
    if recipe.data.packing:
        show_packing(task, train, recipe, args.batches, report)
    return 0
