"""The process group and the few collectives the trainer needs, for every launcher.

torchrun, deepspeed and Slurm launches set RANK / WORLD_SIZE / MASTER_ADDR; a plain
`python launch/train.py` becomes a one-process group on a free local port. DeepSpeed
initialises the group (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from pace_llm.distributed.launcher import free_port


def init_distributed(timeout_minutes: float = 30) -> tuple[int, int]:
    """(rank, world size); one local process when no launcher set RANK. `timeout_minutes`: how
    long a collective waits for the slowest rank (rank 0 tokenising a large dataset or merging a
    large model while the others wait at a barrier) before the run fails."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    deepspeed = import_deepspeed()
    if not torch.cuda.is_available():
        skip_deepspeed_shm_allreduce()
    deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(minutes=timeout_minutes))  # NCCL / gloo
    return dist.get_rank(), dist.get_world_size()


def import_deepspeed():
    """`import deepspeed`, without the mlflow import its autotuner makes when mlflow is
    installed (our `trackers` extra): a large share of its import time, in every process of
    every run, for autotuning logs we never use (BENCHMARKS.md, start-up costs). A None entry
    in sys.modules makes that `import mlflow` fail (the autotuner then runs without it);
    removed right after, so mlflow imports normally later."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def skip_deepspeed_shm_allreduce() -> None:
    """DeepSpeed's CPU backend compiles and maps a /dev/shm segment per rank for a
    shared-memory all-reduce that only its inference tensor-parallel path uses, and never
    unlinks it: every run leaks RAM into tmpfs until the machine runs out (BENCHMARKS.md,
    start-up costs). Marked incompatible (the
    table DeepSpeed keeps for edits like this), the op is neither built nor mapped, and
    training's all-reduces go through torch.distributed as before."""
    import_deepspeed().ops.__compatible_ops__["deepspeed_shm_comm"] = False


def all_reduce_scalars(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few Python numbers (metrics, flags). NCCL (GPUs) reduces only CUDA
    tensors and gloo (CPU) only host ones, so the tensor goes where the backend wants it."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    return all_reduce_scalars([float(flag)], dist.ReduceOp.MAX)[0] > 0


def all_ranks(flag: bool) -> bool:
    return all_reduce_scalars([float(flag)], dist.ReduceOp.MIN)[0] > 0


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads, dataset caches), then the others."""
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()
