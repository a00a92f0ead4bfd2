"""PaceConfig: the one declaration of PACE's settings.

The recipe's `pace:` section is this dataclass (pace_llm/config.py builds it from YAML and
turns a ValueError into an error naming `pace.<field>`), `apply_pace` reads its adapter
fields, `PaceObjective.from_config` its objective fields, and the saved adapter's
pace_config.json is `dataclasses.asdict` of it. Fields, defaults and checks live here only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

MODES = ("off", "noise", "full", "fast", "lazy_half")
ADAPTERS = ("lora_add", "lora_mul_vpt")
SCHEDULES = ("linear", "constant")
CONSISTENCIES = ("auto", "raw_sum", "centred_mse", "kl")  # pace_llm/core/consistency.py's FORMS, and auto


@dataclasses.dataclass
class PaceConfig:
    """What to adapt, how much noise, and which objective.

    mode: off (task loss only; no noise either: plain LoRA), noise (the noise alone, no
        consistency term: the paper's ablation), full ([x; x] with the consistency term),
        fast (one forward, last epoch's output as target), lazy_half.
    lam: the consistency's weight λ; None (the default): the form's own `default_lam`
        (raw_sum 0.1, centred_mse 3, kl 20: pace_llm/core/consistency.py says why).
    target_modules: module-name suffixes (["q_proj", "v_proj"]), one regex matched against
        full module names, "all-linear", or None for the architecture's default.
    sigma_schedule: "linear" (σ decays with depth, the authors' formula) or "constant";
        first_noisy_block=1 is the authors' ViT choice (no noise on the first block).
    noise_head: the authors' HeadLinear: a trained task head's output (the logits, bias
        included) × Z ~ N(1, σ_head²), one draw per sample and class, σ_head the head's σ
        from the depth schedule (its id comes after the last block). No effect without a
        task head: a causal LM's lm_head is frozen under LoRA, so there is nothing to noise.
    consistency: the form of the consistency term (pace_llm/core/consistency.py): raw_sum (the
        paper's ‖f1 − f2‖² summed over classes / vocabulary), centred_mse (per logit, centred
        over the vocabulary), kl (symmetric KL); auto: the task kind's default.
    cache_memory_gb: PACE_fast's per-rank store stays in memory up to this size, else it is
        a memory-mapped file in the output folder.
    """

    mode: Literal[MODES] = "full"
    lam: Optional[float] = None  # None: the consistency form's default_lam (core/consistency.py)
    sigma: float = 1.0
    sigma_schedule: Literal[SCHEDULES] = "linear"
    first_noisy_block: int = 0
    lazy_every: int = 2
    consistency: Literal[CONSISTENCIES] = "auto"
    adapter: Literal[ADAPTERS] = "lora_add"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[Union[str, list[str]]] = None
    train_head: bool = True  # a task head (classifier / score) is trained in full
    noise_head: bool = True  # ...and its logits get noise too (σ_head), as the authors
    cache_memory_gb: float = 2.0

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"{field}: expected {what}, got {getattr(self, field)!r}")

        for field, choices in (
            ("mode", MODES),
            ("adapter", ADAPTERS),
            ("sigma_schedule", SCHEDULES),
            ("consistency", CONSISTENCIES),
        ):
            if getattr(self, field) not in choices:  # (a recipe's type check names these first)
                raise ValueError(f"{field} must be one of {list(choices)}, got {getattr(self, field)!r}")
        need(0 <= self.sigma < math.inf, "sigma", "a value >= 0")  # also false for nan
        need(self.lam is None or 0 <= self.lam < math.inf, "lam", "a finite value >= 0 or null")
        need(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", "a finite value > 0")
        need(0 < self.cache_memory_gb < math.inf, "cache_memory_gb", "a size in GB > 0")
        need(self.rank >= 1, "rank", "an integer >= 1")
        need(self.lazy_every >= 1, "lazy_every", "an integer >= 1")

    @property
    def noise_sigma(self) -> float:
        """The σ the adapters get: none in mode `off`, which is plain LoRA."""
        return 0.0 if self.mode == "off" else self.sigma
