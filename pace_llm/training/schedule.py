"""The learning-rate schedule: linear warmup, then cosine or linear decay to train.min_lr."""

from __future__ import annotations

import math


def warmup_steps(recipe, total_steps: int) -> int:
    """train.warmup_steps, or ceil(train.warmup_ratio · total steps) (as HF's warmup_ratio)."""
    t = recipe.train
    return t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * total_steps)


def lr_lambda(recipe, total_steps: int):
    """The factor of train.lr at each step, for torch's LambdaLR."""
    t, floor = recipe.train, recipe.train.min_lr / recipe.train.lr
    warmup = warmup_steps(recipe, total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1 - progress if t.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape

    return factor
