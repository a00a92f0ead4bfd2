"""DeepSpeed ZeRO-3's side of the core's hooks (pace_llm.core.hooks), installed on import.

  gather            deepspeed.zero.GatheredParameters on the parameters ZeRO-3 partitions
                    (those with a `ds_id`); others are whole already.
  start_of_forward  what ZeRO-3's pre-hook on the engine's root module does at each
                    forward: reset the parameter coordinator's step. A forward through
                    `get_decoder()` bypasses that hook, so without the reset the coordinator
                    never completes a trace and fetches every module's parameters on demand,
                    without prefetching (BENCHMARKS.md, ZeRO-3).
DeepSpeed itself is imported only when a partitioned parameter is met.
"""

from __future__ import annotations

import contextlib

from pace_llm.core import hooks


def gather(params: list):
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def start_of_forward(model) -> None:
    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)
    if offload is not None:
        offload.get_param_coordinator().reset_step()


hooks.install(gather, start_of_forward)
