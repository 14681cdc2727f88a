#!/bin/bash
# `make gpu-check` on an offline CUDA machine whose image has python3 with torch, transformers
# and numpy/pyarrow but no Ray, MLflow or FastAPI, and no network (the lent H100/H200 here):
# the bundle from ../shared/tools/gpu-bundle.sh unpacked, it and the checkout on PYTHONPATH
# (Ray workers import pipelines and serve from it: nothing is pip-installed there), then
# bench/gpu_check.py with its JSON, its log and the GPU's name kept in OUTDIR.
#
#   here, once:  mkdir -p .gpu && ../shared/tools/gpu-bundle.sh .gpu/bundle.tar.xz
#   there:       bash bench/gpu_device.sh .gpu/bundle.tar.xz "$OUT" [gpu_check.py's flags]
#
# .gpu/ is git-ignored: carry it. Exits with gpu_check.py's status; without CUDA that says so
# and exits 0 having run nothing.
set -euo pipefail
BUNDLE=${1:?usage: bench/gpu_device.sh BUNDLE.tar.xz OUTDIR [gpu_check.py flags]}
OUTDIR=${2:?usage: bench/gpu_device.sh BUNDLE.tar.xz OUTDIR [gpu_check.py flags]}
shift 2
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -f "$BUNDLE" ] || { echo "gpu_device.sh: no bundle at $BUNDLE; build it with" \
    "../shared/tools/gpu-bundle.sh and carry it." >&2; exit 2; }
SITE=$(mktemp -d /tmp/gpt2-ray-site.XXXX)
mkdir -p "$OUTDIR"
tar -C "$SITE" -xJf "$BUNDLE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    || echo "no nvidia-smi") | tee "$OUTDIR/gpu.txt"
"$PYTHON" -c "import torch, ray, mlflow, fastapi; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
set -o pipefail
"$PYTHON" bench/gpu_check.py --json "$OUTDIR/gpu_check.json" "$@" 2>&1 \
    | tee "$OUTDIR/gpu_check.log"
