"""Exports a person opens in a spreadsheet or pipes into another tool, on a database the listener filled.

`edgenode serve` runs as a child process; dcmtk's storescu sends studies whose AccessionNumber, Patient ID
and Study Description start like spreadsheet formulas (= + - @ tab CR). The CSV exports must hand them over
as text (OWASP CSV injection: a leading single quote), and the read commands must stop quietly when the
reader of their output goes away (`| head -1`).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Iterator

import pytest

from db.queries import AUDIT_FIELDS, WORKLIST_FIELDS
from node.cli import EXIT_PIPE_CLOSED
from node.commands.tabular import csv_cell
from tests.conftest import edgenode_cmd, node_env
from tests.dicomgen import make_ct_series, write_datasets
from tests.opsdata import ServedNode, served_node, store

# (accession, patient id, study description) as the sender wrote them; AccessionNumber is SH (16 characters)
# in the standard, but a PACS sends what it holds and the node keeps what it received.
HOSTILE = (
    ('=HYPERLINK("http://x")', "@SUM(1+1)", "-2+3 chest"),
    ("+1+1", "\t=1+2", "\r=cmd|' /C calc'!A0"),
)
SLICES = 200  # the first study's audit trail (one event per instance) is far past a pipe's 64 KiB buffer


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory, dcmtk) -> Iterator[ServedNode]:
    node = served_node(tmp_path_factory.mktemp("exports"), web={"enabled": False})
    node.start()
    try:
        for n, (accession, patient_id, description) in enumerate(HOSTILE):
            datasets = make_ct_series(
                SLICES if n == 0 else 2, 16, 16, patient_id=patient_id, accession=accession, seed=n
            )
            for ds in datasets:
                ds.StudyDescription = description
                ds.BodyPartExamined = "ABDOMEN"  # the chest rule declines it: received and complete, no inference
            store(
                node.settings.node.port,
                write_datasets(datasets, node.config.parent / "outgoing" / str(n)),
                calling_ae="STORESCU",
            )
    finally:
        node.stop()
    yield node


def cli(node: ServedNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        edgenode_cmd(*args, "--config", str(node.config)),
        env=node_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def test_csv_cell_neutralises_formula_starts_only() -> None:
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_cell(start + "1") == "'" + start + "1"
    assert csv_cell("ACC-1") == "ACC-1" and csv_cell("") == "" and csv_cell(None) == ""
    assert csv_cell(-0.25) == -0.25 and csv_cell(-3) == -3  # a negative number is a number, not a formula


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def as_text(value: object) -> str:
    """What a CSV cell must hold for a JSON value: formula-like text behind a single quote, the rest as is."""
    text = "" if value is None else str(value)
    return "'" + text if isinstance(value, str) and text.startswith(FORMULA_STARTS) else text


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
@pytest.mark.slow  # a served node (module fixture)
def test_worklist_csv_holds_the_received_values_as_text(hostile_node: ServedNode) -> None:
    as_json = json.loads(cli(hostile_node, "worklist", "--format", "json").stdout)
    assert len(as_json) == len(HOSTILE) and '=HYPERLINK("http://x")' in {r["accession_number"] for r in as_json}

    rows = list(csv.DictReader(io.StringIO(cli(hostile_node, "worklist", "--format", "csv").stdout)))
    assert len(rows) == len(as_json) and list(rows[0]) == list(WORKLIST_FIELDS)
    for row, original in zip(rows, as_json, strict=True):
        assert row == {f: as_text(original[f]) for f in WORKLIST_FIELDS}
        assert not any(v.startswith(FORMULA_STARTS) for v in row.values()), row
    first = next(r for r in rows if r["accession_number"].startswith("'=HYPERLINK"))
    assert (first["accession_number"], first["patient_id"], first["study_description"]) == tuple(
        "'" + v for v in HOSTILE[0]
    )


@pytest.mark.slow  # a served node (module fixture)
def test_audit_csv_holds_the_received_values_as_text(hostile_node: ServedNode) -> None:
    args = ("--event-type", "instance.stored", "--limit", "0")
    as_json = json.loads(cli(hostile_node, "audit", "--format", "json", *args).stdout)
    rows = list(csv.DictReader(io.StringIO(cli(hostile_node, "audit", "--format", "csv", *args).stdout)))
    assert len(rows) == len(as_json) == SLICES + 2 and list(rows[0]) == list(AUDIT_FIELDS)
    for row, original in zip(rows, as_json, strict=True):
        assert row == {f: as_text(original[f]) for f in AUDIT_FIELDS}
        assert not any(v.startswith(FORMULA_STARTS) for v in row.values()), row
    assert (
        sum(r["accession_number"] == "'" + HOSTILE[0][0] and r["patient_id"] == "'" + HOSTILE[0][1] for r in rows)
        == SLICES
    )


@pytest.mark.slow  # a served node (module fixture)
def test_read_commands_stop_quietly_when_the_reader_leaves(hostile_node: ServedNode) -> None:
    """`edgenode audit --format json | head -1` through a real shell pipe: head exits after one line while the
    node still has ~150 KB to write; no traceback, and the exit status a shell gives a SIGPIPE'd process."""
    command = " ".join(edgenode_cmd("audit", "--format", "json", "--limit", "0", "--config", str(hostile_node.config)))
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command} | head -1"],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "[\n"
    assert done.stderr == "" and done.returncode == EXIT_PIPE_CLOSED

    # A reader that goes before a byte is written: each read command, each format (small output too).
    for args in (("worklist",), ("worklist", "--format", "csv"), ("audit", "--format", "json"), ("outbound", "list")):
        proc = subprocess.Popen(
            edgenode_cmd(*args, "--config", str(hostile_node.config)),
            env=node_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
        assert err == "" and proc.returncode == EXIT_PIPE_CLOSED, (args, err)
