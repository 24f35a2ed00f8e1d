#!/usr/bin/env bash
# The GPU check of the fused top-k loss, one script: parity tests on CUDA, then the benchmark at the shapes.
#   OUT=/some/folder bash benchmarks/gpu_check.sh     # from the repository root, on a machine with a CUDA GPU
# Needs the project's environment (torch with CUDA, triton; liger-kernel optional for its baseline). Writes under
# $OUT (default ./gpu_check_out): nvidia-smi.txt, kernel_tests.txt/.xml, benchmark.txt, results.json.
# About 3-5 minutes on one H100 (the full-vocabulary JSD baseline alone needs ~60 GiB; --skip-dense-jsd drops it).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m pytest -q tests/kernels --junitxml "$OUT/kernel_tests.xml" 2>&1 | tee "$OUT/kernel_tests.txt"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/loss_kernel.py --device cuda --out "$OUT/results.json" "$@" 2>&1 | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
echo "kernel tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
