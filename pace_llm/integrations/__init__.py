"""PACE in the trainers people already use (extra: `pip install pace-llm[trl]`).

    from pace_llm.integrations import PaceArguments, PaceTrainer, PaceSFTTrainer

`PaceTrainer` (transformers.Trainer) and `PaceSFTTrainer` (trl.SFTTrainer) take everything
their parent takes (as keywords) plus `pace=PaceArguments(...)`, the recipe's `pace`
section. PaceSFTTrainer is imported on first use, so PaceTrainer needs no trl.
"""

from pace_llm.integrations.arguments import PaceArguments
from pace_llm.integrations.trainer import PaceTrainer, cpu_distributed_state

__all__ = ["PaceArguments", "PaceTrainer", "PaceSFTTrainer", "cpu_distributed_state"]


def __getattr__(name):
    if name == "PaceSFTTrainer":
        from pace_llm.integrations.sft import PaceSFTTrainer

        return PaceSFTTrainer
    raise AttributeError(name)
