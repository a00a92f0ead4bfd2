"""Train PACE-LoRA from a recipe. The same file under every launcher:

    python launch/train.py recipes/tiny.yaml                       # one process (= pace-llm train)
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py recipes/tiny.yaml pace.mode=fast
    torchrun --nproc_per_node 8 launch/train.py recipes/gsm8k.yaml
    sbatch launch/slurm/multi_node.sbatch recipes/gsm8k.yaml       # see launch/slurm/

Overrides follow the recipe as section.key=value (train.max_steps=100, resume=true).
The command line is pace_llm/cli/train.py's, the training pace_llm.training's.
"""

from pace_llm.cli.train import main
from pace_llm.distributed.launcher import exit_now

if __name__ == "__main__":
    exit_now(main())  # an error still raises, with its traceback, through the normal exit
