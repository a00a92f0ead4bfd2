"""The launch commands of a Slurm allocation: one torchrun per node, rendezvous on the first
node, every command with resume=auto (launch/slurm/*.sbatch through pace_llm/cli/slurm.py).

Reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_JOB_ID and the GPUs per node (SLURM_GPUS_ON_NODE,
SLURM_GPUS_PER_NODE or PACE_GPUS_PER_NODE). torchrun forwards SIGUSR1 (sent by
`#SBATCH --signal=USR1@...`) to the trainers, which checkpoint and exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from pace_llm.distributed.launcher import TRAIN_SCRIPT, train_command


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-02,05],login1` -> gpu01 gpu02 gpu05 login1 (as `scontrol show hostnames`)."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
        return out.split()
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def gpus_per_node(env) -> int:
    """GPUs per node from PACE_GPUS_PER_NODE, SLURM_GPUS_ON_NODE or SLURM_GPUS_PER_NODE (else 1)."""
    for key in ("PACE_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            return int(re.findall(r"\d+", env[key])[-1])  # "4" or "h100:4"
    return 1


def node_commands(env, recipe_args: list[str], script: str | os.PathLike = TRAIN_SCRIPT) -> list[list[str]]:
    """One torchrun command per node of the allocation `env` describes (rank order), each
    running `script RECIPE overrides... resume=auto` on the node's GPUs, rendezvous on the
    first node at a port derived from the job id."""
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_NNODES", len(hosts)))
    port = 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000
    gpus = gpus_per_node(env)
    return [
        train_command(
            "torchrun",
            recipe_args[0],
            [*recipe_args[1:], "resume=auto"],
            script=script,
            nproc=gpus,
            nnodes=nnodes,
            node_rank=rank,
            master_addr=hosts[0],
            master_port=port,
        )
        for rank in range(nnodes)
    ]


def run_status(recipe_args: list[str]) -> str:
    """done | stopped | none: what the recipe's run last wrote to run_status.json."""
    from pace_llm.config import load_recipe

    status = Path(load_recipe(recipe_args[0], recipe_args[1:]).output_dir) / "run_status.json"
    return json.loads(status.read_text())["status"] if status.exists() else "none"
