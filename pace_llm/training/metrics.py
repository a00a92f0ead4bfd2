"""Where logged rows go: OUTPUT_DIR/metrics.jsonl always, TensorBoard when installed.
One writer per run, owned by the trainer, on rank 0 only, closed at the end."""
from __future__ import annotations

import json
from pathlib import Path


class MetricWriter:
    def __init__(self, out: Path, enabled: bool = True):
        self.path, self.enabled, self.tensorboard = Path(out) / "metrics.jsonl", enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:
                pass

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
