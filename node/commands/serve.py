"""`edgenode serve`: run the node until SIGTERM/SIGINT, then stop gracefully and exit 0."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading

from node.config import Settings

log = logging.getLogger(__name__)

# The default is to refuse everyone; a new user's first start must say so, and what to do about it.
NO_PEERS = (
    "no [[peers]] configured, so every association is refused: add a [[peers]] entry (ae_title, host, port) for "
    "each PACS or modality that sends studies, in the file given with --config (example: deploy/edgenode.toml)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run the DICOM listener, study completion and the scheduler until stopped."


def run(args: argparse.Namespace, settings: Settings) -> int:
    from node.app import EdgeNode

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping (in-flight stores finish first)", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A node that does not stop, or stops answering: `kill -USR2 <pid>` writes every thread's stack to its log
    # (stderr), which says what it waits for. (Workers use SIGUSR1 for their parent's death.)
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    node = EdgeNode(settings)
    try:
        node.start()
    except OSError as exc:  # the DICOM or the dashboard port is taken, say: one line, no traceback
        from node.web.server import WebPortUnavailable

        hint = "" if isinstance(exc, WebPortUnavailable) else f" (is DICOM port {settings.node.port} free?)"
        log.error("cannot start: %s%s", exc, hint)
        return 1
    log.info("edgenode ready: AE %s port %d, data in %s", settings.node.ae_title, node.port, settings.data_dir)
    if not settings.peers:
        log.warning(NO_PEERS)
    while not stop_requested.wait(1.0):
        pass
    node.stop()
    log.info("edgenode stopped")
    return 0
