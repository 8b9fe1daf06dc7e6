#!/usr/bin/env bash
# One prepared GPU session (<= 8 minutes on one H200): the NCCL training path, training and inference
# speed per precision, and the demo on CUDA answering /predict. Cheapest and most important first, so
# a time limit cuts only the last (torch.compile) step. Figures and logs go to $OUT (default bench-out/).
#
#   bash bench/gpu.sh                     # on a machine with a CUDA GPU and the project's requirements
#   DATA=path/to/nus_scene bash bench/gpu.sh
#
# On the project's lent device machine: `bash bench/gpu_prepare.sh` here first (wheels and data), then two
# calls, as its header says. STEPS picks the steps (default: all); the trained run is kept in runs/gpu-run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
data=${DATA:-../shared/data/nus_scene}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
for wheels in .whl .whl-app; do  # carried by bench/gpu_prepare.sh's two calls; absent elsewhere
    if [ -d $wheels ] && ls $wheels/*.whl >/dev/null 2>&1; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
done
# The face prior's default detector (MTCNN, hub.mtcnn) needs only torch and any OpenCV; the image's
# own OpenCV is used (its wheel, 62 MB, does not fit beside the others). The cascade detectors need
# OpenCV 4's cascade classifier: bench.infer --options (step 3b) leaves their rows out without one.
cascades=$($py -c "import cv2; print(1 if hasattr(cv2, 'CascadeClassifier') else 0)" 2>/dev/null || echo 0)
steps=" ${STEPS:-0 1 2 3 3b 4 5} "
run_dir=runs/gpu-run
step() { case "$steps" in *" $1 "*) echo; echo "== $* ($(date +%T))";; *) return 1;; esac; }

if step 0 "the machine"; then
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$out/gpu.txt"
$py -c "
import torch
from hub.runtime import precision_name
d = torch.device('cuda')
print('torch', torch.__version__, torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(),
      'auto precision:', precision_name(d))" 2>&1 | tee -a "$out/gpu.txt"
$py -c "import cv2; print('OpenCV', cv2.__version__, '- cascade classifier', bool($cascades))" 2>&1 | tee -a "$out/gpu.txt"
fi

if step 1 "torchrun --nproc_per_node 1: 2 epochs of $data at 288x384 through NCCL, the real loader, auto precision"; then
rm -rf "$run_dir"
timeout 240 $py -m torch.distributed.run --standalone --nproc_per_node 1 -m train --data "$data" --out "$run_dir" \
    --backbone-weights none --lr 1e-3 --size 288x384 --epochs 2 --batch-size 32 --workers 12 \
    2>&1 | tee "$out/train_torchrun.txt"
$py -c "import json; print('runs_on', json.load(open('$run_dir/train_config.json'))['runs_on'])" 2>&1 | tee -a "$out/train_torchrun.txt"
fi

if step 2 "training images/s per precision (fwd+bwd+AdamW at 288x384, batch 32) and the loader"; then
timeout 150 $py -m bench.train --device cuda --data "$data" --size 288x384 --batch 32 --steps 10 --workers 0,8 \
    --precision bf16,fp16,fp32 --json "$out/train_cuda.json" 2>&1 | tee "$out/train_cuda.txt"
fi

model=$run_dir; [ -f "$model/model.safetensors" ] || model=""
if step 3 "inference: reference fp32 vs predict()'s engine per precision, batch 1 and 64, fidelity on the trained run"; then
timeout 150 $py -m bench.infer --device cuda --sizes 480x640 --batch 1,64 --paths reference,default,bf16,fp16,fp32 \
    ${model:+--model "$model"} --json "$out/infer_cuda.json" 2>&1 | tee "$out/infer_cuda.txt"
fi

if step 3b "what each predict() option costs beside the GPU network (MTCNN on the GPU, cascades in CPU threads), crowds"; then
crowds=$(dirname "$data")/eyecrowd/images; [ -d "$crowds" ] || crowds=""
timeout 120 $py -m bench.infer --device cuda --options --sizes 480x640 --batch 1,8 --repeat 5 ${model:+--model "$model"} \
    ${crowds:+--photos "$crowds"} --json "$out/options_cuda.json" 2>&1 | tee "$out/options_cuda.txt"
fi

if step 4 "the demo on CUDA answers /predict through gradio_client" && [ -n "$model" ]; then
    port=7861
    $py app.py --model "$model" --device cuda --port $port > "$out/app.txt" 2>&1 &
    app=$!
    timeout 90 $py - "$port" "$data" <<'PY' 2>&1 | tee "$out/app_check.txt"
import glob, sys, time, urllib.request
port, data = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/"
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=2); break
    except OSError:
        time.sleep(0.5)
from gradio_client import Client, handle_file
client = Client(url, verbose=False)
images = sorted(glob.glob(f"{data}/images/*")) or sorted(glob.glob("space/examples/*"))
image = images[0]
for attempt in range(3):
    start = time.perf_counter()
    overlay, saliency = client.predict(handle_file(image), api_name="/predict")
    print(f"/predict {image}: {time.perf_counter() - start:.2f} s ->", saliency)
PY
    grep -E "loaded|CUDA|bf16|fp16" "$out/app.txt" | head -5
    kill $app
fi

if step 5 "batch-1 latency with torch.compile (its compile time is printed; the slowest step, so last)"; then
timeout 150 $py -m bench.infer --device cuda --sizes 480x640 --batch 1 --paths reference,default,compiled \
    ${model:+--model "$model"} --json "$out/infer_cuda_compiled.json" 2>&1 | tee "$out/infer_cuda_compiled.txt"
fi
