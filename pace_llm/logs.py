"""Where a run's log records go: all of them, from INFO up, to a file in the run's output
folder; to the terminal only what the person running it needs: pace_llm's own lines (the
progress, our warnings) and anyone's errors. Third-party INFO and warnings (vLLM's engine
configuration, DeepSpeed's launcher lines, FutureWarnings, bitsandbytes' missing optional
kernels) stay in the file, and so does what vLLM's engine writes to stderr while it starts.

    from pace_llm.logs import hold_logs, route_logs
    hold_logs()                     # first thing in a command: records wait for the file
    route_logs(output_dir)          # OUTPUT_DIR/run.log, with what was held
    with stderr_to_log(): ...       # C-level stderr (NUMA, kernel loaders) into that file
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path

OURS = "pace_llm"
# Libraries that install a console handler of their own (and stop propagating), so their
# INFO lines would reach the terminal whatever the root logger does.
THIRD_PARTY = ("vllm", "DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets", "accelerate")
TERMINAL_FORMAT = "%(asctime)s %(name)s: %(message)s"  # as pace_llm.train has always printed
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ROUTED = "_pace_routed"  # marks the handlers route_logs installs, so a second call replaces them


PACKAGE_DIR = str(Path(__file__).resolve().parent)


def is_ours(record: logging.LogRecord) -> bool:
    """pace_llm's loggers, and Python warnings raised from pace_llm's code."""
    if record.name == "py.warnings":
        return PACKAGE_DIR in record.getMessage().split(":", 1)[0]
    return record.name == OURS or record.name.startswith(OURS + ".")


class _ForTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or is_ours(record)


class _Held(logging.handlers.MemoryHandler):
    """Records logged before the run's file is known (imports: peft, bitsandbytes, DeepSpeed),
    kept for it; errors still reach stderr at once."""

    def __init__(self):
        super().__init__(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or is_ours(record):
            print(logging.Formatter(TERMINAL_FORMAT).format(record), file=sys.stderr)
        super().emit(record)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False  # until route_logs hands the records to the file


def hold_logs() -> None:
    """Hold every log record from now until `route_logs` writes them to the run's file (a
    command calls it before its heavy imports; nothing is printed for what is held but errors
    and our own lines). Python warnings are logged too (py.warnings)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Held) for h in root.handlers):
        root.addHandler(_Held())
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _is_console(handler: logging.Handler) -> bool:
    """A plain StreamHandler on the terminal (logging.basicConfig's, a library's own); not a
    file, nor a test framework's capturing handler (a subclass)."""
    return type(handler) is logging.StreamHandler and handler.stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


def route_logs(output_dir: str | os.PathLike, name: str = "run.log") -> Path:
    """Send every logger's records from INFO up to OUTPUT_DIR/NAME (appended) and, on the
    terminal (stdout), keep pace_llm's INFO lines and everyone's warnings and above. Returns
    the file's path.

    Call it once the output folder is known; calling it again moves the file. Libraries that
    are already imported lose their own console handlers; vLLM imported later logs through
    here too (VLLM_CONFIGURE_LOGGING=0, which child processes inherit). A library imported
    later that adds its own console handler (DeepSpeed does, on import) prints its warnings
    on the terminal as before: call route_logs again after importing it to catch its INFO."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _ROUTED, False) or _is_console(h)]:
        root.removeHandler(handler)
        if getattr(handler, _ROUTED, False):
            handler.close()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    for held in [h for h in root.handlers if isinstance(h, _Held)]:
        held.setTarget(to_file)
        held.flush()
        root.removeHandler(held)
    to_terminal = logging.StreamHandler(sys.stdout)
    to_terminal.addFilter(_ForTerminal())
    to_terminal.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    for handler in (to_file, to_terminal):
        setattr(handler, _ROUTED, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings as py.warnings records: ours on the terminal, others' in the file
    hide_library_progress_bars()
    for library in THIRD_PARTY:
        logger = logging.getLogger(library)
        for handler in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
        if not logger.handlers:  # nothing of its own left: through the root's two
            logger.propagate = True
    return path


def hide_library_progress_bars() -> None:
    """No progress bars from transformers, datasets and huggingface_hub (weight loading, map):
    the terminal keeps ours (training, generation). Child processes inherit it."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def routed_file() -> Path | None:
    """The file route_logs writes to, if it was called in this process."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, _ROUTED, False) and isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


@contextlib.contextmanager
def stderr_to_log():
    """Send this process's stderr (file descriptor 2: C++ warnings, a library's own progress
    bars) into the routed log file while the block runs; nothing changes without one."""
    path = routed_file()
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
