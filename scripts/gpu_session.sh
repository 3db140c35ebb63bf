#!/usr/bin/env bash
# A lent GPU's whole session in one call, inside a fixed wall time: the engines' GPU checks and tables
# (benchmarks/gpu.sh) first, with at most half the time, then two radiograph-model runs side by side fitted to
# the time left (scripts/gpu_train.sh rx: the `small` preset, as shipped, and `medium`).
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
mkdir -p "$out" && out=$(cd "$out" && pwd)
[ -z "$pool" ] || pool=$(cd "$(dirname "$pool")" && pwd)/$(basename "$pool")
cd "$(dirname "$0")/.."  # gpu.sh and gpu_train.sh set their own environment

# The checks and tables get at most half the time: they are the session's first duty, the runs its second.
timeout -k 10 $((budget / 2)) bash benchmarks/gpu.sh "$out/bench"
echo "gpu_session: gpu.sh exit $?"

bash scripts/gpu_train.sh "$out" $((deadline - $(date +%s))) rx ${pool:+"$pool"}
