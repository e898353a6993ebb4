# Sourced first by every call script here (run from the repo root on the device machine): the peers that
# ../shared/tools/bench_wheels.sh put in .benchsite, hubs offline, logs unbuffered, the GPU and versions printed.
# Carry [".benchsite"] (prep.sh makes it; the tier calls carry [".gpu"] instead). $1 of each script: the device_call id.
set -euo pipefail
export PYTHONPATH=$PWD/.benchsite:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
bench() { python bench.py --json "$OUT/bench.json" --device_call "$ID" "$@" 2>&1 | grep -v Warning || true; }
