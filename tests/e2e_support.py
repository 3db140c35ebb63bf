"""The end-to-end harness: a real Orthanc as the PACS (with the deploy Lua routing) and `edgenode serve`
as a child process in its own process group, so a test can SIGKILL the node with its workers at once.

Shared by tests/test_e2e.py, tests/test_chaos.py and benchmarks/{e2e,load}.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from db.models import AuditEvent, Job, Study
from db.session import Database
from node.config import load_settings, settings_to_toml
from node.local_orthanc import Orthanc, peer_env, wait_for_port
from tests.conftest import REPO_ROOT, edgenode_cmd, node_env
from tests.ports import free_port
from tests.radiograph_model import per_modality

ROUTING_LUA = REPO_ROOT / "deploy" / "orthanc" / "edgenode-routing.lua"
STORESCU = Path("/usr/bin/storescu")
PACS_AET = "PACS"
NODE_AET = "EDGENODE"
MODALITY_AET = "MODALITY"

T = TypeVar("T")


def make_model(path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A random-weight U-Net of `preset` saved as the node loads it (deterministic for a seed)."""
    import torch

    from inference.unet import PRESETS, UNet, save_model

    if not path.exists():
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(UNet(PRESETS[preset]), path, preset)
    return path


def routing_pacs(workdir: Path, node_port: int, stable_age: int = 1) -> Orthanc:
    """Orthanc as the site's PACS: routes stable original studies to the node with the deploy Lua script."""
    return Orthanc(
        workdir,
        dicom_port=free_port(),
        http_port=free_port(),
        aet=PACS_AET,
        modalities={"edgenode": (NODE_AET, "127.0.0.1", node_port)},
        lua_scripts=[ROUTING_LUA],
        extra_config={"StableAge": stable_age},
    )


def storescu(
    port: int,
    files: Sequence[Path],
    calling_ae: str = MODALITY_AET,
    called_ae: str = PACS_AET,
    options: Sequence[str] = (),
) -> None:
    """Send files with dcmtk's storescu in one association (raises if any store fails); `options` are storescu's
    own (e.g. "-xr" to propose RLE Lossless, so RLE files go as they are)."""
    subprocess.run(
        [str(STORESCU), *options, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=peer_env(),
        capture_output=True,
        timeout=120,
    )


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until `predicate()` is truthy and return its value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class NodeProcess:
    """`edgenode serve` with a generated config, in a new session (its own process group)."""

    workdir: Path
    model: Path
    pacs_port: int
    inference: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)  # extra config sections, merged over the defaults
    # `model` serves CT and the tiny trained radiograph model (tests/radiograph_model.py) CR and DX: the node runs a
    # model only on the modalities its metadata names. False: `model` for every modality (so CR/DX are skipped).
    radiograph_model: bool = True
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "edgenode.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    def settings_dict(self) -> dict[str, Any]:
        sections: dict[str, Any] = {
            "node": {
                "ae_title": NODE_AET,
                "port": self.port,
                "data_dir": str(self.data_dir),
                "min_free_disk_mb": 1,
                "shutdown_grace_seconds": 1.0,
            },
            "peers": [{"ae_title": PACS_AET, "host": "127.0.0.1", "port": self.pacs_port}],
            "stability": {"stable_seconds": 1.0, "scan_interval_seconds": 0.25},
            "inference": {
                "model": per_modality(self.model) if self.radiograph_model else str(self.model),
                "backend": "torch",
                "device": "cpu",
                "ensemble": 2,
                "steps": 3,
                **self.inference,
            },
            "send": {"interval_seconds": 0.5, "initial_backoff_seconds": 1.0, "max_backoff_seconds": 5.0},
            "jobs": {"heartbeat_seconds": 1.0, "lease_seconds": 10.0, "retry_backoff_seconds": 1.0},
            "web": {"enabled": False},
            "retention": {"enabled": False},
        }
        for name, value in self.sections.items():
            sections[name] = {**sections.get(name, {}), **value} if isinstance(value, dict) else value
        return sections

    def write_config(self) -> Path:
        self.config_path.write_text(settings_to_toml(load_settings(None, **self.settings_dict())))
        return self.config_path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120.0, wait_worker: bool = True) -> NodeProcess:
        """Start serve; return once the listener accepts and (by default) a worker has loaded the model."""
        return self.wait_ready(self.launch(), timeout, wait_worker)

    def launch(self) -> int:
        """Start serve without waiting (several nodes start side by side); the log offset to pass to wait_ready."""
        self.write_config()
        mark = len(self.log_text())
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                edgenode_cmd("serve", "--config", str(self.config_path)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=node_env(),
                start_new_session=True,  # serve and its workers form one process group: killpg takes all
            )
        return mark

    def wait_ready(self, mark: int, timeout: float = 120.0, wait_worker: bool = True) -> NodeProcess:
        """Wait until the listener launched at log offset `mark` accepts and (by default) a worker loaded the model."""
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)
        if wait_worker:

            def worker_started() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {self.proc.returncode}; see {self.log_path}")
                return " started (pid " in self.log_text()[mark:]

            wait_for(worker_started, timeout, "an inference worker to load the model", interval=0.2)
        return self

    def group_pids(self) -> list[int]:
        """serve and every process of its group (the workers, multiprocessing's helpers)."""
        import psutil

        if self.proc is None:
            return []
        pgid = self.proc.pid
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.info["pid"]) == pgid:
                    found.append(proc.info["pid"])
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL the whole process group (serve + workers): a power cut as far as the node knows."""
        assert self.proc is not None
        pids = self.group_pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_for(lambda: not any(_alive(p) for p in pids), 30, "the node's processes to die")

    def kill_serve(self) -> list[int]:
        """SIGKILL the serve process alone, as `kill -9 <pid>` would; once it is dead, return the pids of the rest
        of its group (its workers), which must notice and end on their own (node/parent_watch.py, `wait_gone`)."""
        assert self.proc is not None
        others = [p for p in self.group_pids() if p != self.proc.pid]
        self.proc.kill()
        self.proc.wait(timeout=30)
        return others

    def wait_gone(self, pids: list[int], timeout: float = 60.0) -> None:
        wait_for(lambda: not any(_alive(p) for p in pids), timeout, f"processes {pids} to end after serve's death")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful); SIGKILL the group if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything left in the group (a hung worker) goes too
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def database_url(self) -> str:
        """The configured `[database] url` (a shared PostgreSQL), else the node's own SQLite file."""
        return str(self.sections.get("database", {}).get("url", "")) or f"sqlite:///{self.data_dir / 'edgenode.db'}"

    def database(self) -> Database:
        return Database(self.database_url, run_migrations=False)

    def jobs(self) -> list[Job]:
        db = self.database()
        try:
            with db.session() as session:
                jobs = list(session.scalars(select(Job).order_by(Job.id)).all())
                session.expunge_all()
                return jobs
        finally:
            db.dispose()

    def jobs_of_study(self, study_uid: str) -> list[Job]:
        """The study's jobs (detached: scalar columns only), oldest first."""
        db = self.database()
        try:
            with db.session() as session:
                jobs = list(
                    session.scalars(
                        select(Job).join(Study).where(Study.study_instance_uid == study_uid).order_by(Job.id)
                    ).all()
                )
                session.expunge_all()
                return jobs
        finally:
            db.dispose()

    def audit(self) -> list[AuditEvent]:
        db = self.database()
        try:
            with db.session() as session:
                events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())
                session.expunge_all()
                return events
        finally:
            db.dispose()

    def count_events(self, event_type: str) -> int:
        """Audit events of a type, read with plain sqlite3 (cheap enough to poll every few milliseconds)."""
        path = self.data_dir / "edgenode.db"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
            return int(
                conn.execute("SELECT count(*) FROM audit_events WHERE event_type = ?", (event_type,)).fetchone()[0]
            )

    def cli_json(self, *args: str) -> list[dict[str, Any]]:
        """`edgenode <args> --format json` against this node's config, parsed."""
        out = subprocess.run(
            edgenode_cmd(*args, "--config", str(self.config_path), "--format", "json"),
            check=True,
            capture_output=True,
            env=node_env(),
            timeout=120,
        )
        return json.loads(out.stdout)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (already dead, not yet reaped by its parent) is dead for our purposes
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - gone between the two checks
        return False


def series_in_pacs(pacs: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    """Every series Orthanc holds for the study: modality, manufacturer, and its instances' SOP Instance UIDs."""
    found = pacs.post("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
    out = []
    for series in found:
        instances = pacs.get(f"/series/{series['ID']}/instances")
        tags = series["MainDicomTags"]
        out.append(
            {
                "series_instance_uid": tags.get("SeriesInstanceUID"),
                "modality": tags.get("Modality"),
                "manufacturer": tags.get("Manufacturer", ""),
                "sop_instance_uids": [i["MainDicomTags"]["SOPInstanceUID"] for i in instances],
            }
        )
    return out


def node_results_in_pacs(pacs: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return [s for s in series_in_pacs(pacs, study_uid) if s["manufacturer"] == "edgenode"]
