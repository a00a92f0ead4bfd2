"""Padding-free packing of causal-LM samples, with one PACE draw per sample (`data.packing`).

A micro-batch's samples (train.micro_batch_size of them, as unpacked, or as many as fit in
train.micro_batch_tokens: core/token_batches.py) are packed into rows of at most
`data.max_length` tokens (train.micro_batch_tokens when set) by best-fit-decreasing: longest
first, each into the open row it fills best, ties to the lower index, so the packing depends
on the micro-batch alone (and hence on the seed, epoch and rank shard, as the batch does).
A packed batch:

    input_ids, labels, position_ids   [R, T]   position_ids restart at 0 at every sample;
                                               no attention_mask: transformers then builds a
                                               block-diagonal causal mask from position_ids
    segment_index                     [R, T]   the sample (0..S-1) each token belongs to,
                                               -1 on a row's unused tail
    sample_id, sample_order           [S]      per sample; sample_order = its position in
                                               the micro-batch as given to collate

Samples are numbered row-major (row 0's first, in row order), so the supervised tokens of
`labels[:, 1:]`, read row-major, come grouped by sample in segment order: TokenOutputs turns
them into per-sample rows and counts, and the objectives never see the packing. Each
sample's first label is -100: it would be predicted from the previous sample's last token.
The micro-batch holds the same samples packed or not, so its token-mean loss and
consistency, and hence the gradients, are the same; only the padding goes.

`from_position_ids` reads a padding-free batch another collator built (TRL's) into this layout.
"""

from __future__ import annotations

from typing import Optional

import torch

NOT_MODEL_INPUTS = ("labels", "sample_id", "segment_index", "sample_order")


def is_packed(batch: dict) -> bool:
    return "segment_index" in batch


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in rows of total length <= capacity (one longer item gets a row)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (free[r], r))
            rows[best].append(i)
            free[best] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def padded_tokens(lengths: list[int], capacity: Optional[int] = None) -> int:
    """Tokens a micro-batch of samples of these lengths takes as a batch, padding included:
    packed into rows of `capacity` as `pack` does (rows x the longest row), or without
    (None) padded to its longest sample."""
    if capacity is None:
        return len(lengths) * max(lengths)
    rows = best_fit_decreasing(lengths, capacity)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def pack(samples: list[dict], capacity: int, pad_id: int) -> dict:
    """Encoded samples (input_ids, labels, sample_id) -> a packed batch (module docstring)."""
    bins = best_fit_decreasing([len(s["input_ids"]) for s in samples], capacity)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in bins)
    shape = (len(bins), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    order = [i for row in bins for i in row]
    for r, row in enumerate(bins):
        start = 0
        for i in row:
            s, n = samples[i], len(samples[i]["input_ids"])
            ids[r, start : start + n] = torch.tensor(s["input_ids"])
            labels[r, start : start + len(s["labels"])] = torch.tensor(s["labels"])
            labels[r, start] = -100  # no target predicted across the boundary
            segment[r, start : start + n] = order.index(i)
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the tail: a block of its own
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "segment_index": segment,
        "sample_id": torch.tensor([samples[i]["sample_id"] for i in order]),
        "sample_order": torch.tensor(order),
    }


def from_position_ids(batch: dict, sample_ids: Optional[torch.Tensor] = None) -> dict:
    """A padding-free batch built elsewhere (TRL's padding_free / packing, transformers'
    DataCollatorWithFlattening: position_ids restarting at every sample, no attention_mask)
    in this module's layout. A token starts a sample where its position does not continue the
    previous token's, transformers' own rule for the block-diagonal mask, so the noise's samples
    are the attention's; each sample's first label becomes -100. `sample_ids` name the first
    samples in order (default 0..S-1); samples after them must be padding (no label): segment -1."""
    positions = batch["position_ids"]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    segment = starts.flatten().cumsum(0).view_as(positions) - 1  # row-major, as pack() numbers them
    labels = batch["labels"].masked_fill(starts, -100)
    found = int(segment.max()) + 1
    if sample_ids is None:
        sample_ids = torch.arange(found, device=positions.device)
    elif found < len(sample_ids) or (labels[segment >= len(sample_ids)] != -100).any():
        raise ValueError(
            f"{len(sample_ids)} sample ids for a batch whose position_ids start {found} samples "
            "(the ones after the named samples must be unlabelled padding)"
        )
    segment = segment.masked_fill(segment >= len(sample_ids), -1)
    return {**batch, "labels": labels, "segment_index": segment, "sample_id": sample_ids}


def duplicate_packed(batch: dict, rows: Optional[int] = None) -> dict:
    """[x; x] of the first `rows` packed rows (all by default): the copies are new samples
    (segments m..2m-1), so they get their own noise draws; sample ids repeat, as unpacked."""
    rows = len(batch["input_ids"]) if rows is None else rows
    segment = batch["segment_index"][:rows]
    m = int(segment.max()) + 1
    out = {k: torch.cat([v[:rows], v[:rows]]) for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    out["segment_index"] = torch.cat([segment, torch.where(segment >= 0, segment + m, segment)])
    out["sample_id"] = torch.cat([batch["sample_id"][:m], batch["sample_id"][:m]])
    return out


def sample_count(batch: dict) -> int:
    """Samples in a batch: segments when packed, else rows."""
    return len(batch["sample_id"]) if is_packed(batch) else len(batch["labels"])
