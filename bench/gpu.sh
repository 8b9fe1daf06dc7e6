#!/usr/bin/env bash
# One prepared GPU session: inference and training throughput on CUDA, cheapest checks first, so a
# time limit cuts only the last (torch.compile) step. Figures and JSON go to $OUT (default bench-out/).
#
#   bash bench/gpu.sh            # on a machine with a CUDA GPU and the project's requirements
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$out/gpu.txt"

# 1. Inference: reference fp32 NCHW eager vs the predict() path, batch 1 (latency) and 64 (throughput).
$py -m bench.infer --device cuda --sizes 480x640 --batch 1,64 --paths reference,default \
    --json "$out/infer_cuda.json" 2>&1 | tee "$out/infer_cuda.txt"

# 2. Training step (fwd+bwd+AdamW, bf16 autocast, channels_last) and the data loader per worker count.
$py -m bench.train --device cuda --size 288x384 --batch 32 --steps 10 --workers 0,4,8,12 \
    --json "$out/train_cuda.json" 2>&1 | tee "$out/train_cuda.txt"

# 3. The real loop (`python -m train`) for one epoch on 640x480 synthetic photos with the real loader.
data=$(mktemp -d)
$py -c "from pathlib import Path; from bench.train import synthetic_dataset; synthetic_dataset(Path('$data'), 640)"
$py -m train --data "$data" --out "$data/run" --backbone-weights none --epochs 2 --batch-size 32 --workers 12 \
    --size 288x384 --val-fraction 0.05 2>&1 | tee "$out/train_loop_cuda.txt"

# 4. Batch-1 latency with torch.compile (its compile time is printed; the slowest step, so last).
$py -m bench.infer --device cuda --sizes 480x640 --batch 1 --paths reference,default,compiled \
    --json "$out/infer_cuda_compiled.json" 2>&1 | tee "$out/infer_cuda_compiled.txt"
