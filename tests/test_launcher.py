"""pace_llm.distributed.launcher (the commands and environment every launch here uses) and
pace_llm.logs (library chatter and warnings to a file; our progress and warnings, and errors, to the terminal)."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pace_llm.distributed import launcher
from pace_llm.distributed.launcher import for_terminal, free_port, launch_env, run_logged, script_command, train_command

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_python_command_runs_train_py_in_one_process():
    cmd = train_command("python", "recipes/tiny.yaml", ["pace.mode=fast", "output_dir=x"])
    assert cmd == [
        sys.executable,
        str(launcher.REPO / "launch" / "train.py"),
        "recipes/tiny.yaml",
        "pace.mode=fast",
        "output_dir=x",
    ]


def test_deepspeed_command_has_ranks_and_a_port():
    cmd = train_command("deepspeed", Path("recipes/tiny.yaml"), ["train.max_steps=4"], nproc=2, master_port=29611)
    assert cmd == [
        tool("deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        "29611",
        str(launcher.TRAIN_SCRIPT),
        "recipes/tiny.yaml",
        "train.max_steps=4",
    ]
    default_port = train_command("deepspeed", "r.yaml")[4]
    assert default_port.isdigit() and int(default_port) > 0  # a free one when not given
    with pytest.raises(ValueError, match="torchrun"):
        train_command("deepspeed", "r.yaml", nnodes=2)


def test_torchrun_command_places_the_node():
    cmd = script_command(
        "torchrun", "bench/x.py", ["--smoke"], nproc=4, nnodes=2, node_rank=1, master_addr="gpu07", master_port=29734
    )
    assert cmd == [
        tool("torchrun"),
        "--nnodes=2",
        "--nproc_per_node=4",
        "--node_rank=1",
        "--master_addr=gpu07",
        "--master_port=29734",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGUSR1",
        "--shutdown-timeout=280",  # Slurm's 300 s signal lead, less a margin (torchrun's own: 30 s)
        "bench/x.py",
        "--smoke",
    ]
    with pytest.raises(ValueError, match="launcher must be one of"):
        script_command("mpirun", "x.py")


def test_launch_env(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = launch_env(threads=1, BENCH_COMMAND="python x.py", TMPDIR=Path("/tmp/t"))
    assert env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["TORCH_EXTENSIONS_DIR"] == str(launcher.REPO / ".cache" / "torch_extensions")
    assert env["BENCH_COMMAND"] == "python x.py" and env["TMPDIR"] == "/tmp/t"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    kept = launch_env(threads=None, offline=False)
    assert kept["OMP_NUM_THREADS"] == "8" and kept["HF_HUB_OFFLINE"] == "0"
    assert kept["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


DEEPSPEED_LINES = [
    "[2026-12-02 01:00:39,701] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}",
    "[2026-12-02 01:00:37,406] [INFO] [runner.py:618:main] cmd = python -u -m deepspeed.launcher.launch",
    "[2026-12-02 01:00:37,405] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile",
]


def test_deepspeed_info_and_warning_lines_stay_off_the_terminal():
    assert not any(for_terminal(line) for line in DEEPSPEED_LINES)
    assert for_terminal("[2026-12-02 01:00:37,405] [ERROR] [launch.py:325:sigkill_handler] exits with return code = 1")
    assert for_terminal("2026-12-02 01:00:52,566 pace_llm.train: trainable parameters: 14,336 of 109,632")
    assert for_terminal("error: data.train: no such file")


def test_run_logged_echoes_all_but_deepspeed_info(tmp_path):
    script = (
        "; ".join(f"print({line!r})" for line in [*DEEPSPEED_LINES, "ours"])
        + "; import sys; print('on stderr', file=sys.stderr); sys.exit(3)"
    )
    code = (
        f"from pathlib import Path; from pace_llm.distributed.launcher import run_logged; import sys; "
        f"sys.exit(run_logged([sys.executable, '-c', {script!r}], Path({str(tmp_path / 'echo.log')!r}), echo=True))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "ours\n" and proc.stderr == "on stderr\n"
    logged = (tmp_path / "echo.log").read_text().splitlines()
    assert logged[0].startswith("$ ") and logged[1:] == [*DEEPSPEED_LINES, "ours"]
    # echo=False: both streams into the log, nothing on the terminal
    assert run_logged([sys.executable, "-c", script], tmp_path / "quiet.log") == 3
    assert "on stderr" in (tmp_path / "quiet.log").read_text()


ROUTE = textwrap.dedent("""
    import logging, sys
    # a library with its own console handler that does not propagate (as DeepSpeed, vLLM)
    own = logging.getLogger("DeepSpeed")
    own.addHandler(logging.StreamHandler(sys.stdout))
    own.setLevel(logging.INFO)
    own.propagate = False
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # as pace_llm.train's main does
    from pace_llm.logs import route_logs
    route_logs(sys.argv[1])
    route_logs(sys.argv[1], "run.log")  # a second call replaces the handlers, no doubled lines
    logging.getLogger("vllm.config").info("third-party info")
    own.info("deepspeed info")
    logging.getLogger("transformers.modeling_utils").warning("third-party warning")
    logging.getLogger("pace_llm.train").info("our progress")
    logging.getLogger("pace_llm.train").debug("our debug")
    logging.getLogger().info("root info")
    logging.getLogger("pace_llm.train").warning("our warning")
    logging.getLogger("transformers.modeling_utils").error("third-party error")
""")


def test_route_logs_splits_file_and_terminal(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", ROUTE, str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout.splitlines()
    assert [line.split(" ", 2)[2] for line in terminal] == [
        "pace_llm.train: our progress",
        "pace_llm.train: our warning",
        "transformers.modeling_utils: third-party error",
    ]
    logged = [line.split(" ", 2)[2] for line in (tmp_path / "out" / "run.log").read_text().splitlines()]
    assert logged == [
        "INFO vllm.config: third-party info",
        "INFO DeepSpeed: deepspeed info",
        "WARNING transformers.modeling_utils: third-party warning",
        "INFO pace_llm.train: our progress",
        "INFO root: root info",
        "WARNING pace_llm.train: our warning",
        "ERROR transformers.modeling_utils: third-party error",
    ]
    assert proc.stderr == ""


HELD = textwrap.dedent("""
    import logging, os, sys, warnings
    from pace_llm.logs import hold_logs, route_logs, stderr_to_log
    hold_logs()  # as pace_llm.cli does on import, before the heavy imports speak
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("optional kernels missing")
    logging.getLogger("pace_llm.cli").info("our line before the file is known")
    warnings.warn("a library's future warning", FutureWarning)
    route_logs(sys.argv[1])
    with stderr_to_log():  # a C++ warning and a library's bar, written to file descriptor 2
        os.write(2, b"[W utils.cpp:68] NUMA binding\\n")
    os.write(2, b"after the block\\n")
""")


def test_held_records_warnings_and_c_level_stderr_go_to_the_file(tmp_path):
    """What imports log before the run's file is known, third-party Python warnings, and what
    vLLM's engine writes to stderr while it starts: all in the run's log, none on the terminal
    but our own line; stderr is the terminal again after the block."""
    proc = subprocess.run([sys.executable, "-c", HELD, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for noise in ("optional kernels missing", "future warning", "NUMA binding"):
        assert noise not in terminal, terminal
    assert "our line before the file is known" in proc.stderr and proc.stderr.endswith("after the block\n")
    logged = (tmp_path / "run.log").read_text()
    for line in (
        "WARNING bitsandbytes.backends.cpu.ops: optional kernels missing",
        "INFO pace_llm.cli: our line before the file is known",
        "FutureWarning: a library's future warning",
        "[W utils.cpp:68] NUMA binding",
    ):
        assert line in logged, logged


def test_a_python_warning_is_ours_when_raised_from_pace_llm():
    import logging

    from pace_llm.logs import PACKAGE_DIR, is_ours

    def record(message):
        return logging.LogRecord("py.warnings", logging.WARNING, "", 0, message, None, None)

    assert is_ours(record(f"{PACKAGE_DIR}/benchmarks/evaluation.py:98: UserWarning: no head"))
    assert not is_ours(record("/venv/lib/python3.11/site-packages/vllm/x.py:1: FutureWarning: old"))
