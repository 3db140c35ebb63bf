"""Per-UID store locks shared by listener processes (node/instance_locks.py): two processes whose threads cross
over stripes (each holds one, and another thread of each waits for the other's) both get through, although the
kernel, which sees locks per process, calls the second wait a deadlock."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from node.instance_locks import STRIPES, InstanceLocks

SPAWN = multiprocessing.get_context("spawn")


def two_uids() -> tuple[str, str]:
    """Two UIDs on different stripes."""
    import hashlib

    def stripe(uid: str) -> int:
        return hashlib.blake2s(uid.encode(), digest_size=2).digest()[0] % STRIPES

    first = "1.2.3.1"
    second = next(f"1.2.3.{n}" for n in range(2, 1000) if stripe(f"1.2.3.{n}") != stripe(first))
    return first, second


def cross_over(path: str, mine: str, theirs: str, i_hold, they_hold, release, done) -> None:  # type: ignore[no-untyped-def]
    """Hold `mine` in one thread; once the other process holds `theirs`, want it from a second thread."""
    locks = InstanceLocks(Path(path))
    errors: list[BaseException] = []

    def hold() -> None:
        with locks.holding(mine):
            i_hold.set()
            release.wait(60)

    def want() -> None:
        try:
            with locks.holding(theirs):
                pass
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert they_hold.wait(60)
    wanter = threading.Thread(target=want)
    wanter.start()
    wanter.join(0.5)  # blocked: the other process holds it (or the kernel said deadlock, and it retries)
    release.set()
    holder.join(60)
    wanter.join(60)
    done.put(repr(errors[0]) if errors else "ok")


def test_threads_of_two_processes_crossing_over_stripes_both_get_through(tmp_path: Path) -> None:
    first, second = two_uids()
    path = str(tmp_path / "instances.lock")
    a_holds, b_holds, a_release, b_release = (SPAWN.Event() for _ in range(4))
    done = SPAWN.Queue()
    other = SPAWN.Process(target=cross_over, args=(path, second, first, b_holds, a_holds, b_release, done))
    other.start()
    try:
        cross_over(path, first, second, a_holds, b_holds, a_release, done)
        assert sorted([done.get(timeout=60), done.get(timeout=60)]) == ["ok", "ok"]
    finally:
        b_release.set()
        other.join(60)
