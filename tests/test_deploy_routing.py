"""The Orthanc routing script a site copies (deploy/orthanc): originals go to the node, its own results never.

A real Orthanc runs the Lua script and routes to a real dcmtk storescp standing in for the node's listener.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from node.local_orthanc import Orthanc, peer_env
from tests.conftest import REPO_ROOT
from tests.dicomgen import make_ct_series, write_datasets
from tests.peers import StoreSCP

LUA = REPO_ROOT / "deploy" / "orthanc" / "edgenode-routing.lua"


def _storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=peer_env(),
        capture_output=True,
        timeout=60,
    )


def _wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_orthanc_routes_originals_but_not_node_results(tmp_path: Path) -> None:
    ct = make_ct_series(4, 32, 32)
    study_uid = ct[0].StudyInstanceUID
    # A result series as the node writes it: same study, Manufacturer "edgenode".
    own = make_ct_series(2, 32, 32, study_uid=study_uid, series_number=900, seed=1)
    for ds in own:
        ds.Manufacturer = "edgenode"
    ct_files = write_datasets(ct, tmp_path / "ct")
    own_files = write_datasets(own, tmp_path / "own")

    with (
        StoreSCP(tmp_path / "node-inbox", aet="EDGENODE") as node,
        Orthanc(
            tmp_path / "orthanc",
            aet="PACS",
            modalities={"edgenode": ("EDGENODE", "127.0.0.1", node.port)},
            lua_scripts=[LUA],
            extra_config={"StableAge": 1},
        ) as pacs,
    ):
        _storescu(pacs.dicom_port, ct_files + own_files)
        assert _wait_for(lambda: len(node.received()) >= len(ct_files)), "Orthanc did not route the study"
        time.sleep(2.5)  # a further stable period: nothing else may arrive
        received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in node.received()}
        assert received == {ds.SOPInstanceUID for ds in ct}
        assert len(pacs.instances_of_study(study_uid)) == len(ct) + len(own)


@pytest.mark.slow
def test_a_refused_forward_is_retried_once_the_node_is_back(tmp_path: Path) -> None:
    """The node is down when the study becomes stable: Orthanc logs the refusal and keeps the study on its retry
    list; once the node listens again the next retry delivers it (Orthanc 1.10 has no Lua heartbeat, so an
    instance arriving is what runs the retry here). The shipped script, with its retry delays cut to 1 s."""
    script = LUA.read_text()
    assert "local RETRY_FIRST_SECONDS = 30\n" in script
    fast = tmp_path / "edgenode-routing.lua"
    fast.write_text(script.replace("local RETRY_FIRST_SECONDS = 30\n", "local RETRY_FIRST_SECONDS = 1\n"))
    ct = make_ct_series(3, 32, 32)
    other = make_ct_series(1, 32, 32, seed=2)  # a later study from the modality
    ct_files = write_datasets(ct, tmp_path / "ct")
    other_files = write_datasets(other, tmp_path / "other")

    node = StoreSCP(tmp_path / "node-inbox", aet="EDGENODE")  # not started: the node is down
    with Orthanc(
        tmp_path / "orthanc",
        aet="PACS",
        modalities={"edgenode": ("EDGENODE", "127.0.0.1", node.port)},
        lua_scripts=[fast],
        extra_config={"StableAge": 1},
    ) as pacs:
        log = tmp_path / "orthanc" / "orthanc.log"
        _storescu(pacs.dicom_port, ct_files)
        assert _wait_for(lambda: "did not take study" in log.read_text(errors="replace")), log.read_text()[-3000:]
        time.sleep(1.5)  # past the first retry delay
        with node:
            _storescu(pacs.dicom_port, other_files)
            want = {ds.SOPInstanceUID for ds in ct + other}
            arrived = lambda: {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in node.received()}  # noqa: E731
            assert _wait_for(lambda: arrived() == want), (arrived(), log.read_text()[-3000:])
