"""train.compile: torch.compile of each transformer block, and what the compiler did.

Blocks, not the whole model (torchtune compiles per layer too): the objectives enter the
model in several ways (TokenOutputs runs the decoder and then the head itself, PACE_fast reads
hidden states), a block is the same code every time, so it compiles once and is reused by
every layer, activation checkpointing wraps each block's call whatever it holds, and nothing
outside the blocks (losses, the cache, DeepSpeed's bookkeeping) is traced. PACE's own pieces
compile without graph breaks: the noise (its randn is traced; inside noise_segments() the
packed sample count is a guarded int, so a new count recompiles until dynamo marks it dynamic)
and paired dropout (F.dropout is swapped during a paired step; dynamo guards on it and keeps
one graph per variant). ZeRO-3 is refused by config validation: its parameter gathering runs
in module hooks that dynamo would have to trace.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pace_llm.core.adapters import block_index


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the elements of the longest ModuleList whose elements are named
    as blocks (`layers.N`, `layer.N`, `h.N`, `blocks.N`)."""
    lists = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and block_index(f"{name}.0") == 0
    ]
    if not lists:
        raise ValueError(f"train.compile: no list of transformer blocks found in {type(model).__name__}")
    return list(max(lists, key=len))


def compile_blocks(model: nn.Module, fresh: bool = True, backend: str = "inductor") -> int:
    """Compile each block in place (nn.Module.compile: names, state dict and hooks unchanged);
    returns how many. Compilation itself happens at a block's first call. fresh=False keeps
    what dynamo compiled for other models in this process (benchmarks timing several);
    backend="eager" traces and guards without generating code (tests)."""
    blocks = transformer_blocks(model)
    # consistency_grad_ratio backpropagates twice through one graph (retain_graph), which a
    # backward that donates its saved buffers refuses; the cost is a little backward memory
    torch._functorch.config.donated_buffer = False
    if fresh:
        # a new model, new graphs: code compiled for an earlier model in this process (runs one
        # after another) would meet failing guards and, past dynamo's recompile limit, run eagerly
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # compile_report counts this model's compilation
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def compile_report() -> str:
    """Graphs compiled, graph breaks with their reasons, frames compiled: one log line."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]  # a Counter: reason -> count
    frames = counters["frames"]
    stats = counters["stats"]
    text = (
        f"torch.compile: {stats.get('unique_graphs', 0)} graphs, {sum(breaks.values())} graph breaks, "
        f"{frames.get('ok', 0)} of {frames.get('total', 0)} frames compiled"
    )
    if breaks:
        text += "; breaks: " + "; ".join(f"{n}x {reason[:160]}" for reason, n in breaks.most_common(5))
    return text
