#!/usr/bin/env bash
# What CI cannot check (it has no GPU), in one run on a machine with a CUDA GPU:
#   1. the gpu-marked tests (CUDA text and image extraction, AMP training, the GPU scoring engines);
#   2. the GPU figures: image features with EfficientNet-Lite0 (items/s, decode vs model), one
#      training step of the default and the paper configurations, a full-catalogue evaluation;
#   3. the CPU-passing test files again, now that training and scoring pick the GPU.
#
#   bash scripts/gpu-check.sh OUT_DIR        (run from the repository root, with the venv's python first on PATH)
#
# Each part has its own time limit, so that one that hangs leaves the others their time; the
# test logs and the benchmarks' JSON land in OUT_DIR.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))

part() {  # part NAME SECONDS COMMAND...: run it, log it, say how it ended
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch, timm, transformers, faiss; print("torch", torch.__version__, "timm", timm.__version__, "transformers", transformers.__version__, "faiss", faiss.__version__, "faiss GPUs", faiss.get_num_gpus())'

part gpu-tests 150 python -m pytest -q -m gpu tests/test_features.py tests/test_training.py tests/test_scoring.py
part features 120 python benchmarks/features.py --text-items 0 --image-items 8192 --image-batch-size 256 \
    --image-workers "$workers" --image-chunk-size 8192 --out "$out/features-gpu.json"
part train 120 python benchmarks/train.py --configs default paper --steps 10 --out "$out/train-gpu.json"
part evaluate 90 python benchmarks/evaluate.py --model width=128 text_tokens=30 image_tokens=50 fast_item_encoder=true \
    --repeats 5 --rounds 1 --out "$out/evaluate-gpu.json"
part tests-on-gpu 120 python -m pytest -q -p no:cacheprovider -m "not slow and not s3" \
    tests/test_training.py tests/test_scoring.py tests/test_models.py tests/test_evaluation.py tests/test_features.py
