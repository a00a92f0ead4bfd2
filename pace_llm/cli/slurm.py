"""The command line of launch/slurm/commands.py, which the sbatch scripts run: the launch
commands of a Slurm allocation (pace_llm.distributed.slurm), printed, run or checked.

    python launch/slurm/commands.py --dry-run RECIPE [overrides]   # print every node's command
    python launch/slurm/commands.py RECIPE [overrides]             # exec this node's (srun task)
    python launch/slurm/commands.py --status RECIPE [overrides]    # done | stopped | none

Reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID and the GPUs per node
(SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or PACE_GPUS_PER_NODE). Every command carries
resume=auto, so a requeued job continues from its last checkpoint and a first start starts. torchrun forwards
SIGUSR1 (sent by `#SBATCH --signal=USR1@...`) to the trainers, which checkpoint and exit.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from pace_llm.distributed.launcher import TRAIN_SCRIPT
from pace_llm.distributed.slurm import expand_nodelist, node_commands, run_status


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None, script: str | os.PathLike = TRAIN_SCRIPT) -> int:
    """--dry-run: print every node's command; --status: the run's status; else exec this
    node's command (SLURM_NODEID). script: the launch/train.py the nodes run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("--dry-run", "--status") else "--exec"
    if not argv:
        print(__doc__)
        return 2
    if mode == "--status":
        print(run_status(argv))
        return 0
    commands = node_commands(os.environ, argv, script)
    if mode == "--dry-run":
        hosts = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
        for rank, cmd in enumerate(commands):
            print(f"[{hosts[rank]}] " + " ".join(cmd))
        return 0
    cmd = commands[int(os.environ.get("SLURM_NODEID", "0"))]
    os.execvp(cmd[0], cmd)
