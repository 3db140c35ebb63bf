"""`edgenode outbound list|retry|send`: inspect the result delivery queue, revive dead letters, send now."""

from __future__ import annotations

import argparse
import json
import sys

from node.commands.tabular import row_id, row_limit, write_csv
from node.config import Settings

FIELDS = (
    "id",
    "status",
    "destination",
    "address",
    "kind",
    "sop_instance_uid",
    "job_id",
    "attempts",
    "next_attempt_at",
    "last_status",
    "last_error",
    "sent_at",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["list", "retry", "send"],
        help="list: show queue items; retry: put dead items back in the queue, due now (--all: every unsent item);"
        " send: one delivery pass now",
    )
    parser.add_argument("--status", choices=["pending", "sent", "dead"], help="list: only items in this state")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table", help="list: output format")
    parser.add_argument("--limit", type=row_limit, default=500, help="list: at most this many items (newest first)")
    parser.add_argument(
        "--id", type=row_id, action="append", dest="ids", metavar="N", help="retry: this item (repeatable)"
    )
    parser.add_argument("--all-dead", action="store_true", help="retry: every dead item")
    parser.add_argument(
        "--all",
        action="store_true",
        help="retry: every unsent item due now, attempts counted afresh: dead ones revived and pending ones"
        " waiting out a backoff (after mending the PACS: no waiting up to max_backoff_seconds)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db.outbound import list_items
    from db.session import open_existing

    chosen = [name for name, given in (("--id", args.ids), ("--all-dead", args.all_dead), ("--all", args.all)) if given]
    if args.action == "retry" and not chosen:
        print("edgenode outbound retry: give --id N (repeatable), --all-dead or --all", file=sys.stderr)
        return 2
    if args.action == "retry" and len(chosen) > 1:
        print(f"edgenode outbound retry: {' and '.join(chosen)} are exclusive", file=sys.stderr)
        return 2
    try:
        db = open_existing(settings.database_url)
    except FileNotFoundError as exc:
        print(f"edgenode outbound: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            with db.session() as session:
                rows = list_items(session, args.status, args.limit)
            _print(rows, args.format)
            return 0
        if args.action == "retry":
            from node.outbound import retry_dead, retry_now

            revived = retry_now(db) if args.all else retry_dead(db, None if args.all_dead else args.ids)
            missing = sorted(set(args.ids or ()) - set(revived))
            print(f"requeued {len(revived)} item(s)" + (f": {', '.join(map(str, revived))}" if revived else ""))
            if revived:
                print(
                    f"due now: a running node sends them within [send] interval_seconds"
                    f" ({settings.send.interval_seconds:g} s); or run `edgenode outbound send`"
                )
            if missing:
                print(f"not dead (or unknown), left alone: {', '.join(map(str, missing))}", file=sys.stderr)
                return 1
            return 0
        from node.outbound import send_due
        from node.spool import Spool

        report = send_due(settings, db, Spool(settings.spool_dir))
        untried = f", not tried {len(report.untried)} (association lost; still due)" if report.untried else ""
        print(f"sent {len(report.sent)}, to retry {len(report.retried)}, dead {len(report.dead)}{untried}")
        return 0 if not report.retried and not report.dead and not report.untried else 1
    finally:
        db.dispose()


def _print(rows: list[dict[str, object]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        write_csv(rows, FIELDS, sys.stdout)
    else:
        shown = ("id", "status", "destination", "kind", "attempts", "last_status", "next_attempt_at", "last_error")
        table = [[str(row[f]) for f in shown] for row in rows]
        widths = [max([len(f), *(len(r[i]) for r in table)]) for i, f in enumerate(shown)]
        widths[-1] = min(widths[-1], 60)
        print("  ".join(f.ljust(w) for f, w in zip(shown, widths, strict=True)))
        for r in table:
            print("  ".join(v[:w].ljust(w) for v, w in zip(r, widths, strict=True)))
