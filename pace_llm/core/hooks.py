"""Where a distributed backend reaches into the core without the core importing it.

Two moments need the backend: reading a parameter that may be partitioned across ranks
(PACE_fast's WᵀW of the lm_head), and the start of a forward that bypasses the wrapped
module's own hooks (TokenOutputs runs the decoder directly). The core calls `gathered`
and `start_of_forward`; they do nothing until a backend installs its functions
(pace_llm.distributed.zero3 installs DeepSpeed ZeRO-3's when pace_llm is imported).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

_gather: Optional[Callable[[list], ContextManager]] = None
_start: Optional[Callable[[object], None]] = None


def install(gather: Callable[[list], ContextManager], start_of_forward: Callable[[object], None]) -> None:
    """Set the backend: `gather(params)` makes partitioned parameters whole on every rank
    for the length of a `with`; `start_of_forward(model)` runs before each decoder forward."""
    global _gather, _start
    _gather, _start = gather, start_of_forward


def gathered(params: list) -> ContextManager:
    """A context in which `params` are whole (a no-op without a backend)."""
    return _gather(params) if _gather is not None else contextlib.nullcontext()


def start_of_forward(model) -> None:
    if _start is not None:
        _start(model)
