"""What one stored image waits for on this disk: the file's flush, its folder's, and the index's commit.

    PYTHONPATH=$PWD python benchmarks/flushes.py [--images 200] [--size-kib 512] [--folder /path/on/the/spool/disk]

The listener acknowledges an image only once its file and folder are flushed (fsync, in parallel) and its index
row is committed (SQLite WAL, synchronous=FULL: one more flush). This measures each on the folder's disk, one
after another as a single association meets them, so the ingest benchmark's per-image time can be split into
flushes and the CPU the DICOM stack spends; "NORMAL" shows what dropping the commit's flush would save.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def per_call_ms(fn: Callable[[int], None], n: int) -> float:
    fn(0)  # warm-up: the first file and transaction create what later ones reuse
    start = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return (time.perf_counter() - start) / n * 1000


def file_flush(folder: Path, payload: bytes) -> Callable[[int], None]:
    def write(i: int) -> None:
        path = folder / f"{i:06d}.dcm"
        with path.open("wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    return write


def folder_flush(folder: Path) -> Callable[[int], None]:
    def flush(_i: int) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    return flush


def index_commit(path: Path, synchronous: str) -> Callable[[int], None]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS instances (id INTEGER PRIMARY KEY, uid TEXT UNIQUE, row BLOB)")
    db.execute("CREATE TABLE IF NOT EXISTS counts (id INTEGER PRIMARY KEY, n INTEGER)")
    db.execute("INSERT OR IGNORE INTO counts VALUES (1, 0)")

    def commit(i: int) -> None:  # an instance row, a counter update and an audit-sized row, as the listener writes
        db.execute("BEGIN")
        db.execute("INSERT INTO instances (uid, row) VALUES (?, ?)", (f"{synchronous}.{i}", os.urandom(300)))
        db.execute("UPDATE counts SET n = n + 1 WHERE id = 1")
        db.execute("INSERT INTO instances (uid, row) VALUES (?, ?)", (f"{synchronous}.audit.{i}", os.urandom(300)))
        db.execute("COMMIT")

    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size-kib", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=Path("var"), help="a folder on the spool's disk")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(args.size_kib * 1024)
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=args.folder, prefix="flushes-") as tmp:
            folder = Path(tmp)
            measured = {
                f"write + fsync of a {args.size_kib} KiB file": per_call_ms(file_flush(folder, payload), args.images),
                "fsync of its folder": per_call_ms(folder_flush(folder), args.images),
                "index commit, synchronous=FULL (the node's)": per_call_ms(
                    index_commit(folder / "full.db", "FULL"), args.images
                ),
                "index commit, synchronous=NORMAL": per_call_ms(
                    index_commit(folder / "normal.db", "NORMAL"), args.images
                ),
            }
        for name, ms in measured.items():
            rows.setdefault(name, []).append(ms)
    print(f"{args.images} images x {args.repeats} repeats in {args.folder.resolve()}")
    print(f"| {'step':<50} | median ms | min ms | max ms |")
    print(f"|{'-' * 52}|-----------|--------|--------|")
    for name, values in rows.items():
        print(f"| {name:<50} | {statistics.median(values):9.2f} | {min(values):6.2f} | {max(values):6.2f} |")


if __name__ == "__main__":
    main()
