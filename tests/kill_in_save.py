"""launch/train.py whose Trainer SIGKILLs its process once the checkpoint of step
$KILL_AT_STEP is written but not yet committed: the crash-safety test's fault, injected
from the test side through Trainer.before_checkpoint_commit."""

import os
import signal

from pace_llm.distributed.launcher import exit_now
from pace_llm.training import Trainer, main


class KilledInSave(Trainer):
    def before_checkpoint_commit(self, step: int) -> None:
        if step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    exit_now(main(trainer_class=KilledInSave))
