#!/bin/bash
# Every GPU figure the README reports, in one run (7B shapes, random weights built on the GPU; no download).
#
#   bash examples/gpu_benchmarks.sh [OUTPUT_DIR]       # about 8 minutes on one H200
#
# Each step has its own time limit, prints its table as it goes and keeps it in OUTPUT_DIR (default: gpu-results),
# so a slow step costs only its own slot. On a machine whose transformers is not the pinned 5.24, install the pinned
# wheel first (e.g. `pip install --target /tmp/site transformers==5.24.0 && export PYTHONPATH=/tmp/site:$PWD`).
set -o pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | grep -v "USDT\|_warn_once\|Profiler clears" | tee "$out/$name.txt"
    echo "=== $name exit ${PIPESTATUS[0]} ($(date +%T))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# LLaVA-NeXT and LLaVA-OneVision: stock (every crop in the sequence) against FlexAttention.
step next_7b 120 python examples/benchmark_next.py --shape llava-v1.6-mistral-7b --new-tokens 32
step onevision_7b 120 python examples/benchmark_next.py --shape llava-onevision-qwen2-7b --new-tokens 32
# LLaVA-1.5-7B: threshold selection at batch 1 and 8 (time, peak memory, kernels and syncs per decode step).
step llava_7b 200 python examples/benchmark.py --shape llava-1.5-7b --batch-size 1 8 --new-tokens 32 --repeats 3
# Compiled decoding (static cache, CUDA graphs) at batch 1 with a 10% budget: compilation takes most of the slot.
step llava_7b_compiled 240 python examples/benchmark.py --shape llava-1.5-7b --new-tokens 32 --repeats 3 \
    --selection topk --compile
step training_7b 90 python examples/benchmark_training.py --shape llava-1.5-7b --modes lora
