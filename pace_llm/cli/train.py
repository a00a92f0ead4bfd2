"""`pace-llm train RECIPE [section.key=value ...]` and launch/train.py: train PACE-LoRA from a
recipe (pace_llm.training.main does the work; this module gives the command its help)."""

from __future__ import annotations

import os
import sys
from typing import Optional

HELP = """\
usage: {prog} RECIPE [section.key=value ...]

Train PACE-LoRA from a recipe (YAML: model, pace, data, train, deepspeed, output_dir, resume).
Any key can be overridden as section.key=value (train.max_steps=100, pace.mode=fast,
resume=true); unknown keys and wrong types fail before any heavy work, naming the key.

`pace-llm train` runs in this process: one rank (a GPU, or the CPU). For several ranks a
launcher starts launch/train.py, the same trainer with the same arguments, once per rank:

    deepspeed --num_gpus 8 launch/train.py recipes/gsm8k.yaml deepspeed.zero_stage=3
    torchrun --nproc_per_node 8 launch/train.py recipes/gsm8k.yaml
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py recipes/tiny.yaml    # 2 CPU ranks
    sbatch --nodes=4 --gpus-per-node=8 launch/slurm/multi_node.sbatch recipes/gsm8k.yaml

examples:
    pace-llm train recipes/tiny.yaml                        # a tiny model built from a config, CPU
    pace-llm train recipes/tiny.yaml pace.mode=fast train.max_steps=8 output_dir=outputs/t
    pace-llm train recipes/gsm8k.yaml resume=true           # continue from checkpoints/latest

Outputs in output_dir: metrics.jsonl, training_curves.png, tensorboard/, checkpoints/,
adapter/ (PEFT), merged/ (Hugging Face folder), export_check.json. Exit status: 0 done or
stopped (SIGTERM / SIGUSR1 / train.stop_after checkpoint and exit), 1 failed or diverged,
2 a bad recipe, data or target modules."""


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Train; argv None: this process's command line (the launchers add --local_rank to it,
    which the trainer drops: the rank comes from the environment)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not args or args[0] in ("-h", "--help"):
        print(HELP.format(prog=prog or os.path.basename(sys.argv[0])), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    from pace_llm.training import main as train  # torch, transformers, DeepSpeed: after the help

    return train(argv)
