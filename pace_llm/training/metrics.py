"""Where logged rows go: OUTPUT_DIR/metrics.jsonl always, plus train.report_to's trackers.

  tensorboard  OUTPUT_DIR/tensorboard (when torch's SummaryWriter imports; the default)
  wandb        a W&B run in OUTPUT_DIR/wandb: the recipe as its config, every row as
               metrics at its step, training_curves.png saved into the run. WANDB_MODE
               decides online / offline (offline needs no network); WANDB_PROJECT names
               the project (default pace-llm)
  mlflow       an MLflow run: the recipe (flattened) as params, every row as metrics,
               training_curves.png as an artifact. MLFLOW_TRACKING_URI if set, else a
               local file store at OUTPUT_DIR/mlruns (MLflow 3 keeps that store in
               maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for it);
               MLFLOW_EXPERIMENT_NAME names the experiment (default pace-llm)

One writer per run, owned by the trainer, on rank 0 only, closed at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from pace_llm.training.resume import flatten  # the recipe as dotted keys, as the resume check lists them

REPORT_TO = ("tensorboard", "wandb", "mlflow")  # train.report_to (config.validate checks it)


def _numbers(row: dict) -> dict:
    return {
        k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class MetricWriter:
    def __init__(
        self,
        out: Path,
        enabled: bool = True,
        report_to: Sequence[str] = ("tensorboard",),
        config: Optional[dict] = None,
    ):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / "metrics.jsonl"
        self.tensorboard = self.wandb = self.mlflow = None
        unknown = set(report_to) - set(REPORT_TO)
        if unknown:
            raise ValueError(f"report_to: unknown {sorted(unknown)}; choose from {list(REPORT_TO)}")
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                pass
        if "wandb" in report_to:
            import wandb

            (self.out / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "pace-llm"),
                dir=str(self.out),
                name=self.out.name,
                config=config or {},
                reinit="create_new",
            )
        if "mlflow" in report_to:
            self._start_mlflow(config or {})

    def _start_mlflow(self, config: dict) -> None:
        import mlflow
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.out / "mlruns").absolute().as_uri()
        client = mlflow.MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pace-llm")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=self.out.name)
        params = [Param(k, json.dumps(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        self.mlflow = (client, run.info.run_id)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers, step = _numbers(row), int(row["step"])
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])

    def add_artifact(self, path: Path) -> None:
        """A file of the run (training_curves.png) for the trackers that keep files."""
        if not self.enabled or not Path(path).exists():
            return
        if self.wandb is not None:
            self.wandb.save(str(path), base_path=str(Path(path).parent), policy="now")
        if self.mlflow is not None:
            self.mlflow[0].log_artifact(self.mlflow[1], str(path))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow[0].set_terminated(self.mlflow[1])
            self.mlflow = None
