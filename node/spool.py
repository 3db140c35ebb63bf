"""Durable on-disk store of received instances and outgoing result files.

Write order for every file: temp file in the destination folder, write, fsync, rename onto the
final name, fsync the folder. A crash leaves either the old state or the complete new file, plus
at worst a temp file, which `cleanup_temp()` removes at start. Temp files never have the `.dcm`
suffix, so nothing that scans for instances can pick one up. A received instance is written under its
name and fsynced after (`place_instance`: safe because no index row names it until the fsync returned).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEMP_SUFFIX = ".part"
INSTANCE_SUFFIX = ".dcm"
RESULTS_DIR = "results"  # outgoing files; never scanned as received instances
RESERVED_TOP_DIRS = frozenset({RESULTS_DIR})
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


def safe_component(uid: str) -> str:
    """A path component for a UID: unchanged when it is a well-formed UID, otherwise made safe.

    Unsafe values (spaces, slashes, '..') are mapped to underscores plus a short hash of the original,
    so two different malformed UIDs never share a file.
    """
    uid = uid.strip()
    if _SAFE_UID.match(uid) and uid not in RESERVED_TOP_DIRS and ".." not in uid:
        return uid
    cleaned = re.sub(r"[^0-9A-Za-z.-]", "_", uid).strip(".")[:96] or "_"
    return f"{cleaned}_{hashlib.sha256(uid.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class StoredFile:
    relpath: str  # relative to the spool root, '/' separated
    size: int
    sha256: str


@dataclass
class PlacedFile:
    """A received instance under its final name, its data not yet known to be on disk (`Spool.place_instance`)."""

    relpath: str  # relative to the spool root, '/' separated
    chunks: tuple[bytes, ...]  # what was written, in order
    folder: Path  # absolute: the folder to fsync
    fd: int | None  # open, to fsync and close; None when already fsynced

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def digest(self) -> str:
        """SHA-256 of the file's bytes (hashlib lets other threads run meanwhile: the fsyncs, the next image)."""
        sha = hashlib.sha256()
        for chunk in self.chunks:
            sha.update(chunk)
        return sha.hexdigest()

    def settle(self) -> None:
        """fsync the file's data (a no-op when it was fsynced before it got its name)."""
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def contained_path(root: Path, relpath: str) -> Path:
    """`root / relpath` with `..` folded; ValueError when it leaves `root` (an absolute `root`).

    The one spool containment check (sender, retention, dashboard). It is made on the path as written, not
    resolved: a spool folder that is a symlink to another disk (results on their own volume) is still the spool,
    while a relpath from the database or a URL cannot climb out of it.
    """
    path = Path(os.path.normpath(root / relpath))
    if not path.is_relative_to(root):
        raise ValueError(f"{relpath!r} is outside the spool")
    return path


def free_disk_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) process on the file system holding `path` (or its nearest
    existing parent): the listener's low-disk refusal, /healthz and /metrics all read this."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


SPOOL_ID_FILE = "spool-id"


def spool_id(root: Path) -> str:
    """The id kept in the spool root, made once: nodes that share the spool (one mount) read the same id, nodes
    with spools of their own read different ones. Rows name the spool holding their files by it, so a node only
    sends, analyses or deletes what it can reach. Two nodes making it at once agree: the first link wins."""
    path = root / SPOOL_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".{SPOOL_ID_FILE}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
    temp.write_text(uuid.uuid4().hex + "\n")
    try:
        os.link(temp, path)  # never replaces: a concurrent maker's id stays
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(root)
    return path.read_text().strip()


KNOWN_DIRS_LIMIT = 4096  # series folders remembered: far more than are written to at once


class Spool:
    """Files under one root folder; every write is atomic and durable before it returns."""

    def __init__(self, root: Path, writer: str = "") -> None:
        """`writer` (the node identity) goes into temp file names: on a spool shared by several nodes, start-up
        recovery removes only its own node's interrupted writes (`cleanup_temp`), never another's in flight."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.writer = re.sub(r"[^0-9A-Za-z.~-]", "-", writer)
        self.id = spool_id(self.root)
        # Folders known to exist (saves a stat per write). Bounded, most recently used kept: other processes
        # (retention) remove folders without telling this cache, and a stale entry only costs one retry.
        self._known_dirs: OrderedDict[Path, None] = OrderedDict({self.root: None})
        self._dirs_lock = threading.Lock()

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join((safe_component(study_uid), safe_component(series_uid), safe_component(sop_uid))) + (
            INSTANCE_SUFFIX
        )

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Write a received instance to `<study>/<series>/<sop>.dcm` durably (file and folder fsynced)."""
        placed = self.place_instance(study_uid, series_uid, sop_uid, data)
        try:
            placed.settle()
            _fsync_dir(placed.folder)
        finally:
            placed.close()
        return StoredFile(relpath=placed.relpath, size=placed.size, sha256=placed.digest())

    def place_instance(self, study_uid: str, series_uid: str, sop_uid: str, *chunks: bytes) -> PlacedFile:
        """Put a received instance (`chunks` one after the other: header, data set) under its name
        `<study>/<series>/<sop>.dcm`, not yet durable: the caller
        `settle()`s it (fsync) and fsyncs its folder, at the same time (the listener's group committer does both for
        every store of a batch at once, node/committer.py), and closes it.

        The file is made under its name (O_EXCL: never over another file) and written there, so the fsyncs of file
        and folder can run together, and no temp file is made, linked and unlinked per image. A crash before they
        returned may leave a torn file under the name, but no index row names it (the listener commits the row after
        they returned, and answers after that) and start-up recovery removes every file no row names. Where the
        name exists already (a store interrupted before its row was committed), a temp file is written, fsynced and
        renamed over it, as `write_atomic` does; only the folder is left to fsync then.
        """
        relpath = self.instance_relpath(study_uid, series_uid, sop_uid)
        final = self.path(relpath)
        try:
            fd = self._create(final)
        except FileExistsError:
            self._replace(final, chunks)
            return PlacedFile(relpath, chunks, final.parent, None)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        return PlacedFile(relpath, chunks, final.parent, fd)

    def sync_folder(self, folder: Path) -> None:
        """fsync a folder of the spool, making names made in it durable."""
        _fsync_dir(folder)

    def write_atomic(self, relpath: str, data: bytes, *, sync_dir: bool = True) -> StoredFile:
        """Write `data` to `relpath`: temp file, fsync, rename, fsync folder. Replaces an existing file."""
        final = self.path(relpath)
        self._replace(final, (data,))
        if sync_dir:
            _fsync_dir(final.parent)
        return StoredFile(relpath=relpath, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _replace(self, final: Path, chunks: tuple[bytes, ...]) -> None:
        """Put `chunks` under `final` whole or not at all: a temp file beside it, written, fsynced, renamed over it
        (the folder is the caller's to fsync)."""
        temp, fd = self._open_temp(final)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temp, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            temp.unlink(missing_ok=True)
            raise

    def _open_temp(self, final: Path) -> tuple[Path, int]:
        """A new temp file beside `final` (its folder made if need be), open for writing."""
        temp = final.parent / f".{final.name}.{self._temp_tag()}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        return temp, self._create(temp)

    def _create(self, path: Path) -> int:
        """Make a new file (its folder too, if need be), open for writing; FileExistsError if the name is taken."""
        self._ensure_dir(path.parent)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileNotFoundError:  # the folder was removed (delete() of its last file) since we cached it
            with self._dirs_lock:
                self._known_dirs.pop(path.parent, None)
            self._ensure_dir(path.parent)
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def path(self, relpath: str) -> Path:
        """Absolute path of a spool-relative path; refuses paths that escape the spool (see contained_path)."""
        return contained_path(self.root, relpath)

    def delete(self, relpath: str) -> None:
        """Remove a file (missing is fine) and folders left empty up to the spool root."""
        target = self.path(relpath)
        target.unlink(missing_ok=True)
        if target.parent.exists():
            _fsync_dir(target.parent)
        parent = target.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            with self._dirs_lock:
                self._known_dirs.pop(parent, None)
            parent = parent.parent

    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's file system."""
        return free_disk_bytes(self.root)

    def _temp_tag(self) -> str:
        return f"{self.writer}@" if self.writer else ""

    def cleanup_temp(self) -> list[str]:
        """Remove temp files left by this writer's interrupted writes; returns their relative paths.

        With a `writer`, only temp files carrying it go (other nodes on a shared spool may be writing theirs now);
        without one (a spool of its own), every temp file."""
        removed = []
        pattern = f"*{self._temp_tag()}*{TEMP_SUFFIX}" if self.writer else f"*{TEMP_SUFFIX}"
        for temp in self.root.rglob(pattern):
            if temp.is_file():
                temp.unlink(missing_ok=True)
                removed.append(temp.relative_to(self.root).as_posix())
        return removed

    def iter_instance_files(self) -> Iterator[str]:
        """Relative paths of every received-instance file (excludes results/ and temp files)."""
        for top in sorted(self.root.iterdir()):
            if not top.is_dir() or top.name in RESERVED_TOP_DIRS:
                continue
            for path in top.rglob(f"*{INSTANCE_SUFFIX}"):
                if path.is_file() and not path.name.startswith("."):
                    yield path.relative_to(self.root).as_posix()

    def _ensure_dir(self, folder: Path) -> None:
        """Create a folder and make its entry durable in each newly created parent."""
        with self._dirs_lock:
            if folder in self._known_dirs:
                self._known_dirs.move_to_end(folder)
                return
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            _fsync_dir(new.parent)
        with self._dirs_lock:
            self._known_dirs[folder] = None
            while len(self._known_dirs) > KNOWN_DIRS_LIMIT:
                self._known_dirs.popitem(last=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
