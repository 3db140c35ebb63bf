"""A child process that ends with its parent: inference workers must not outlive a killed `edgenode serve`.

Nothing tells a process that its parent was SIGKILLed: an orphaned worker would go on claiming jobs, also
those of the next node started on the same data. Two watchers, either one enough:

- Linux: the kernel sends `PARENT_DEATH_SIGNAL` when the parent dies (prctl PR_SET_PDEATHSIG). It is also
  sent when the *thread* that started the child ends (the supervisor may restart workers from a scheduler
  thread), so the handler acts only if the parent process is really gone.
- Everywhere: a daemon thread waits for the parent, on the pipe multiprocessing keeps between the two (EOF when
  the parent dies), else by polling the parent pid.

`on_parent_death` is called once; if the process is still running `grace_seconds` later (stuck in a long
computation), it exits hard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL: int | None = getattr(signal, "SIGUSR1", None)  # nothing else in a worker uses it
POLL_SECONDS = 1.0
EXIT_ORPHANED = 4


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the Linux kernel to send `signum` when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as exc:
        log.warning("prctl is not available (%s); the watch thread alone notices the parent dying", exc)
        return False
    return True


class ParentWatch:
    """Calls `on_parent_death` once the parent process is gone (see the module docstring)."""

    def __init__(self, on_parent_death: Callable[[], None], grace_seconds: float = 30.0) -> None:
        self._on_parent_death = on_parent_death
        self._grace_seconds = grace_seconds
        self._parent = multiprocessing.parent_process()  # set in processes started by multiprocessing
        self.parent_pid = self._parent.pid if self._parent is not None and self._parent.pid else os.getppid()
        self._fired = threading.Lock()

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid  # an orphan is re-parented to init or a subreaper

    def start(self) -> None:
        """Call from the child's main thread, first thing: signal handlers can only be set there."""
        signum = PARENT_DEATH_SIGNAL
        if signum is not None:
            previous = signal.signal(signum, lambda *_: self._check())  # before prctl: the default action kills
            if not _set_parent_death_signal(signum):
                signal.signal(signum, previous)
        # The parent may have died before the kernel knew to tell us: look once now that it would.
        self._check()
        threading.Thread(target=self._wait_for_parent, name="parent-watch", daemon=True).start()

    def _wait_for_parent(self) -> None:
        if self._parent is not None:
            self._parent.join()  # returns when the pipe to the parent reports EOF
        while self.parent_alive():  # no pipe, or it ended with the parent still there: poll
            time.sleep(POLL_SECONDS)
        self._check()

    def _check(self) -> None:
        if self.parent_alive() or not self._fired.acquire(blocking=False):
            return
        log.warning("parent process %d is gone: stopping (pid %d)", self.parent_pid, os.getpid())
        threading.Thread(target=self._exit_after_grace, name="parent-watch-exit", daemon=True).start()
        self._on_parent_death()

    def _exit_after_grace(self) -> None:
        time.sleep(self._grace_seconds)
        log.error("still running %.0f s after the parent died: exiting now", self._grace_seconds)
        os._exit(EXIT_ORPHANED)
