"""Several launch/train.py runs, one after another, in one launch: each 2-rank launch costs
~25 s of start-up on the test machine, a tiny run a few seconds.

    torchrun --nproc_per_node 2 tests/train_many.py SPEC.json
    SPEC.json: [["recipes/tiny.yaml", "output_dir=OUT", "pace.mode=fast", ...], ...]

Each run is `pace_llm.training.run` on a fresh Trainer, as launch/train.py does it: the
global RNG is reseeded, a `resume=true` run reloads model, optimizer, schedule, data position,
RNG and PACE_fast cache from its checkpoint. After each optimizer step the trainer also
writes DeepSpeed's own optimizer-step count to OUT/ds_steps.jsonl (rank 0).
"""

import gc
import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from pace_llm.config import load_recipe
from pace_llm.distributed import deepspeed_engine
from pace_llm.logs import route_logs
from pace_llm.training import Trainer, run


class Recording(Trainer):
    def log_step(self, progress, batch_index, bar):
        super().log_step(progress, batch_index, bar)
        if self.rank == 0:
            with open(self.out / "ds_steps.jsonl", "a") as f:
                f.write(json.dumps({"step": progress.step, "ds_steps": self.engine.global_steps}) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        recipe = load_recipe(argv[0], argv[1:])
        route_logs(recipe.output_dir, "train.log")
        run(recipe, Recording)
        gc.collect()  # the finished run's engine and its ZeRO-3 model config go before the next run
        deepspeed_engine.unset_zero3()
    dist.destroy_process_group()
