"""Ingest throughput: the same CT series sent with dcmtk storescu to edgenode, dcmtk storescp and Orthanc.

    PYTHONPATH=. .venv/bin/python benchmarks/ingest.py [--slices 100] [--size 512] [--repeats 2] [--listeners auto]
        [--running]

Each run sends a CT series uncompressed (Explicit VR Little Endian) over 1 or 4 concurrent associations (the files
split evenly) and times from the first storescu start to the last exit. By default each run starts the receiver
fresh (empty storage, so nothing is a duplicate, and nothing warmed up); with --running each receiver is started
once and kept running, as a node in service is, and each run sends a series of its own. The receivers take turns
(run 1 of each, then run 2 of each, ...; kept running, in alternating order). Reported per cell: the best run, the
median run, and against Orthanc the best runs' ratio and the median over runs of run r's ratio (run r of each
receiver ran one after the other: this VM's speed drifts by tens of per cent within minutes, and the paired
ratio is the least swayed by it). Durability differs and is shown: edgenode fsyncs file +
folder and commits to SQLite (synchronous=FULL) before each Success, three syncs per instance (fewer when
concurrent stores share a batch); Orthanc with SyncStorageArea=true fdatasyncs each file and syncs neither the
folder nor its SQLite index's commits (WAL: synced at checkpoints only), one sync per instance (strace of Orthanc
1.10 over 100 stores: 100 fdatasyncs of the files, 6 of index and WAL); storescp writes without fsync.
edgenode runs `[node] listeners` listener processes (the node's default, "auto", unless --listeners says
otherwise; the table shows how many) and, like the other two, nothing else: no inference worker (its
first start loads the model and probes the backends, seconds of CPU that would land in the timed window)
and no dashboard. The last column is the CPU (user + system) the receiver's processes spent during the send, per
instance (median over the runs): where the machine's cores are the limit, it says whose work they were doing.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.local_orthanc import Orthanc, free_port, peer_env, wait_for_port  # noqa: E402
from tests.dicomgen import make_ct_series, write_datasets  # noqa: E402
from tests.peers import StoreSCP  # noqa: E402

STORESCU = "/usr/bin/storescu"
# What a receiver's context manager yields: its AE title, port, a count of what it stored, and its process id.
Receiver = tuple[str, int, Callable[[], int], int]
CALLING_AE = "STORESCU"


def listener_processes(listeners: str) -> int:
    """The listener processes edgenode runs with `[node] listeners = listeners` on this machine."""
    from node.config import NodeSettings

    return NodeSettings(listeners=listeners).listener_count()


@contextmanager
def edgenode(workdir: Path, listeners: str = "auto") -> Iterator[Receiver]:
    port = free_port()
    config = workdir / "edgenode.toml"
    setting = f'"{listeners}"' if listeners == "auto" else str(int(listeners))
    config.write_text(
        f'[node]\nport = {port}\ndata_dir = "{workdir / "var"}"\nmin_free_disk_mb = 100\nlisteners = {setting}\n'
        f'[[peers]]\nae_title = "{CALLING_AE}"\nhost = "127.0.0.1"\nport = 104\n'
        "[stability]\nstable_seconds = 3600\nmax_wait_seconds = 7200\n"
        "[inference]\nworkers = 0\n[web]\nenabled = false\n"
        '[logging]\nlevel = "WARNING"\n'
    )
    env = peer_env()
    env["PYTHONPATH"] = str(REPO)
    log = (workdir / "edgenode.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_for_port("127.0.0.1", port, 60, proc)

        def count() -> int:
            with sqlite3.connect(workdir / "var" / "edgenode.db") as db:
                return int(db.execute("select count(*) from instances").fetchone()[0])

        yield "EDGENODE", port, count, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@contextmanager
def storescp(workdir: Path) -> Iterator[Receiver]:
    with StoreSCP(workdir / "out") as scp:
        assert scp.proc is not None
        yield scp.aet, scp.port, lambda: len(scp.received()), scp.proc.pid


@contextmanager
def orthanc(workdir: Path) -> Iterator[Receiver]:
    with Orthanc(workdir, sync_storage=True) as server:
        assert server.proc is not None
        count = lambda: int(server.get("/statistics")["CountInstances"])  # noqa: E731
        yield server.aet, server.dicom_port, count, server.proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a receiver: the process and every process under it (edgenode's listeners)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


TARGETS: dict[str, tuple[Callable[[Path], AbstractContextManager[Receiver]], str]] = {
    "edgenode": (edgenode, "fsync file+dir, SQLite FULL commit"),
    "storescp": (storescp, "no fsync, no index"),
    "orthanc": (orthanc, "SyncStorageArea: fdatasync file; SQLite index commit not synced"),
}


def send(aet: str, port: int, files: list[Path], associations: int) -> float:
    chunks = [files[k::associations] for k in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", CALLING_AE, "-aec", aet, "127.0.0.1", str(port), *map(str, chunk)],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return elapsed


Cell = tuple[str, int]  # (receiver, associations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the best and the median are reported")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--listeners", default="auto", help='edgenode\'s [node] listeners (a number or "auto")')
    parser.add_argument(
        "--running",
        action="store_true",
        help="start each receiver once and keep it running (a series of its own per run), instead of fresh per run",
    )
    args = parser.parse_args()
    processes = listener_processes(args.listeners)

    root = Path(tempfile.mkdtemp(prefix="edgenode-bench-ingest-"))
    try:
        files = write_datasets(make_ct_series(args.slices, args.size, args.size), root / "series")
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        mode = "kept running" if args.running else "started fresh for every run"
        print(
            f"series: {len(files)} CT images {args.size}x{args.size}, {megabytes:.1f} MB; receivers {mode}; "
            f"storage under {root}",
            flush=True,
        )
        factories = {
            target: functools.partial(edgenode, listeners=args.listeners) if target == "edgenode" else factory
            for target, (factory, _) in TARGETS.items()
        }
        timings: dict[Cell, list[float]] = {
            (target, associations): [] for target in args.targets for associations in args.associations
        }
        cpu: dict[Cell, list[float]] = {cell: [] for cell in timings}
        with ExitStack() as running:
            receivers = {
                target: running.enter_context(factories[target](_folder(root / f"{target}-running")))
                for target in (args.targets if args.running else [])
            }
            # Run r of every cell before run r+1 of any: the receivers take turns, so a change in the machine's load
            # (a shared machine) falls on all of them rather than on whichever ran last; kept running, they take
            # turns in alternating order.
            for repeat in range(args.repeats):
                for associations in args.associations:
                    series = files
                    if args.running and (repeat, associations) != (0, args.associations[0]):
                        series = write_datasets(  # a running receiver would take the same images as duplicates
                            make_ct_series(args.slices, args.size, args.size), root / f"series-{repeat}-{associations}"
                        )
                    order = args.targets if repeat % 2 == 0 or not args.running else args.targets[::-1]
                    for target in order:
                        if args.running:
                            receiver = receivers[target]
                            before = receiver[2]()
                            seconds, cpu_ms, received = _run(receiver, series, associations)
                            received -= before
                        else:
                            workdir = _folder(root / f"{target}-{associations}-{repeat}")
                            with factories[target](workdir) as receiver:
                                seconds, cpu_ms, received = _run(receiver, series, associations)
                            shutil.rmtree(workdir, ignore_errors=True)
                        if received != len(series):
                            raise RuntimeError(f"{target}: {received} of {len(series)} instances stored")
                        timings[(target, associations)].append(seconds)
                        cpu[(target, associations)].append(cpu_ms)
                        print(
                            f"  {target:9s} x{associations}: run {repeat + 1}: {seconds:6.2f} s, "
                            f"receiver CPU {cpu_ms:.2f} ms per instance",
                            flush=True,
                        )
                    if series is not files:
                        shutil.rmtree(series[0].parent, ignore_errors=True)
        rows = _table(timings, cpu, processes, len(files), megabytes)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _run(receiver: Receiver, files: list[Path], associations: int) -> tuple[float, float, int]:
    """(seconds, receiver CPU ms per instance, instances the receiver holds afterwards) for one send."""
    aet, port, count, pid = receiver
    before = cpu_seconds(pid)
    seconds = send(aet, port, files, associations)
    received = count()
    return seconds, 1000 * (cpu_seconds(pid) - before) / len(files), received


def _table(
    timings: dict[Cell, list[float]], cpu: dict[Cell, list[float]], processes: int, images: int, megabytes: float
) -> list[dict[str, object]]:
    """Print the results table; the rows as data."""
    header = (
        "| receiver | durability | listener processes | assoc. | seconds | instances/s | MB/s | vs Orthanc "
        "| median instances/s | vs Orthanc (median of runs) | receiver CPU ms/instance |"
    )
    print()
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[dict[str, object]] = []
    for (target, associations), times in timings.items():
        seconds, median = min(times), statistics.median(times)
        reference = timings.get(("orthanc", associations))
        ratio = f"{min(reference) / seconds:.2f}x" if reference else "-"
        # Run r of Orthanc against run r of this receiver (they ran one after the other): the median of those
        # ratios, less swayed by the machine's drift than a ratio of medians.
        paired = f"{statistics.median(o / t for o, t in zip(reference, times, strict=True)):.2f}x" if reference else "-"
        listeners = str(processes) if target == "edgenode" else "-"
        cpu_ms = statistics.median(cpu[(target, associations)])
        print(
            f"| {target} | {TARGETS[target][1]} | {listeners} | {associations} | {seconds:.2f} "
            f"| {images / seconds:.1f} | {megabytes / seconds:.1f} | {ratio} | {images / median:.1f} | {paired} "
            f"| {cpu_ms:.2f} |"
        )
        rows.append(
            {
                "receiver": target,
                "associations": associations,
                "listener_processes": processes if target == "edgenode" else None,
                "seconds": seconds,
                "instances_per_s": images / seconds,
                "median_instances_per_s": images / median,
                "mb_per_s": megabytes / seconds,
                "receiver_cpu_ms_per_instance": cpu_ms,
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
