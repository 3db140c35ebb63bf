#!/usr/bin/env bash
# A lent GPU's whole session in one call, inside a fixed wall time: the engines' GPU checks and tables
# (benchmarks/gpu.sh) first, then two radiograph-model runs side by side on the GPU (the `small` preset, as
# shipped, and the `medium` preset at twice the width), each fitted to the time left (`edgenode train
# --fit-time`), from the shipped radiograph model's training images (a cache made here saves rendering them
# there). Why both runs at once: a step of these small U-Nets is a few hundred short kernels, launch-bound on
# a large GPU, so a second process uses what the first leaves idle (side by side on an H200 each trained ~1,100
# radiographs/s, benchmarks/RESULTS.md; a lone run's rate was not measured).
#
# Usage: bash scripts/gpu_session.sh OUT_DIR SECONDS [POOL_CACHE]
#   SECONDS     the wall time the script must end in (the device call's limit, less the transfers)
#   POOL_CACHE  a `<checkpoint>.pool.pt` that `edgenode train` left beside a checkpoint of a run with these data
#               settings (600 radiographs, 256 px, seed 0, 96 grid); without it each run renders its own
# Writes OUT_DIR/bench/{machine,tests,engines,pipeline}.txt and OUT_DIR/rx-{small,medium}.tar (weights, loss
# curve, log). Needs what benchmarks/gpu.sh needs plus matplotlib and the node's CLI packages (pydantic,
# pydantic-settings); it installs nothing.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_session.sh OUT_DIR SECONDS [POOL_CACHE]}
budget=${2:?usage: bash scripts/gpu_session.sh OUT_DIR SECONDS [POOL_CACHE]}
pool=${3:-}
deadline=$(($(date +%s) + budget))
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -z "$pool" ] || pool=$(cd "$(dirname "$pool")" && pwd)/$(basename "$pool")
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# The checks and tables get at most half the time: they are the session's first duty, the runs its second.
timeout -k 10 $((budget / 2)) bash benchmarks/gpu.sh "$out/bench"
echo "gpu_session: gpu.sh exit $?"

# Each run: imports, CUDA start and the cached images (~30 s), then its fitted steps, then shipping (~10 s).
fit=$((deadline - $(date +%s) - 60))
if [ "$fit" -lt 60 ]; then
    echo "gpu_session: $fit s left for training: not started"
    exit 1
fi
work=$(mktemp -d /tmp/edgenode-gpu-train.XXXXXX)
train_run() { # NAME PRESET BATCH LR
    local dir=$work/$1
    mkdir -p "$dir"
    [ -z "$pool" ] || cp "$pool" "$dir/$1.ckpt.pool.pt"
    "$py" -m node train --out "$dir/$1.safetensors" --name "chest-rx-$2" --modality CR,DX --preset "$2" \
        --image-size 96 --steps 1000000 --batch-size "$3" --lr "$4" --t-max 300 --subjects 600 \
        --phantom-size 256 --jitter 0.02 --seed 0 --threads 6 --device cuda --checkpoint-minutes 2 \
        --fit-time "$fit" --time-limit $((fit + 30)) >"$dir/log.txt" 2>&1
    echo "gpu_session: $1 exit $?" | tee -a "$dir/log.txt"
    tar -cf "$out/$1.tar" -C "$dir" log.txt $(cd "$dir" && ls ./*.safetensors ./*.png 2>/dev/null)
}
echo "gpu_session: two radiograph runs, each fitted to $fit s"
train_run rx-small small 128 1e-3 &
train_run rx-medium medium 128 1e-3 &
wait
tail -n 3 "$work"/*/log.txt
