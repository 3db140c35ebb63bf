#!/usr/bin/env bash
# Two training runs side by side on a lent GPU, each fitted to the wall time given (`edgenode train
# --fit-time`), their weights, loss curves and logs packed into OUT_DIR. Why two at once: a step of these
# small U-Nets is a few hundred short kernels, launch-bound on a large GPU, so a second process uses what the
# first leaves idle (side by side on an H200 each trained ~1,100 radiographs/s, benchmarks/RESULTS.md).
#
# Usage: bash scripts/gpu_train.sh OUT_DIR SECONDS KIND [POOL_CACHE]
#   SECONDS     the wall time the script must end in
#   KIND        rx: the radiograph model (`small`, as shipped, and `medium`), from scratch on the shipped
#                   radiograph model's data settings (600 radiographs, 256 px, seed 0, 96 grid);
#               ct: the CT model, 400 phantom subjects (four times the shipped model's): the shipped `small`
#                   model fine-tuned, and `medium` from scratch, both on the shipped simplex spectrum
#   POOL_CACHE  a `<checkpoint>.pool.pt` that `edgenode train` left beside a checkpoint of a run with these data
#               settings; without it each run renders its own (CT: seconds on a GPU machine's cores)
# Writes OUT_DIR/<kind>-<preset>.tar (weights, loss curve, log). Needs torch with CUDA, matplotlib and the
# node's CLI packages (pydantic, pydantic-settings); it installs nothing.
set -uo pipefail
usage="usage: bash scripts/gpu_train.sh OUT_DIR SECONDS rx|ct [POOL_CACHE]"
out=${1:?$usage}
budget=${2:?$usage}
kind=${3:?$usage}
pool=${4:-}
deadline=$(($(date +%s) + budget))
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -z "$pool" ] || pool=$(cd "$(dirname "$pool")" && pwd)/$(basename "$pool")
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# Each run: imports (~10 s), then `train`, whose fitted time includes building its images (a minute for 400 CT
# subjects), then shipping (~10 s); the rest is margin.
fit=$((deadline - $(date +%s) - 45))
if [ "$fit" -lt 60 ]; then
    echo "gpu_train: $fit s left for training: not started"
    exit 1
fi
work=$(mktemp -d /tmp/edgenode-gpu-train.XXXXXX)
train_run() { # NAME ARGS...
    local name=$1 dir=$work/$1
    shift
    mkdir -p "$dir"
    [ -z "$pool" ] || cp "$pool" "$dir/$name.ckpt.pool.pt"
    "$py" -m node train --out "$dir/$name.safetensors" --seed 0 --threads 6 --device cuda \
        --checkpoint-minutes 2 --checkpoint-every 5000 --steps 1000000 --fit-time "$fit" --time-limit $((fit + 30)) "$@" >"$dir/log.txt" 2>&1
    echo "gpu_train: $name exit $?" | tee -a "$dir/log.txt"
    tar -cf "$out/$name.tar" -C "$dir" log.txt $(cd "$dir" && ls ./*.safetensors ./*.png 2>/dev/null)
}
rx_run() { # NAME PRESET
    train_run "$1" --name "chest-rx-$2" --modality CR,DX --preset "$2" --image-size 96 --batch-size 128 --lr 1e-3 \
        --t-max 300 --subjects 600 --phantom-size 256 --jitter 0.02
}
ct_run() { # NAME PRESET LR [ARGS...]
    local name=$1 preset=$2 lr=$3
    shift 3
    train_run "$name" --name "chest-ct-$preset" --modality CT --preset "$preset" --image-size 64 --batch-size 256 \
        --lr "$lr" --t-max 600 --subjects 400 --phantom-size 192 --phantom-slices 16 --rotate 4 --jitter 0.03 \
        --noise-persistence 0.5 "$@"
}
echo "gpu_train: two $kind runs, each fitted to $fit s"
case $kind in
rx)
    rx_run rx-small small &
    rx_run rx-medium medium &
    ;;
ct)
    ct_run ct-small small 5e-4 --init inference/weights/chest-ct-small.safetensors &
    ct_run ct-medium medium 1e-3 &
    ;;
*)
    echo "$usage"
    exit 2
    ;;
esac
wait
tail -n 3 "$work"/*/log.txt
