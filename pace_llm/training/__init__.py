"""Training from a recipe: `Trainer` (trainer.py) and the command line (`main`).

    deepspeed --num_gpus 8 launch/train.py recipes/gsm8k.yaml pace.lam=0.05
    torchrun --nproc_per_node 8 launch/train.py recipes/gsm8k.yaml
    python launch/train.py recipes/tiny.yaml            # one process

One loop for every launcher: torchrun, deepspeed and Slurm all set RANK / WORLD_SIZE /
MASTER_ADDR; plain `python` gets single-process defaults.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from pace_llm.config import Recipe, RecipeError, load_recipe, to_dict
from pace_llm.core.adapters import TargetError
from pace_llm.data import DataError
from pace_llm.files import write_atomic
from pace_llm.logs import route_logs
from pace_llm.training.resume import resolve_resume
from pace_llm.training.schedule import lr_lambda, warmup_steps
from pace_llm.training.trainer import Trainer

__all__ = ["Trainer", "run", "main", "lr_lambda", "warmup_steps", "resolve_resume"]


def run(recipe: Recipe, trainer_class: type[Trainer] = Trainer) -> str:
    """Train, and export when training is done; returns "done" or "stopped"."""
    out = Path(recipe.output_dir)
    trainer = trainer_class(recipe)
    recipe = trainer.recipe  # resume=auto decided, true/false checked against the folder (resolve_resume)
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_status.json").unlink(missing_ok=True)  # "stopped" must be this attempt's, not an earlier one's
        (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
        if not recipe.resume:  # a fresh run's log starts empty
            (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        status = trainer.fit()
        if status == "done":
            trainer.save_outputs()
        if trainer.rank == 0:  # read by the Slurm scripts: "stopped" means requeue and resume
            write_atomic(out / "run_status.json", json.dumps({"status": status}))
    finally:
        trainer.close()
    return status


def main(argv: list[str] | None = None, trainer_class: type[Trainer] = Trainer) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2
    route_logs(recipe.output_dir, "train.log")  # third-party INFO to the file; warnings and ours to the terminal
    try:
        status = run(recipe, trainer_class)
    except (RecipeError, DataError, TargetError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)  # bad recipe / data / targets, or a diverged run
        return 1 if isinstance(err, FloatingPointError) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if status in ("done", "stopped") else 1
