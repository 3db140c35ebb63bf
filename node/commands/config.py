"""`edgenode config check|show`: validate and print the effective settings."""

from __future__ import annotations

import argparse

from node.config import Settings, settings_to_toml, without_password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check", "show"], help="check: validate only; show: print as TOML")


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Loading already validated everything; reaching here means the configuration is good.
    if args.action == "show":
        print(settings_to_toml(settings))
    else:
        source = args.config or "defaults and environment"
        print(
            f"configuration OK ({source}): AE {settings.node.ae_title} on port {settings.node.port}, "
            f"{len(settings.peers)} peer(s), database {without_password(settings.database_url)}"
        )
    return 0
