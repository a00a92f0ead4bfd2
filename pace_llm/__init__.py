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
from .adapters import apply_pace, head_noise, merge_pace, noise_layers, resolve_targets
from .cache import OutputCache, ShardedEpochSampler
from .export import load_adapter, save_adapter, save_merged
from .objectives import PaceObjective
from .pace_config import MODES, PaceConfig
from .rows import SampleRows, TokenRows, cache_dim, forward_rows, supervised_counts

__all__ = [
    "PaceConfig", "apply_pace", "merge_pace", "noise_layers", "head_noise", "resolve_targets",
    "OutputCache", "ShardedEpochSampler", "load_adapter", "save_adapter", "save_merged",
    "MODES", "PaceObjective", "TokenRows", "SampleRows", "cache_dim", "forward_rows", "supervised_counts",
]
__version__ = "0.1.0"
