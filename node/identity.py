"""Who this node is, in the ids it writes into a database that other nodes may share.

A job's lease owner must name one worker process on one machine, and a node restarting must recognise (and only
recognise) the jobs its own earlier workers held. So an owner id is `<node identity>/<boot>.<pid>-<slot>.<gen>`:
the identity (host name and an instance id kept in the data folder, stable across restarts) is the prefix start-up
recovery matches; the boot id and the node process's pid make a new run's ids differ from any earlier run's.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

IDENTITY_FILE = "node-id"
HOST_CHARS = 20  # the owner column holds 64 characters


def node_identity(data_dir: Path) -> str:
    """`<host>~<instance>`: the instance id is made once per data folder, so two nodes with one host name (cloned
    machines, containers) still differ, and a restart keeps its identity."""
    path = data_dir / IDENTITY_FILE
    try:
        instance = path.read_text().strip()
    except FileNotFoundError:
        instance = ""
    if not re.fullmatch(r"[0-9a-f]{8}", instance):
        instance = secrets.token_hex(4)
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(instance + "\n")
        tmp.replace(path)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:HOST_CHARS] or "host"
    return f"{host}~{instance}"


def boot_id() -> str:
    """A short id of this boot of the machine (Linux); empty where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


def worker_owner(identity: str, slot: int, generation: int) -> str:
    """The lease owner id of one worker process; `identity` is its prefix, and it ends `-<slot>.<generation>`."""
    return f"{identity}/{boot_id()}.{os.getpid()}-{slot}.{generation}"


def sender_owner(identity: str) -> str:
    """The lease owner id of one sending process (the node's sender, or `edgenode outbound send`)."""
    return f"{identity}/{boot_id()}.{os.getpid()}-send"


def owner_is_gone(owner: str, identity: str) -> bool:
    """Whether a lease owner id of this node (`identity`) names a process that no longer runs: one of an earlier
    boot, or a pid not alive now. Another node's owner ids are never judged gone here (their leases expire)."""
    prefix = identity + "/"
    if not owner.startswith(prefix):
        return False
    match = re.fullmatch(r"([0-9a-f]*)\.(\d+)-.*", owner[len(prefix) :])
    if match is None:
        return False
    if match.group(1) != boot_id():
        return True
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
