"""Grid-sweep a recipe, one training run per grid point x seed: `pace-llm sweep`, kept at this
path (launch/slurm/sweep.sbatch runs it).

    python launch/sweep.py recipes/tiny_cls.yaml --grid pace.lam=0.1,0.5 --seeds 0,1 \
        --metric eval_accuracy --direction max
    python launch/sweep.py --help        # the flags (pace_llm/cli/sweep.py)
"""

import sys

from pace_llm.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
