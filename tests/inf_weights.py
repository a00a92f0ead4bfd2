"""launch/train.py whose Trainer overflows one LoRA weight to inf in the update of step
$INF_AT_STEP, with that step's loss finite: the divergence test's fault, injected from the
test side (a real optimizer only gets there through a finite loss in rare overflows)."""

import os

import torch

from pace_llm.distributed.launcher import exit_now
from pace_llm.training import Trainer, main


class InfAfterStep(Trainer):
    def train_step(self, micro_batches, step: int) -> None:
        super().train_step(micro_batches, step)
        if step + 1 == int(os.environ["INF_AT_STEP"]):
            lora = next(p for name, p in self.engine.module.named_parameters() if "lora_B" in name)
            with torch.no_grad():
                lora.view(-1)[0] = float("inf")


if __name__ == "__main__":
    exit_now(main(trainer_class=InfAfterStep))
