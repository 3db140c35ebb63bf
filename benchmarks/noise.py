"""Time a 7 x 256 x 256, 6-octave simplex batch: inference/simplex.py (CPU, CUDA) beside opensimplex + numba.

    PYTHONPATH=$PWD python benchmarks/noise.py [--repeats 5] [--size 256] [--batch 7] [--measure-std]

Both compute the same fields (same OpenSimplex kernel, same per-octave seeds); opensimplex runs one numba-compiled,
parallel noise2array call per item and octave (its first call, which compiles, is excluded). --measure-std
re-measures the single-octave standard deviation that inference/simplex.py's SIMPLEX_STD holds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from inference.simplex import NoiseSource, item_seeds, opensimplex2, simplex_noise, splitmix64


def time_it(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up (numba compile, torch thread pool, CUDA context)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def opensimplex_batch(n: int, size: int, seed: int, octaves: int = 6, base: float = 2**-6, pers: float = 0.8):  # type: ignore[no-untyped-def]
    import opensimplex

    coords = np.arange(size, dtype=np.float64)
    fields = np.zeros((n, size, size))
    for i, s in enumerate(item_seeds(seed, n)):
        for o in range(octaves):
            f = base * 2**o
            fields[i] += pers**o * opensimplex.OpenSimplex(splitmix64(s, o)).noise2array(coords * f, coords * f)
    return fields


def measure_std() -> None:
    g = torch.arange(128, dtype=torch.float64)
    for f in (2**-3, 0.173, 2**-1):
        acc, count = 0.0, 0
        for b in range(16):
            v = opensimplex2((g * f)[None, :].expand(128, 128), (g * f)[:, None].expand(128, 128), item_seeds(b, 256))
            acc += float((v.double() ** 2).sum())
            count += v.numel()
        print(f"frequency {f:.4f}: single-octave std over 4096 seeds x 128 x 128 = {(acc / count) ** 0.5:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: their defaults)")
    parser.add_argument("--measure-std", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.measure_std:
        measure_std()
        return
    shape = (args.batch, args.size, args.size)
    rows = []
    ours = simplex_noise(shape, 0).double().numpy()
    ref = opensimplex_batch(args.batch, args.size, 0)
    scale = float(np.std(ref) / np.std(ours)) if np.std(ours) else 1.0
    agreement = float(np.abs(ours * scale - ref).max())
    rows.append(("opensimplex+numba (CPU)", time_it(lambda: opensimplex_batch(args.batch, args.size, 0), args.repeats)))
    rows.append(("edgenode torch (CPU, cold)", time_it(lambda: simplex_noise(shape, 0), args.repeats)))
    source = NoiseSource()  # keeps the lattice geometry between calls, as the sampler does
    rows.append(("edgenode torch (CPU, NoiseSource reused)", time_it(lambda: source(shape, 0), args.repeats)))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()

        def cuda_cold() -> None:
            simplex_noise(shape, 0, device="cuda")
            torch.cuda.synchronize()

        def cuda_warm() -> None:
            source(shape, 0, "cuda")
            torch.cuda.synchronize()

        rows.append((f"edgenode torch ({name}, cold)", time_it(cuda_cold, args.repeats)))
        rows.append((f"edgenode torch ({name}, reused)", time_it(cuda_warm, args.repeats)))
    print(
        f"simplex batch {args.batch} x {args.size} x {args.size}, 6 octaves, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"max |edgenode - opensimplex| after scaling: {agreement:.2e}")
    print(f"{'implementation':44s} {'median ms':>10s} {'min ms':>10s}")
    for name, times in rows:
        print(f"{name:44s} {statistics.median(times) * 1e3:10.1f} {min(times) * 1e3:10.1f}")


if __name__ == "__main__":
    main()
