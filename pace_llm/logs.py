"""Where a run's log records go: all of them, from INFO up, to a file in the run's output
folder; to the terminal only what the person running it needs, pace_llm's own lines (the
progress) and anyone's warnings and errors. vLLM's engine configuration, DeepSpeed's
accelerator and launcher lines and the like stay in the file.

    from pace_llm.logs import route_logs
    route_logs(output_dir)          # OUTPUT_DIR/run.log
"""
from __future__ import annotations

import logging
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


class _ForTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == OURS or record.name.startswith(OURS + ".")


def _is_console(handler: logging.Handler) -> bool:
    """A plain StreamHandler on the terminal (logging.basicConfig's, a library's own); not a
    file, nor a test framework's capturing handler (a subclass)."""
    return type(handler) is logging.StreamHandler and handler.stream in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


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
    to_terminal = logging.StreamHandler(sys.stdout)
    to_terminal.addFilter(_ForTerminal())
    to_terminal.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    for handler in (to_file, to_terminal):
        setattr(handler, _ROUTED, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for library in THIRD_PARTY:
        logger = logging.getLogger(library)
        for handler in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
        if not logger.handlers:  # nothing of its own left: through the root's two
            logger.propagate = True
    return path
