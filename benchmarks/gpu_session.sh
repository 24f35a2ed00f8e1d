#!/usr/bin/env bash
# Everything a GPU session should measure, in one run (≈ 8 minutes on one H100), results under $OUT:
#   1. Triton kernel parity on CUDA (tests/kernels, tests/sampling gpu-marked tests)      kernel_tests.txt, .xml
#   2. the loss-kernel benchmark at the shapes (N 8192, V 151936, H 896, bf16)     loss_kernel.json/.txt
#   3. the sampling benchmark, Qwen2.5-0.5B/1.5B-shaped random models, batch 64, 128 new   sampling.json/.txt
# Each part has its own time limit so one slow part cannot starve the others.
#
# Through the device tool (its image has torch + CUDA, triton and transformers, not pytest): first, here,
#   make gpu-wheels          # pure-Python wheels of pytest into .gpu_wheels/ (ignored by git)
# then run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_wheels"], timeout_s=600).
# Copy the numbers into docs/performance.md with the card, the date and this command.
set -uo pipefail
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
{ nvidia-smi; "$PY" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
    > "$OUT/environment.txt" 2>&1
if ! "$PY" -c "import pytest" 2>/dev/null && [ -d .gpu_wheels ]; then
    "$PY" -m pip install --quiet --no-index --find-links .gpu_wheels pytest > "$OUT/pip.txt" 2>&1
fi
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SHAPE=tiny: a dry run of this script's plumbing on a CPU
SHAPE=${SHAPE:-qwen}
status=0
# all kernel tests (on CUDA the Triton parity cases compile for real instead of being interpreted) + gpu-marked ones
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/sampling/test_sampling_decode.py \
    --junitxml "$OUT/kernel_tests.xml" > "$OUT/kernel_tests.txt" 2>&1 || status=1
timeout 180 "$PY" benchmarks/loss_kernel.py --device "$DEVICE" --out "$OUT/loss_kernel.json" \
    > "$OUT/loss_kernel.txt" 2>&1 || status=1
timeout 200 "$PY" benchmarks/sampling.py --device "$DEVICE" --shape "$SHAPE" --batches 8 --out "$OUT/sampling.json" \
    > "$OUT/sampling.txt" 2>&1 || status=1
tail -n 3 "$OUT"/*.txt
exit $status
