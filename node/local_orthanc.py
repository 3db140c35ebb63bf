"""Orthanc as a child process on loopback ports: the PACS that `edgenode demo` starts.

The tests and benchmarks start theirs the same way (their other peers, such as dcmtk's storescp, are in
tests/peers.py). Every peer runs with TCP_NODELAY=1 (Nagle's algorithm otherwise adds ~50 ms per image)
and is stopped by its owner.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ORTHANC_BIN = Path("/usr/sbin/Orthanc")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; a process already gone (or None) is fine."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Orthanc:
    """An Orthanc server with its own storage folder; `modalities` are the AEs it may send to."""

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (AE, host, port)
    lua_scripts: list[Path] = field(default_factory=list)
    sync_storage: bool = True  # fsync each stored file: the durable default we compare against
    extra_config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        return {
            "Name": f"edgenode-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "StorageCompression": False,
            "SyncStorageArea": self.sync_storage,
            "Plugins": [],
            "LuaScripts": [str(p) for p in self.lua_scripts],
            "StableAge": 2,
            "HttpTimeout": 30,
            "RestApiWriteToFileSystemEnabled": False,
            **self.extra_config,
        }

    def start(self, timeout: float = 30.0) -> Self:
        if not ORTHANC_BIN.exists():
            raise FileNotFoundError(f"{ORTHANC_BIN} not found: install the Debian package 'orthanc'")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=peer_env(),
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s") from None
                time.sleep(0.1)
        wait_for_port("127.0.0.1", self.dicom_port, timeout, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds under the study, with its main DICOM tags."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True}
        )
        return list(found)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
