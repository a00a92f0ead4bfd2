#!/usr/bin/env bash
# Serve a merged model folder with vLLM's OpenAI-compatible server: `pace-llm serve`
# (pace_llm/cli/serve.py), kept at this path with the same arguments and defaults.
#
#   launch/serve.sh MERGED_DIR [PORT] [extra vLLM arguments...]
#   launch/serve.sh --help
#
# Runs pace-llm with this checkout's .venv/bin/python when present, else python3 (or $PYTHON);
# $PYTHON is also the interpreter of the server. Both execs keep this script's PID: stop the
# server with `kill PID`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=${PYTHON:-python3}; fi
exec "$python" -m pace_llm.cli serve "$@"
