"""PACE inside TRL: `PaceSFTTrainer(trl.SFTTrainer)`, the PaceTrainer mixin on TRL's SFT.

    trainer = PaceSFTTrainer(model=model, args=SFTConfig(...), train_dataset=conversations,
                             peft_config=LoraConfig(r=16, ...),       # optional: PACE's own LoRA otherwise
                             pace=PaceArguments(mode="full", lam=0.1, sigma=1.0))

With a `peft_config`, TRL builds the LoRA and PACE adds its noise to it (PaceArguments'
rank / alpha / target_modules are then unused). TRL's packing and padding-free batches put
several samples in one row, and PACE's noise is drawn per row: they are refused until the
per-sample noise of packed rows exists (the packing issue), except in mode `off`.
"""
from __future__ import annotations

from typing import Optional

import trl

from ..pace_config import PaceConfig
from .trainer import PaceMixin


class PaceSFTTrainer(PaceMixin, trl.SFTTrainer):
    def __init__(self, model, args=None, *, pace: Optional[PaceConfig] = None, **kwargs):
        if pace is not None and pace.mode != "off" and args is not None and (
                getattr(args, "packing", False) or getattr(args, "padding_free", False)):
            raise ValueError(
                f"pace.mode={pace.mode} with TRL packing / padding_free: a packed row holds several samples, "
                "and PACE's noise (one draw per sample and channel) would be shared by all of them, its "
                "consistency and PACE_fast's per-sample cache mixed across them. Per-sample noise for packed "
                "rows is not implemented yet: set packing=False and padding_free=False")
        self._pace_init(super().__init__, model, args, kwargs, pace)
