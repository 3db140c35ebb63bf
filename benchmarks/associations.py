"""What one association costs a receiver: CPU for its set-up and release, apart from the images it carries.

    PYTHONPATH=. .venv/bin/python benchmarks/associations.py [--images 40] [--repeats 3] [--targets edgenode orthanc]

Each receiver (started fresh, as in benchmarks/ingest.py) gets the same small CT images (64x64, so that the images
themselves cost little) twice: all over one association, then each over an association of its own (dcmtk
storescu, which proposes its 128 default presentation contexts, as a PACS sending with dcmtk does). The CPU of the
receiver's processes (user + system, psutil) over the second send, less the first, divided by the extra
associations, is what an association costs; the first send divided by the images is what an image costs. Two
untimed associations go first: an edgenode listener process that has not seen the sender's request before
negotiates it in full once (~16 ms; node/negotiation_memo.py), as a node in service did long ago. Over
benchmarks/ingest.py's four associations of 25 images, an association's cost weighs on every image: per image it
adds cost / 25. The median over the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ingest import TARGETS, cpu_seconds, send  # noqa: E402

from tests.dicomgen import make_ct_series, write_datasets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["edgenode", "orthanc"], choices=list(TARGETS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgenode-bench-associations-") as folder:
        root = Path(folder)
        together = write_datasets(make_ct_series(args.images, 64, 64, seed=1), root / "together")
        apart = write_datasets(make_ct_series(args.images, 64, 64, seed=2), root / "apart")
        warm_up = write_datasets(make_ct_series(2 * args.repeats * len(args.targets), 64, 64, seed=3), root / "warm")
        per_association: dict[str, list[float]] = {target: [] for target in args.targets}
        per_image: dict[str, list[float]] = {target: [] for target in args.targets}
        for repeat in range(args.repeats):
            for target in args.targets:
                factory, _ = TARGETS[target]
                workdir = root / f"{target}-{repeat}"
                workdir.mkdir()
                with factory(workdir) as (aet, port, count, pid):
                    for _ in range(2):  # untimed: the listener processes have (most likely both) seen the request
                        send(aet, port, [warm_up.pop()], 1)
                    start = cpu_seconds(pid)
                    send(aet, port, together, 1)
                    one = cpu_seconds(pid) - start
                    start = cpu_seconds(pid)
                    for path in apart:
                        send(aet, port, [path], 1)
                    many = cpu_seconds(pid) - start
                    stored = count()
                if stored != 2 * args.images + 2:
                    raise RuntimeError(f"{target}: {stored} of {2 * args.images + 2} instances stored")
                per_association[target].append(1000 * (many - one) / (args.images - 1))
                per_image[target].append(1000 * one / args.images)
                print(
                    f"  {target:9s} run {repeat + 1}: one association {1000 * one:6.0f} ms, "
                    f"{args.images} associations {1000 * many:6.0f} ms of CPU",
                    flush=True,
                )
    print()
    print("| receiver | CPU per association (ms) | CPU per 64x64 image (ms) | per image, 25 per association (ms) |")
    print("|---|---:|---:|---:|")
    for target in args.targets:
        association = statistics.median(per_association[target])
        image = statistics.median(per_image[target])
        print(f"| {target} | {association:.1f} | {image:.2f} | {association / 25:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
