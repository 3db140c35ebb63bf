"""Training throughput in fp32 and in bf16 autocast on this machine, same data, same steps, one run.

`edgenode train` uses bf16 autocast where the hardware has bf16 units (CUDA GPUs, CPUs with AVX512-BF16 or
AMX; inference.train.uses_bf16). This times both precisions on the same phantom pool and prints images/s and
the mean loss over the run, so the speed-up and what it does to the loss are read from one table. On a CPU
without bf16 units only the fp32 row is run (bf16 would be emulated there, and training stays fp32).

    PYTHONPATH=. python benchmarks/train.py                 # small preset, 30 steps of 16 images
    PYTHONPATH=. python benchmarks/train.py --preset tiny --steps 5 --batch-size 4
    PYTHONPATH=. python benchmarks/train.py --image-size 96 --threads 2   # the radiograph model's grid
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.hardware import cpu_info  # noqa: E402
from inference.train import TrainConfig, phantom_slices, pick_device, train, uses_bf16  # noqa: E402

HEADER = ["precision", "steps", "batch", "images/s", "mean loss", "last-5 loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=None, help="model grid (overrides the preset's)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per precision (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    base = TrainConfig(
        preset=args.preset, image_size=args.image_size, steps=args.steps, batch_size=args.batch_size, device=str(device)
    )
    grid = base.unet_config().image_size
    print(f"load before: {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads, device {device}")
    print(f"CPU: {cpu_info().describe()}" + (f"; GPU: {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    pool = phantom_slices(base.seed, 4, 128, 16, grid)
    rows = []
    precisions = [False, True] if uses_bf16(base, device) else [False]
    for amp in precisions:
        cfg = TrainConfig(**{**base.__dict__, "amp": amp})
        train(TrainConfig(**{**cfg.__dict__, "steps": 2}), pool=pool, progress=False)  # warm-up: allocator, kernels
        result = train(cfg, pool=pool, progress=True)
        losses = np.array(result.losses)
        rows.append(
            [
                result.precision,
                str(result.steps_done),
                str(args.batch_size),
                f"{result.steps_done * args.batch_size / result.wall_s:.1f}",
                f"{losses.mean():.4f}",
                f"{losses[-5:].mean():.4f}",
            ]
        )
    if len(precisions) == 1:
        print("bf16: not run (no bf16 units here; training stays fp32)")
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---" for _ in HEADER) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
