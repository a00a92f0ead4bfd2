"""The trainer's typed state: where the run is, and the micro-steps of the current step."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Progress:
    """Optimizer steps done, the epoch, and how many of its batches are consumed: what a
    checkpoint stores (as `pace_state`) so a resume continues with the next batch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def finish_step(self, batch_index: int) -> None:
        self.step += 1
        self.batches_in_epoch = batch_index + 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MicroStep:
    loss: float
    task_loss: float
    consistency_loss: float
    tokens: int
    seconds: float


class StepStats:
    """The micro-steps of one optimizer step (gradient accumulation), reduced on `pop`."""

    def __init__(self):
        self.micro: list[MicroStep] = []

    def add(self, micro: MicroStep) -> None:
        self.micro.append(micro)

    def clear(self) -> None:
        self.micro = []

    def pop(self, sum_losses: bool = False) -> tuple[float, float, float, float]:
        """(loss, task loss, consistency, tokens/s) of this rank, then starts a new step. The
        losses are averaged over the micro-steps, or summed when each is a share of the step's
        mean (train.loss_normalization=step)."""
        per = 1 if sum_losses else len(self.micro)
        total = {
            f: sum(getattr(m, f) for m in self.micro)
            for f in ("loss", "task_loss", "consistency_loss", "tokens", "seconds")
        }
        self.clear()
        return (
            total["loss"] / per,
            total["task_loss"] / per,
            total["consistency_loss"] / per,
            total["tokens"] / total["seconds"],
        )
