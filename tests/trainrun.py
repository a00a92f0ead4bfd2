"""Run launch/train.py as users do (deepspeed / torchrun / python) and read its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def launch(launcher: str, out: Path, *overrides: str, recipe: str = "recipes/tiny.yaml", timeout: int = 400,
           extra_env: dict | None = None, check: bool = True,
           script: Path = ROOT / "launch" / "train.py") -> subprocess.CompletedProcess:
    args = [str(script), recipe, f"output_dir={out}", *overrides]
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    elif launcher == "python":
        cmd = [sys.executable, *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
