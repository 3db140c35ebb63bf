"""`edgenode audit`: the append-only audit trail: who sent what and when, what was produced and delivered."""

from __future__ import annotations

import argparse
import logging
import sys

from node.commands.tabular import row_limit
from node.config import Settings

TABLE_FIELDS = (
    "at",
    "event_type",
    "outcome",
    "calling_ae",
    "called_ae",
    "patient_id",
    "accession_number",
    "study_instance_uid",
    "sop_instance_uid",
    "dimse_status",
    "detail",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient-id", default="", help="events of this patient ID (and of its studies)")
    parser.add_argument("--accession", default="", help="events of this accession number (and of its studies)")
    parser.add_argument("--study-uid", default="", help="events of this Study Instance UID")
    parser.add_argument("--ae", default="", help="events where this AE title was calling or called")
    parser.add_argument(
        "--event-type", default="", help="exact type (send.ok) or a prefix ending in '.' or '*' (send.)"
    )
    parser.add_argument("--since", help="at or after: ISO date/time (UTC) or an age like 24h, 7d")
    parser.add_argument("--until", help="before: ISO date/time (UTC) or an age like 1h")
    parser.add_argument("--limit", type=row_limit, default=1000, help="the latest N events (default 1000; 0 = all)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter is not query output
    from db.queries import AUDIT_FIELDS, AuditFilter, audit_events, parse_time
    from node.commands.tabular import query_rows, write_rows

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"edgenode audit: {exc}", file=sys.stderr)
        return 2
    flt = AuditFilter(
        patient_id=args.patient_id.strip(),
        accession=args.accession.strip(),
        study_uid=args.study_uid.strip(),
        ae=args.ae.strip(),
        event_type=args.event_type.strip(),
        since=since,
        until=until,
        limit=args.limit or None,
    )
    try:
        rows = query_rows(settings.database_url, audit_events, flt)
    except FileNotFoundError as exc:  # no database where the configuration says: a usage error, not "0 rows"
        print(f"edgenode audit: {exc}", file=sys.stderr)
        return 2
    write_rows(rows, AUDIT_FIELDS, args.format, sys.stdout, table_fields=TABLE_FIELDS, max_width=64)
    return 0
