"""The `edgenode` command line: one entry point, one sub-command module each.

Each module in node/commands exposes `add_arguments(parser)` and `run(args, settings) -> int`, and
keeps heavy imports (torch, pynetdicom) inside `run` so `edgenode --help` stays fast.
Exit codes: 0 ok, 1 the operation failed, 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from node.config import ConfigError, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PIPE_CLOSED = 128 + 13  # what a shell reports for a process ended by SIGPIPE (`yes | head -1`)

QUIET_LIBRARIES = ("pynetdicom", "alembic", "apscheduler", "highdicom")  # logged at WARNING and above only

# name -> (module, help). Add commands here; the module does the rest.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("node.commands.config", "check or show the effective configuration"),
    "worklist": ("node.commands.worklist", "studies ranked for triage (STAT, anomaly score, age)"),
    "audit": ("node.commands.audit", "query the append-only audit trail"),
    "serve": ("node.commands.serve", "run the node: listener, completion, inference workers, sender, dashboard"),
    "outbound": ("node.commands.outbound", "list the result delivery queue, retry dead items, send now"),
    "engine": ("node.commands.engine", "U-Net backends: show what runs here (info), export and build engines (build)"),
    "phantoms": ("node.commands.phantoms", "write synthetic chest CT/DX/CR studies with ground truth"),
    "train": ("node.commands.train", "train the anomaly model on healthy images (phantoms or DICOM)"),
    "evaluate": ("node.commands.evaluate", "ablation table and figure on held-out phantoms (docs/EVALUATION.md)"),
    "demo": ("node.commands.demo", "one synthetic study through a real Orthanc and the node, end to end"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgenode", description="DICOM AI edge node")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=None, help="TOML configuration file")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs full datasets at DEBUG, which can include patient names; it logs every PDU
    # at INFO. Alembic and APScheduler narrate every migration step and periodic run at INFO; highdicom
    # a line per segment, frame and reference it builds (dozens per result, flooding `edgenode demo`).
    quiet = max(logging.WARNING, getattr(logging, level))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"edgenode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.logging.level)
    try:
        code = int(args._module.run(args, settings) or EXIT_OK)
        sys.stdout.flush()  # inside the try: a reader that left early surfaces here, not at interpreter exit
    except BrokenPipeError:
        return closed_pipe_exit()
    return code


def closed_pipe_exit() -> int:
    """The reader of our output went away (`edgenode audit --format json | head -1`): stop quietly.

    Python's documented recipe: point stdout at /dev/null so the interpreter's final flush of what is still
    buffered cannot raise again (and print a traceback) on the way out.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
