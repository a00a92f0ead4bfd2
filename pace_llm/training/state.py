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
    """The micro-steps of one optimizer step (gradient accumulation), averaged on `pop`."""

    def __init__(self):
        self.micro: list[MicroStep] = []

    def __len__(self) -> int:
        return len(self.micro)

    def add(self, micro: MicroStep) -> None:
        self.micro.append(micro)

    def clear(self) -> None:
        self.micro = []

    def pop(self) -> tuple[float, float, float, float]:
        """(loss, task loss, consistency, tokens/s) of this rank; then starts a new step."""
        n = len(self.micro)
        mean = {f: sum(getattr(m, f) for m in self.micro) / n
                for f in ("loss", "task_loss", "consistency_loss", "tokens", "seconds")}
        self.clear()
        return mean["loss"], mean["task_loss"], mean["consistency_loss"], mean["tokens"] / mean["seconds"]
