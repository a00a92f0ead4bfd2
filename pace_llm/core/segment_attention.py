"""Causal attention computed per packed sample: `model.attn_implementation: segment_sdpa`.

A packed row of T tokens holds samples of lengths n_1 … n_k (core/packing.py: position ids
restart at 0 at each sample). transformers' sdpa and eager attention build a block-diagonal
T x T mask and compute every score under it, T² per row, masked or not; FlexAttention and
flash-attention's varlen kernel skip the masked blocks but have no CPU backward (torch 2.13).
Here each sample is one causal sdpa call over its own n_i tokens, Σ n_i² per row, the exact
same attention (the mask allowed nothing else). A row without restarts (unpacked batches,
right-padded) is a single causal call: padding comes after a sample's tokens, so causality
already keeps it out of their attention, and the padded positions meet no loss.

Registered with transformers' AttentionInterface on first use (register()), for causal
decoders only; no mask is built for it (transformers skips mask creation for attention
functions without a mask function). One host read of the position ids per layer call.
"""

from __future__ import annotations

import torch

NAME = "segment_sdpa"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sample: a new one wherever the position id is 0."""
    rows = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        rows.append(list(zip(starts, starts[1:] + [len(row)])))
    return rows


def segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """query, key, value [B, H, T, D] (key/value may have fewer heads: GQA) -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not getattr(module, "is_causal", True):
        raise ValueError(f"{NAME} is for causal decoders; {type(module).__name__} is not causal")

    def attend(q, k, v):
        out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
        return out

    bounds = segment_bounds(position_ids) if position_ids is not None else [[(0, query.shape[2])]] * len(query)
    if all(len(row) == 1 for row in bounds):
        return attend(query, key, value), None
    rows = [
        torch.cat(
            [attend(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]) for s, e in row], 1
        )
        for b, row in enumerate(bounds)
    ]
    return torch.cat(rows, 0), None


def register() -> None:
    """Make `attn_implementation="segment_sdpa"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_sdpa)
