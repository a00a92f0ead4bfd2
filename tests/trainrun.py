"""Run launch/train.py as users do (deepspeed / torchrun / python) and read its outputs.
Commands and environment come from pace_llm.distributed.launcher, as for the demos and bench/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pace_llm.distributed.launcher import free_port, launch_env, script_command, train_command  # noqa: F401  (free_port: for the tests)

ROOT = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    """A run's environment: one OpenMP thread per process (2 ranks on 2 cores), offline."""
    return launch_env(threads=1, **extra)


def launch(
    launcher: str,
    out: Path,
    *overrides: str,
    recipe: str = "recipes/tiny.yaml",
    timeout: int = 400,
    extra_env: dict | None = None,
    check: bool = True,
    script: Path = ROOT / "launch" / "train.py",
) -> subprocess.CompletedProcess:
    """SCRIPT RECIPE output_dir=OUT overrides... (2 ranks under deepspeed / torchrun)."""
    cmd = train_command(launcher, recipe, [f"output_dir={out}", *overrides], script=script, nproc=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def launch_many(tmp_path, runs: list[tuple], recipe: str = "recipes/tiny.yaml", timeout: int = 600) -> dict[str, Path]:
    """Runs (name, overrides[, recipe]), trained one after another in OUT/name by one 2-rank
    torchrun launch (tests/train_many.py: one start-up for all, ~25 s saved a run); a name
    given twice continues in the same folder (resume=true). {name: OUT/name}; each run's log
    lines, ours included, are in OUT/name/train.log."""
    outs = {name: tmp_path / name for name, *_ in runs}
    spec = tmp_path / "runs.json"
    spec.write_text(
        json.dumps(
            [[own[0] if own else recipe, f"output_dir={outs[name]}", *overrides] for name, overrides, *own in runs]
        )
    )
    cmd = script_command("torchrun", ROOT / "tests" / "train_many.py", [str(spec)], nproc=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return outs


def ds_steps(out: Path) -> list[tuple[int, int]]:
    """(trainer step, DeepSpeed's optimizer steps) after each step (tests/train_many.py)."""
    return [(r["step"], r["ds_steps"]) for r in map(json.loads, (out / "ds_steps.jsonl").read_text().splitlines())]


def _logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    """The logged training steps (the step-0 row holds only the held-out loss before training)."""
    return [r for r in _logged(out) if "loss" in r]


def eval_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in _logged(out) if "eval_loss" in r]


def shm_segments() -> set[str]:
    """DeepSpeed's shared-memory all-reduce segments currently in /dev/shm."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}
