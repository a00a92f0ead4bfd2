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

import importlib

import pace_llm.distributed.zero3  # noqa: F401  (installs ZeRO-3's gather into the core's hooks; no torch)

# Each public name -> the module that defines it, imported on first use (PEP 562): importing
# pace_llm or one of its entry points stays light until the method is needed (`pace-llm --help`
# loads no torch; a command can route logs before peft and bitsandbytes speak at import).
_EXPORTS = {
    "apply_pace": "core.adapters",
    "head_noise": "core.adapters",
    "merge_pace": "core.adapters",
    "noise_layers": "core.adapters",
    "resolve_targets": "core.adapters",
    "OutputCache": "core.cache",
    "ShardedEpochSampler": "core.cache",
    "PaceObjective": "core.objectives",
    "SampleOutputs": "core.outputs",
    "TokenOutputs": "core.outputs",
    "cache_dim": "core.outputs",
    "forward_outputs": "core.outputs",
    "supervised_counts": "core.outputs",
    "MODES": "core.pace_config",
    "PaceConfig": "core.pace_config",
    "load_adapter": "export",
    "save_adapter": "export",
    "save_merged": "export",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pace_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pace_llm.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
__version__ = "0.1.0"
