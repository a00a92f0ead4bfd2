#!/usr/bin/env bash
# The CUDA path measured in one command on one GPU (issue #15; bench/gpu_check.py has the phases).
#
# 1. Here, on the CPU machine (registry access), once: the wheels the device image lacks, for
#    CPython 3.12 manylinux x86_64, into .whl/ (git-ignored; ~6 MiB):
#        bash bench/gpu_check.sh --prepare
# 2. On the GPU machine (device tool; ~8 min of its 15; results come back through $OUT):
#        run  command: "bash bench/gpu_check.sh"   carry: [".whl"]   timeout_s: 570
#    then copy the returned gpu_check.{json,md} and gpu_export_check.json into bench/results/
#    (gpu_check_logs.tar.gz holds every run's log and metrics.jsonl, for reading, not committing).
#    PACE_GPU_CHECK_BUDGET_S (default 450) bounds tests + training; phases past it are skipped
#    (in order: tests, core, the modes on both models, the extra runs (consistency forms, compile,
#    token-budget packing), the interleaved fused-noise/compile overhead phase).
# 3. Here, before spending a device: the same path end to end with tiny models (< 2 min):
#        bash bench/gpu_check.sh --cpu-smoke [--out DIR]     # results in a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# Pins from requirements/cpu.txt; the rest of deepspeed's and datasets' Requires-Dist is on the
# device image (KINDS.md). typing_extensions: pydantic needs >= 4.16, the image's is not known.
PURE="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 annotated-types==0.8.0
      typing-inspection==0.4.5 hjson==3.1.0 typing_extensions==4.16.0"
BINARY="pydantic_core==2.50.5"

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

prepare() {
    local py=$PY
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
    # deepspeed is an sdist: a pure-Python wheel, ops left to JIT (it imports torch to build)
    "$py" -m pip download -q --no-deps --no-binary=:all: -d "$WHEELS/src" deepspeed==0.19.8
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$WHEELS"/src/deepspeed-*.tar.gz
    rm -rf "$WHEELS/src"
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $PURE $BINARY
    ls -l "$WHEELS"
    echo "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/"
}

case "${1:-}" in
    --prepare) prepare; exit ;;
    --cpu-smoke) shift; exec "$PY" bench/gpu_check.py --cpu-smoke "$@" ;;
esac
# On the device: the carried wheels into /tmp/site, first on the path; then the driver.
[ -d "$WHEELS" ] || { echo "no $WHEELS/: run 'bash bench/gpu_check.sh --prepare' here and carry it" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|pyarrow|fsspec|huggingface.hub|typing.extensions) ' || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 bench/gpu_check.py ${OUT:+--copy-to "$OUT"} "$@"
