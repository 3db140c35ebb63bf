"""The dashboard's bearer token: configured, or generated once and kept in <data_dir>/web-token (0600)."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import TextIO

from node.config import Settings

log = logging.getLogger(__name__)

TOKEN_FILE = "web-token"


def token_path(settings: Settings) -> Path:
    return settings.data_dir / TOKEN_FILE


def resolve_token(settings: Settings, announce: TextIO | None = None) -> str:
    """Return web.token if set, else the stored token, else generate and store it (and say where, once)."""
    if settings.web.token:
        return settings.web.token
    path = token_path(settings)
    if path.is_file():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); restricting it to 0600", path, mode)
            path.chmod(0o600)
        stored = path.read_text(encoding="ascii").strip()
        if stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    out = announce if announce is not None else sys.stderr
    # Only where it is: stderr usually ends up in the journal and central log collectors.
    print(f"edgenode: generated the web dashboard token; read it from {path} (mode 0600)", file=out, flush=True)
    return token
