"""pace-llm: PACE (NeurIPS 2024) fine-tuning for Hugging Face models.

    import pace_llm
    model = pace_llm.apply_pace(model, pace_llm.PaceConfig(rank=16, sigma=1.0))
    objective = pace_llm.PaceObjective("full", lam=0.1)
    loss = objective(model, batch, step).loss
    plain = pace_llm.merge_pace(model)
"""
from .adapters import PaceConfig, apply_pace, merge_pace, noise_layers, resolve_targets
from .cache import OutputCache, ShardedEpochSampler
from .export import load_adapter, save_adapter, save_merged
from .objectives import MODES, PaceObjective, cache_dim, forward_rows, supervised_counts

__all__ = [
    "PaceConfig", "apply_pace", "merge_pace", "noise_layers", "resolve_targets",
    "OutputCache", "ShardedEpochSampler", "load_adapter", "save_adapter", "save_merged",
    "MODES", "PaceObjective", "cache_dim", "forward_rows", "supervised_counts",
]
__version__ = "0.1.0"
