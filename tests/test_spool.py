"""The spool: atomic durable writes, safe paths, temp-file cleanup, and what counts as an instance file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from node.spool import TEMP_SUFFIX, Spool, free_disk_bytes, safe_component


def test_store_instance_layout_size_and_checksum(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM-bytes")
    assert stored.relpath == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert (stored.size, stored.sha256) == (10, hashlib.sha256(b"DICM-bytes").hexdigest())
    assert spool.path(stored.relpath).read_bytes() == b"DICM-bytes"
    assert list(spool.iter_instance_files()) == [stored.relpath]


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_atomic("results/job-1/seg.dcm", b"one")
    spool.write_atomic("results/job-1/seg.dcm", b"two")
    assert spool.path("results/job-1/seg.dcm").read_bytes() == b"two"
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
    assert list(spool.iter_instance_files()) == []  # outgoing results are not received instances


def test_unsafe_uids_cannot_escape_or_collide(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    a = spool.store_instance("../..", "x/y", "1 2", b"a")
    b = spool.store_instance("../..", "x/y", "1_2", b"b")
    assert a.relpath != b.relpath
    assert all(spool.path(s.relpath).is_relative_to(spool.root) for s in (a, b))
    assert safe_component("1.2.840.10008") == "1.2.840.10008"
    assert safe_component("results") != "results"
    with pytest.raises(ValueError):
        spool.path("../outside.dcm")


def test_cleanup_temp_and_delete(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.store_instance("1.2", "1.2.3", "1.2.3.4", b"x")
    leftover = tmp_path / "1.2" / "1.2.3" / f".1.2.3.5.dcm.abc{TEMP_SUFFIX}"
    leftover.write_bytes(b"partial")
    assert list(spool.iter_instance_files()) == [kept.relpath]  # temp files are never instances
    assert spool.cleanup_temp() == [leftover.relative_to(tmp_path).as_posix()]
    assert not leftover.exists()
    spool.delete(kept.relpath)
    assert not (tmp_path / "1.2").exists()  # empty folders go too
    again = spool.store_instance("1.2", "1.2.3", "1.2.3.6", b"y")  # and the folder comes back when needed
    assert spool.path(again.relpath).read_bytes() == b"y"
    assert spool.free_bytes() > 0


def test_folder_cache_stays_bounded_when_others_remove_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import node.spool

    monkeypatch.setattr(node.spool, "KNOWN_DIRS_LIMIT", 8)
    spool = Spool(tmp_path / "spool")
    for n in range(50):
        spool.store_instance(f"1.{n}", "2", "3", b"data")
        shutil.rmtree(spool.root / f"1.{n}")  # retention, in another object or process
    assert len(spool._known_dirs) <= 8
    spool.store_instance("1.0", "2", "3", b"again")  # a stale entry costs one retry, never a failure
    assert spool.path("1.0/2/3.dcm").read_bytes() == b"again"


def test_a_spool_folder_that_is_a_symlink_to_another_disk_is_still_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    elsewhere = tmp_path / "other-disk" / "results"
    elsewhere.mkdir(parents=True)
    (spool.root / "results").symlink_to(elsewhere)  # results on their own volume, as sites do
    spool.write_atomic("results/job-1/seg.dcm", b"seg")
    assert spool.path("results/job-1/seg.dcm").read_bytes() == b"seg"
    assert (elsewhere / "job-1" / "seg.dcm").is_file()
    for escaping in ("results/../../other-disk/results/job-1/seg.dcm", "/etc/passwd", "../spool2/x.dcm"):
        with pytest.raises(ValueError, match="outside the spool"):
            spool.path(escaping)


def test_free_disk_of_a_folder_not_made_yet_is_read_on_its_nearest_parent(tmp_path: Path) -> None:
    assert free_disk_bytes(tmp_path / "not" / "made" / "yet") > 0  # data_dir before the first start: no error


def test_placing_over_a_leftover_file_replaces_it_and_leaves_it_durable(tmp_path: Path) -> None:
    """A torn file under the name (a store interrupted before its row) is replaced whole, already fsynced."""
    spool = Spool(tmp_path / "spool")
    first = spool.place_instance("1.2", "1.2.3", "1.2.3.4", b"torn")
    first.close()
    placed = spool.place_instance("1.2", "1.2.3", "1.2.3.4", b"header", b"data set")
    assert placed.fd is None  # fsynced before it took the name: only the folder is left
    assert spool.path(placed.relpath).read_bytes() == b"headerdata set"
    assert placed.size == 14 and placed.digest() == hashlib.sha256(b"headerdata set").hexdigest()
    assert not list(spool.root.rglob(f"*{TEMP_SUFFIX}"))


def test_a_failed_write_leaves_no_file_under_the_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(TypeError):
        spool.place_instance("1.2", "1.2.3", "1.2.3.4", b"header", "not bytes")  # type: ignore[arg-type]
    assert not list(spool.root.rglob("*.dcm"))
