"""Test and benchmark peers that the node itself never starts: dcmtk's storescp as a destination.

Orthanc, which `edgenode demo` starts at run time, is in node/local_orthanc.py.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from node.local_orthanc import peer_env, stop_process, wait_for_port
from tests.ports import free_port

STORESCP_BIN = Path("/usr/bin/storescp")


@dataclass
class StoreSCP:
    """dcmtk's storescp writing every received object under `output_dir`."""

    output_dir: Path
    aet: str = "STORESCP"
    port: int = 0
    fsync: bool = False  # storescp has no fsync option; kept for symmetry in benchmark tables
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    def start(self, timeout: float = 15.0) -> Self:
        exe = shutil.which(str(STORESCP_BIN)) or str(STORESCP_BIN)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = (self.output_dir.parent / f"storescp-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                exe,
                "--aetitle",
                self.aet,
                "--output-directory",
                str(self.output_dir),
                "--accept-all",
                *self.extra_args,
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=peer_env(),
        )
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
