"""`edgenode worklist`: studies ranked for triage (STAT first, then anomaly score, then age)."""

from __future__ import annotations

import argparse
import logging
import sys

from node.commands.tabular import row_limit
from node.config import Settings

TABLE_FIELDS = (
    "priority",
    "score",
    "uncertainty",
    "status",
    "modality",
    "patient_id",
    "accession_number",
    "received_at",
    "delivery",
    "results_destination",
    "study_instance_uid",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status",
        action="append",
        default=[],
        help="only studies in this state (receiving, complete, queued, processing, done, failed); repeatable",
    )
    parser.add_argument("--since", help="received at or after: ISO date/time (UTC) or an age like 24h, 7d")
    parser.add_argument("--until", help="received before: ISO date/time (UTC) or an age like 1h")
    parser.add_argument("--modality", default="", help="only studies with a series of this modality (CT, CR, DX)")
    parser.add_argument("--min-score", type=float, default=None, help="only scored studies with score >= this")
    parser.add_argument("--limit", type=row_limit, default=500, help="at most this many rows (default 500; 0 = all)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter is not query output
    from db.models import StudyStatus
    from db.queries import WORKLIST_FIELDS, WorklistFilter, parse_time, worklist
    from node.commands.tabular import query_rows, write_rows

    known = {str(s) for s in StudyStatus}
    bad = [s for s in args.status if s not in known]
    if bad:
        print(f"edgenode worklist: --status {bad[0]!r} is not one of {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"edgenode worklist: {exc}", file=sys.stderr)
        return 2
    flt = WorklistFilter(
        statuses=tuple(args.status),
        since=since,
        until=until,
        modality=args.modality.strip(),
        min_score=args.min_score,
        limit=args.limit or None,
    )
    try:
        rows = query_rows(settings.database_url, worklist, flt)
    except FileNotFoundError as exc:  # no database where the configuration says: a usage error, not "0 rows"
        print(f"edgenode worklist: {exc}", file=sys.stderr)
        return 2
    write_rows(rows, WORKLIST_FIELDS, args.format, sys.stdout, table_fields=TABLE_FIELDS)
    return 0
