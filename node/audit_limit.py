"""Rate-limited audit events for refused and dropped connections.

Anyone who can reach the DICOM port can open connections by the thousand; writing one audit row for each would
let them fill the audit table (and keep the database busy) at will. Per source address and event type, the first
`DETAILED_PER_INTERVAL` events of an interval are written as they come (enough to tell a misconfigured peer's
different mistakes apart); the rest are only counted, and one summary event ("N more ...") is written when the
interval ends. Every connection is accounted for, in a bounded number of rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from db.models import AuditEventType

DETAILED_PER_INTERVAL = 5

AuditWriter = Callable[..., None]  # (event_type, **audit fields), e.g. StorageSCP._audit


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0
    latest: dict[str, Any] = field(default_factory=dict)


class RateLimitedAudit:
    """Writes audit events through `write`, at most `detailed_per_interval` + 1 per address, type and interval."""

    def __init__(
        self,
        write: AuditWriter,
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        detailed_per_interval: int = DETAILED_PER_INTERVAL,
    ) -> None:
        """`detailed_per_interval`: less than DETAILED_PER_INTERVAL where several listener processes share the
        port, each with a limiter of its own (node/scp.py divides the number among them)."""
        self._write = write
        self._interval = interval_seconds
        self._clock = clock
        self._detailed = detailed_per_interval
        self._windows: dict[tuple[str, AuditEventType], _Window] = {}
        self._lock = threading.Lock()

    def record(self, event_type: AuditEventType, peer_address: str, **fields: Any) -> bool:
        """Audit one event (True), or count it towards the interval's summary (False)."""
        key = (peer_address, event_type)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            ended = window if window is not None and now - window.started >= self._interval else None
            if window is None or ended is not None:
                window = self._windows[key] = _Window(started=now)
            detailed = window.written < self._detailed
            if detailed:
                window.written += 1
            else:
                window.suppressed += 1
                window.latest = fields
        if ended is not None:
            self._summarise(key, ended)
        if detailed:
            self._write(event_type, peer_address=peer_address, **fields)
        return detailed

    def flush(self, everything: bool = False) -> None:
        """Write the summaries of intervals that have ended (all of them with `everything`, e.g. at stop)."""
        now = self._clock()
        with self._lock:
            ended = {
                key: window
                for key, window in self._windows.items()
                if everything or now - window.started >= self._interval
            }
            for key in ended:
                del self._windows[key]
        for key, window in ended.items():
            self._summarise(key, window)

    def _summarise(self, key: tuple[str, AuditEventType], window: _Window) -> None:
        if not window.suppressed:
            return
        address, event_type = key
        fields = dict(window.latest)
        latest = fields.pop("detail", "")
        seconds = max(self._clock() - window.started, 0.0)
        fields["detail"] = (
            f"{window.suppressed} more from {address} in {seconds:.0f} s, counted but not recorded one by one"
            f" (latest: {latest})"
        )
        self._write(event_type, peer_address=address, **fields)
