"""pace-llm: PACE (NeurIPS 2024) fine-tuning for Hugging Face models.

    import pace_llm
    config = pace_llm.PaceConfig(mode="full", lam=0.1, rank=16, sigma=1.0)
    model = pace_llm.apply_pace(model, config)
    objective = pace_llm.PaceObjective.from_config(config)
    with objective.scope(step):
        objective(model, batch, step).loss.backward()
    plain = pace_llm.merge_pace(model)

Importing pace_llm changes nothing in torch: PACE's shared dropout masks hold only inside
an objective's scope (pace.paired_dropout).
"""
import pace_llm.distributed.zero3  # noqa: F401  (installs ZeRO-3's gather into the core's hooks)
from pace_llm.core.adapters import apply_pace, head_noise, merge_pace, noise_layers, resolve_targets
from pace_llm.core.cache import OutputCache, ShardedEpochSampler
from pace_llm.export import load_adapter, save_adapter, save_merged
from pace_llm.core.objectives import PaceObjective
from pace_llm.core.pace_config import MODES, PaceConfig
from pace_llm.core.outputs import SampleOutputs, TokenOutputs, cache_dim, forward_outputs, supervised_counts

__all__ = [
    "PaceConfig", "apply_pace", "merge_pace", "noise_layers", "head_noise", "resolve_targets",
    "OutputCache", "ShardedEpochSampler", "load_adapter", "save_adapter", "save_merged",
    "MODES", "PaceObjective", "TokenOutputs", "SampleOutputs", "cache_dim", "forward_outputs", "supervised_counts",
]
__version__ = "0.1.0"
