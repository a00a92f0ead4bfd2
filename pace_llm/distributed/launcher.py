"""The commands and environment that start launch/train.py (or another script) as one
process, under `deepspeed` or under `torchrun`: the demos, bench/, the Slurm scripts and the
tests all start runs through these, so a free port, the thread count and the extension cache
are decided in one place.

    cmd = train_command("deepspeed", "recipes/tiny.yaml", ["pace.mode=fast"], nproc=2)
    subprocess.run(cmd, env=launch_env(threads=1), cwd=REPO)

Paths assume the checkout this package was installed from (`pip install -e .`, as
scripts/setup.sh does): launch/, recipes/ and .cache/ sit beside pace_llm/.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable, NoReturn, Optional

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
LAUNCHERS = ("python", "deepspeed", "torchrun")
# torchrun passes these on to the trainers, which checkpoint and exit on SIGUSR1 (what
# Slurm sends before the time limit; launch/slurm/) as on SIGTERM.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGUSR1"
# After forwarding a signal torchrun waits this long for the trainers before it SIGKILLs them
# (its default, 30 s, is shorter than a large ZeRO-3 checkpoint): just under the sbatch
# scripts' 300 s lead (`--signal=USR1@300`), so that the checkpoint finishes before Slurm's kill.
TORCHRUN_SHUTDOWN_TIMEOUT = int(os.environ.get("PACE_SHUTDOWN_TIMEOUT", "280"))
# DeepSpeed's console format, "[2026-01-01 10:00:00,000] [INFO] [launch.py:152:main] ...":
# its launcher's INFO lines and warnings (no hostfile: local resources), which a person
# watching a run does not need; as with pace_llm.logs, only its errors reach the terminal.
_DEEPSPEED_CHATTER = re.compile(r"^\[[^\]]*\] \[(DEBUG|INFO|WARNING)\] ")


def free_port() -> int:
    """A local TCP port nobody listens on now, for a rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(threads: Optional[int | str] = 1, offline: bool = True, **extra: str) -> dict[str, str]:
    """os.environ for a launched run: OMP_NUM_THREADS=threads (None: as it is), tokenizers
    without their own thread pool, unbuffered output (a log shows lines as they happen), the
    Hugging Face hub offline (offline=False: as it is) and the compiled-extension cache in
    the repo's .cache/ unless TORCH_EXTENSIONS_DIR is set. `extra` is set last."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update({key: str(value) for key, value in extra.items()})
    return env


def _tool(name: str) -> str:
    """The interpreter's own copy of a console script (the venv's, not whatever is on PATH)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def script_command(
    launcher: str,
    script: str | os.PathLike,
    args: Iterable[str] = (),
    nproc: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: Optional[int] = None,
) -> list[str]:
    """argv that runs `script args` as one process (python; nproc is not used), as nproc
    local ranks (deepspeed, one node) or as nproc ranks on each of nnodes nodes (torchrun,
    rendezvous at master_addr). master_port defaults to a free local port."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    tail = [str(script), *args]
    if launcher == "python":
        return [sys.executable, *tail]
    port = free_port() if master_port is None else master_port
    if launcher == "deepspeed":
        if nnodes != 1:
            raise ValueError("several nodes: use torchrun (deepspeed would need a hostfile)")
        return [_tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), *tail]
    return [
        _tool("torchrun"),
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={port}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={TORCHRUN_SHUTDOWN_TIMEOUT}",
        *tail,
    ]


def train_command(
    launcher: str,
    recipe: str | os.PathLike,
    overrides: Iterable[str] = (),
    script: str | os.PathLike = TRAIN_SCRIPT,
    **placement,
) -> list[str]:
    """argv for `launch/train.py RECIPE overrides...` under `launcher`; `placement` as
    script_command's (nproc, nnodes, node_rank, master_addr, master_port)."""
    return script_command(launcher, script, [str(recipe), *overrides], **placement)


def exit_now(code: int) -> NoReturn:
    """End a process whose work is done without the interpreter's teardown.

    What Python does at exit, less the last part: non-daemon threads are joined, atexit
    handlers run (logging flushes, trackers finish), stdout / stderr are flushed; then the
    process ends instead of freeing every module one by one, which with torch, DeepSpeed and
    peft loaded costs seconds per rank and run for nothing (BENCHMARKS.md, start-up costs)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def for_terminal(line: str) -> bool:
    """Whether a console line of a launched run is for the person watching: everything but
    DeepSpeed's own DEBUG/INFO/WARNING lines (the launcher's world info, spawned commands,
    exits, the missing hostfile); run_logged keeps them in the log."""
    return not _DEEPSPEED_CHATTER.match(line)


def run_logged(cmd: list[str], log: Path, env: Optional[dict] = None, echo: bool = False) -> int:
    """Run cmd in the repo, appending the command line and its output to `log`; returns
    its exit code. echo=False: stdout and stderr go to the log only. echo=True: stdout
    lines also reach the terminal when `for_terminal`, and stderr stays on the terminal as
    it is (progress bars redraw in place; errors and tracebacks show as they happen)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        if not echo:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                fh.write(line)
                if for_terminal(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()
        return proc.returncode
