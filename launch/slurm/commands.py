"""Resolve the launch commands of a Slurm allocation: one torchrun per node, rendezvous
on the first node. Used by the sbatch scripts beside this file.

    python launch/slurm/commands.py --dry-run RECIPE [overrides]   # print every node's command
    python launch/slurm/commands.py RECIPE [overrides]             # exec this node's (srun task)
    python launch/slurm/commands.py --status RECIPE [overrides]    # done | stopped | none

Reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID and the GPUs per node
(SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or PACE_GPUS_PER_NODE). Every command carries
resume=true, so a requeued job continues from its last checkpoint. torchrun forwards
SIGUSR1 (sent by `#SBATCH --signal=USR1@...`) to the trainers, which checkpoint and exit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pace_llm.distributed.launcher import train_command

ROOT = Path(__file__).resolve().parents[2]


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-02,05],login1` -> gpu01 gpu02 gpu05 login1 (as `scontrol show hostnames`)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout
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
    for key in ("PACE_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            return int(re.findall(r"\d+", env[key])[-1])  # "4" or "h100:4"
    return 1


def node_commands(env, recipe_args: list[str]) -> list[list[str]]:
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_NNODES", len(hosts)))
    port = 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000
    gpus = gpus_per_node(env)
    # this checkout's launch/train.py: on a cluster pace_llm may be installed elsewhere
    return [train_command("torchrun", recipe_args[0], [*recipe_args[1:], "resume=true"],
                          script=ROOT / "launch" / "train.py", nproc=gpus, nnodes=nnodes, node_rank=rank,
                          master_addr=hosts[0], master_port=port)
            for rank in range(nnodes)]


def run_status(recipe_args: list[str]) -> str:
    from pace_llm.config import load_recipe
    status = Path(load_recipe(recipe_args[0], recipe_args[1:]).output_dir) / "run_status.json"
    return json.loads(status.read_text())["status"] if status.exists() else "none"


def main(argv: list[str]) -> int:
    mode = argv.pop(0) if argv and argv[0] in ("--dry-run", "--status") else "--exec"
    if not argv:
        print(__doc__)
        return 2
    if mode == "--status":
        print(run_status(argv))
        return 0
    commands = node_commands(os.environ, argv)
    if mode == "--dry-run":
        hosts = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
        for rank, cmd in enumerate(commands):
            print(f"[{hosts[rank]}] " + " ".join(cmd))
        return 0
    cmd = commands[int(os.environ.get("SLURM_NODEID", "0"))]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
