"""The launch commands of a Slurm allocation, for the sbatch scripts beside this file
(pace_llm/cli/slurm.py; the commands: pace_llm.distributed.slurm).

    python launch/slurm/commands.py --dry-run RECIPE [overrides]   # print every node's command
    python launch/slurm/commands.py RECIPE [overrides]             # exec this node's (srun task)
    python launch/slurm/commands.py --status RECIPE [overrides]    # done | stopped | none
"""

import sys
from pathlib import Path

from pace_llm.cli.slurm import main

if __name__ == "__main__":
    # this checkout's launch/train.py: on a cluster pace_llm may be installed elsewhere
    sys.exit(main(script=Path(__file__).resolve().parents[1] / "train.py"))
