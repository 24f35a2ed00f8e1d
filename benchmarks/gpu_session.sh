#!/usr/bin/env bash
# Everything a GPU session measures, in one run (at most ≈ 9.5 minutes on one H100/H200), results under $OUT:
#   tests     Triton kernel parity on CUDA (tests/kernels) and the CUDA-graph / compiled decoders
#             (tests/sampling/test_sampling_decode.py)                                             gpu_tests.txt
#   loss      the loss-kernel benchmark at the shapes (N 8192, V 151936, H 896, bf16, K 64)  loss_kernel.*
#   sampling  the sampling benchmark, Qwen2.5-0.5B/1.5B-shaped random models, batch 64, 128 new tokens, 20 batches
#             of varying prompt widths, each row capped at ROW_BUDGET seconds, then a per-step profile  sampling.*
#   trainer   RLKDTrainer optimizer steps, CUDA graphs + fused loss against eager + full logits     trainer_step.*
#   vllm      use_vllm: rollouts through a vLLM server vs in process, NCCL and file weight sync      vllm_rollouts_*
#             (needs vLLM in the image; not in the default PARTS: PARTS=vllm)
# PARTS picks the parts. Each has its own time limit so that one slow part cannot starve the others; the
# benchmarks write their JSON after every row.
#
# Through the device tool (its image has torch + CUDA, triton, transformers, accelerate, pytest; not Liger-Kernel,
# datasets or trl):
#   make gpu-wheels          # here: Liger-Kernel, datasets, trl (+ dill, multiprocess) wheels into .gpu_wheels/
# then run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_wheels"], timeout_s=590).
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
PARTS=${PARTS:-"tests loss sampling trainer"}   # e.g. PARTS="sampling trainer" for what is not yet measured
ROWS=${ROWS:-"generate_default on_policy_cuda_graph on_policy_cuda_graph_sampling generate_static speculative_accept_all_cuda_graph speculative_cuda_graph seq_kd_cuda_graph"}
[ "$DEVICE" = cpu ] && ROWS="generate_default on_policy generate_static speculative_accept_all speculative seq_kd"
status=0
for part in $PARTS; do
    echo "== $part"; date
    case $part in
    tests)
        timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/sampling/test_sampling_decode.py \
            > "$OUT/gpu_tests.txt" 2>&1 || status=1
        tail -n 4 "$OUT/gpu_tests.txt" ;;
    loss)
        timeout 90 "$PY" benchmarks/loss_kernel.py --device "$DEVICE" --out "$OUT/loss_kernel.json" \
            > "$OUT/loss_kernel.txt" 2>&1 || status=1
        grep -v '^\[measured\]' "$OUT/loss_kernel.txt" | tail -n 10 ;;
    sampling)
        # shellcheck disable=SC2086  # ROWS is a list of row names
        timeout 210 "$PY" benchmarks/sampling.py --device "$DEVICE" --shape "$SHAPE" --batches 20 \
            --row-budget-s "$ROW_BUDGET" --profile-step --rows $ROWS --out "$OUT/sampling.json" \
            > "$OUT/sampling.txt" 2>&1 || status=1
        grep -v Warning "$OUT/sampling.txt" | tail -n 16 ;;
    trainer)
        TRAINER_SHAPE=$SHAPE; [ "$DEVICE" = cpu ] && TRAINER_SHAPE=tiny
        timeout 150 "$PY" benchmarks/trainer_step.py --device "$DEVICE" --shape "$TRAINER_SHAPE" --steps 6 \
            --out "$OUT/trainer_step.json" > "$OUT/trainer_step.txt" 2>&1 || status=1
        grep -E '^\{"variant|step time|peak memory|Error' "$OUT/trainer_step.txt" | tail -n 6 ;;
    vllm)
        # use_vllm on a GPU: rollouts through a vLLM server on the same card vs the in-process sampler (SmolLM2-135M,
        # batch 16, 64 new tokens), the weights synced before each step over vLLM's NCCL engine, then by file.
        # Needs vLLM in the image (the device image usually lacks it: the part then says so and is skipped).
        if "$PY" -c "import vllm" > /dev/null 2>&1; then
            export RLKD_VLLM_PYTHON=$(command -v "$PY")
            timeout 240 "$PY" benchmarks/vllm_rollouts.py --device "$DEVICE" --sync nccl --steps 4 \
                --server-arg=--weight-transfer-config --server-arg='{"backend":"nccl"}' \
                --server-arg=--gpu-memory-utilization --server-arg=0.4 --out "$OUT/vllm_rollouts_nccl.json" \
                > "$OUT/vllm_rollouts_nccl.txt" 2>&1 || status=1
            timeout 200 "$PY" benchmarks/vllm_rollouts.py --device "$DEVICE" --sync file --steps 4 \
                --server-arg=--gpu-memory-utilization --server-arg=0.4 --out "$OUT/vllm_rollouts_file.json" \
                > "$OUT/vllm_rollouts_file.txt" 2>&1 || status=1
            grep -h '^median' "$OUT"/vllm_rollouts_*.txt
        else
            echo "vllm is not importable in this image: part skipped (docs/vllm_rollouts.md)" | tee "$OUT/vllm_rollouts.txt"
        fi ;;
    *) echo "unknown part $part"; status=1 ;;
    esac
done
date
exit $status
