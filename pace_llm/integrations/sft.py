"""PACE inside TRL: `PaceSFTTrainer(trl.SFTTrainer)`, the PaceTrainer mixin on TRL's SFT.

    trainer = PaceSFTTrainer(model=model, args=SFTConfig(...), train_dataset=conversations,
                             peft_config=LoraConfig(r=16, ...),       # optional: PACE's own LoRA otherwise
                             pace=PaceArguments(mode="full", lam=3.0, sigma=0.5))

With a `peft_config`, TRL builds the LoRA and PACE adds its noise to it (PaceArguments'
rank / alpha / target_modules are then unused).

TRL's packing and padding-free batches work in every mode. `padding_free=True` flattens each
micro-batch into one row; `packing=True` (strategy bfd, the default) packs the dataset once
into rows of `max_length` tokens (column `seq_lengths`) and flattens a micro-batch of those
rows into one row, the same way. Either batch has `position_ids` restarting at every sample,
no attention_mask (transformers then masks block-diagonally) and each sample's first label
-100. The mixin reads the samples off the position_ids (pace_llm.core.packing.from_position_ids):
PACE's noise is one draw per sample and channel, full PACE's [x; x] copies are new samples,
and PACE_fast keys its cache by sample (trainer.first_sample_keys). Two consequences:
  - lazy_half halves by rows, and the micro-batch is one row: its paired steps pair all of it;
  - `packing_strategy="wrapped"` cuts the token stream into rows that attend across samples,
    so there a row is PACE's sample (noise per row, as TRL's model sees it).
Evaluation is TRL's own forward, in eval mode: no noise.
"""

from __future__ import annotations

from typing import Optional

import trl

from pace_llm.core.pace_config import PaceConfig
from pace_llm.integrations.trainer import PaceMixin


class PaceSFTTrainer(PaceMixin, trl.SFTTrainer):
    def __init__(self, model, args=None, *, pace: Optional[PaceConfig] = None, **kwargs):
        self._pace_init(super().__init__, model, args, kwargs, pace)
