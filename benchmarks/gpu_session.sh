#!/usr/bin/env bash
# Everything a GPU session measures, in one run (at most ≈ 9 minutes on one H100/H200), results under $OUT:
#   1. GPU tests: Triton kernel parity on CUDA (tests/kernels) and the CUDA-graph / compiled decoders
#      (tests/sampling/test_sampling_decode.py)                                          gpu_tests.txt, .xml
#   2. the loss-kernel benchmark at the shapes (N 8192, V 151936, H 896, bf16, K 64)  loss_kernel.json/.txt
#   3. the sampling benchmark, Qwen2.5-0.5B/1.5B-shaped random models, batch 64, 128 new tokens, 20 batches of
#      varying prompt widths, each row capped at ROW_BUDGET seconds                            sampling.json/.txt
# Each part has its own time limit so that one slow part cannot starve the others; the benchmarks write their JSON
# after every row.
#
# Through the device tool (its image has torch + CUDA, triton, transformers and pytest; not Liger-Kernel):
#   make gpu-wheels          # here: the Liger-Kernel wheel (the loss benchmark's baseline) into .gpu_wheels/
# then run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_wheels"], timeout_s=580).
# Copy the numbers into docs/performance.md with the card, the date and this command.
# Dry run of the plumbing on a CPU: OUT=/tmp/gs DEVICE=cpu SHAPE=tiny PY=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
    if [ -d .gpu_wheels ] && ls .gpu_wheels/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_site .gpu_wheels/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_site"
    fi
    nvidia-smi
    "$PY" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} > "$OUT/environment.txt" 2>&1
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-qwen}
ROW_BUDGET=${ROW_BUDGET:-25}
status=0
echo "== gpu tests"; date
timeout 140 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/sampling/test_sampling_decode.py \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -n 4 "$OUT/gpu_tests.txt"
echo "== loss kernel"; date
timeout 120 "$PY" benchmarks/loss_kernel.py --device "$DEVICE" --out "$OUT/loss_kernel.json" \
    > "$OUT/loss_kernel.txt" 2>&1 || status=1
grep -v '^\[measured\]' "$OUT/loss_kernel.txt" | tail -n 12
echo "== sampling"; date
timeout 260 "$PY" benchmarks/sampling.py --device "$DEVICE" --shape "$SHAPE" --batches 20 \
    --row-budget-s "$ROW_BUDGET" --skip speculative_static --out "$OUT/sampling.json" \
    > "$OUT/sampling.txt" 2>&1 || status=1
tail -n 16 "$OUT/sampling.txt"
date
exit $status
