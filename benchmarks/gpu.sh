#!/usr/bin/env bash
# Everything the engines work needs a GPU for, in one run (about 6-8 minutes on an H100/H200): the CUDA
# tests (low-precision CUDA graphs vs eager fp32, ONNX Runtime's CUDA provider, CUDA simplex noise, the
# pipeline through every backend select can choose), the engines table (U-Net per call and the fraction of
# the bf16 matmul peak) and per-study inference time per backend at the node's defaults.
#
# Usage: bash benchmarks/gpu.sh OUT_DIR
# Needs a python3 (or $PYTHON) with a CUDA build of torch, onnx, onnxruntime, onnxscript, safetensors,
# scipy, scikit-image, tqdm, pytest, pytest-timeout, pydicom and opensimplex; it installs nothing.
# Writes machine.txt, tests.txt, engines.txt and pipeline.txt to OUT_DIR; exits 1 if any part failed.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c 'import onnxruntime as ort, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())'
} 2>&1 | tee "$out/machine.txt" || status=1

"$py" -m pytest -q -p no:cacheprovider tests/test_engines_gpu.py tests/test_simplex.py tests/test_engines.py \
    tests/test_engines_pipeline.py tests/test_onnx_export.py 2>&1 | tee "$out/tests.txt" || status=1

"$py" benchmarks/engines.py --rounds 5 --batches 1 7 28 140 560 2>&1 | tee "$out/engines.txt" || status=1

"$py" benchmarks/pipeline.py --repeats 2 --max-batch 28 560 2>&1 | tee "$out/pipeline.txt" || status=1

echo "gpu.sh: exit $status (outputs in $out)"
exit $status
