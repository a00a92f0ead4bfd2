"""Micro-batches as a token budget (`train.micro_batch_tokens`) for packed causal-LM training.

A fixed sample count per micro-batch (train.micro_batch_size) gives micro-batches of very
different token counts when sample lengths vary: the memory must fit the longest, and the
others waste it. Here a micro-batch is instead a group of samples of at most `budget` tokens
in all, which packing (core/packing.py, rows of `budget` tokens) turns into about one full row.

For an epoch, each rank's shard in that epoch's order (ShardedEpochSampler: same seed, epoch
and rank semantics, so a sample never leaves its rank and PACE_fast's cache stays local) is cut
into consecutive windows of about WINDOW_BUDGETS budgets of tokens; best-fit-decreasing groups
each window's samples into batches of <= budget tokens, and the batches keep the shuffled order
(each by its earliest sample). Windows, not the whole shard: the batches then stay a random
draw across the epoch (one window's samples are a random subset), while a window of many
budgets still fills all but about one of its batches. No sample is split; each appears once.

Every rank must run the same number of micro-batches per epoch (DeepSpeed's collectives step
together). Shards and lengths are known everywhere, so each rank groups every rank's shard and
equalises without communication: a rank with fewer batches than the most splits its fullest
batch (most samples, then the earliest) in two, in place, until it has as many. Only a rank
left with single-sample batches and still short repeats its own samples (first ones of the
epoch's order, one per batch), as ShardedEpochSampler pads. The count can differ between
epochs, so the trainer sums them for its schedule, and `len()` follows `set_epoch`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch.utils.data import Sampler

from pace_llm.core.cache import ShardedEpochSampler
from pace_llm.core.packing import best_fit_decreasing

WINDOW_BUDGETS = 16  # tokens per grouping window, in budgets: ~1/16 of a window's batches underfilled


def windows(order: list[int], lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive runs of `order` of at least WINDOW_BUDGETS × budget tokens (the last: the rest)."""
    window, tokens = [], 0
    for i in order:
        window.append(i)
        tokens += lengths[i]
        if tokens >= WINDOW_BUDGETS * budget:
            yield window
            window, tokens = [], 0
    if window:
        yield window


def group(order: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """`order`'s samples in batches of <= budget tokens, best-fit-decreasing within each window;
    a batch's samples, and the batches themselves (each by its first sample), in `order`'s order."""
    batches = []
    for window in windows(order, lengths, budget):
        bins = best_fit_decreasing([lengths[i] for i in window], budget)
        batches += [[window[j] for j in sorted(b)] for b in sorted(bins, key=min)]
    return batches


def equalise(batches: list[list[int]], count: int, order: list[int]) -> list[list[int]]:
    """`batches` made `count` long: the fullest (most samples, then earliest) split in two in
    place, while any has two samples; then repeats of `order`'s first samples, one per batch."""
    batches = list(batches)
    while len(batches) < count:
        k = max(range(len(batches)), key=lambda k: (len(batches[k]), -k))
        if len(batches[k]) < 2:
            break
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches + [[order[j % len(order)]] for j in range(count - len(batches))]


def epoch_batches(orders: list[list[int]], lengths: Sequence[int], budget: int) -> list[list[list[int]]]:
    """Every rank's micro-batches (sample indices) for one epoch, from every rank's shard order:
    grouped within budget, then equalised to the largest count."""
    grouped = [group(order, lengths, budget) for order in orders]
    count = max(len(g) for g in grouped)
    return [equalise(g, count, order) for g, order in zip(grouped, orders)]


class TokenBatchSampler(Sampler[list[int]]):
    """A DataLoader batch_sampler: this rank's micro-batches of <= `budget` tokens for the epoch
    set by `set_epoch` (module docstring); deterministic for (lengths, budget, seed, epoch, rank,
    world_size). `lengths[i]`: sample i's token count (len of its input_ids)."""

    def __init__(self, lengths: Sequence[int], budget: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.lengths, self.budget, self.rank = list(lengths), budget, rank
        self.samplers = [ShardedEpochSampler(len(self.lengths), r, world_size, seed=seed) for r in range(world_size)]
        self.shard = self.samplers[rank].shard  # the samples this rank ever sees (PACE_fast's cache)
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)
        self._counts: dict[int, int] = {}  # epoch -> batch count: the schedule asks for every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches in `epoch` (only the last epoch asked for is kept)."""
        if self._cached is None or self._cached[0] != epoch:
            orders = [s.order(epoch) for s in self.samplers]
            self._cached = (epoch, epoch_batches(orders, self.lengths, self.budget)[self.rank])
            self._counts[epoch] = len(self._cached[1])
        return self._cached[1]

    def count(self, epoch: int) -> int:
        """The micro-batches in `epoch`, the same on every rank."""
        return self._counts[epoch] if epoch in self._counts else len(self.batches(epoch))

    def __len__(self) -> int:
        return self.count(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))
