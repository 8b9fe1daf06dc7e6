#!/usr/bin/env bash
# Prepare, here, what bench/gpu.sh needs on the lent device machine, where only the repository travels
# (64 MiB a call) and the image has torch but not this project's other requirements:
#   .whl/       wheels for training (albumentations and what it needs beyond the image) + huggingface_hub 2.x
#   .whl-app/   wheels for the demo (gradio and what it needs beyond the image), 30 MB of it gradio itself
#   .gpu-data/  a copy of ../shared/data/nus_scene (37 MB)
# All three are ignored by git (.git/info/exclude). They do not fit in one call together, so:
#   call 1: carry [".whl", ".gpu-data"]  command "DATA=.gpu-data/nus_scene STEPS='0 1 2 3' bash bench/gpu.sh"
#   call 2: carry [".whl", ".whl-app"]   command "STEPS='4 5' bash bench/gpu.sh"   (same warm machine: runs/ stays)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for d in /.whl/ /.whl-app/ /.gpu-data/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> "$(git rev-parse --git-path info/exclude)"; done
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
download() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$@"; }
# Pins: requirements.txt and the versions it resolves to here; the image already has the rest (KINDS.md).
pin() { "$py" -c "import importlib.metadata as m, sys; print(*[f'{n}=={m.version(n)}' for n in sys.argv[1:]])" "$@"; }
download .whl $(pin albumentations albucore pydantic pydantic_core annotated-types typing-inspection simsimd stringzilla huggingface_hub)
download .whl-app $(pin gradio gradio_client gradio_image_annotation hf-gradio fastapi starlette uvicorn orjson pydub python-multipart safehttpx \
    semantic-version tomlkit groovy brotli httpx2 httpcore2 opentelemetry-api pytz tzdata truststore)
rm -rf .gpu-data && mkdir -p .gpu-data && cp -r ../shared/data/nus_scene .gpu-data/
du -sh .whl .whl-app .gpu-data
