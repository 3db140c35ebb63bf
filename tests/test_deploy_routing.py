"""The Orthanc routing script a site copies (deploy/orthanc): originals go to the node, its own results never; with
several nodes, each study whole to one of them (the same one every time), or with failover to the next when it is down.

A real Orthanc runs the Lua script and routes to a real dcmtk storescp standing in for the node's listener.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.local_orthanc import Orthanc, peer_env
from tests.conftest import REPO_ROOT
from tests.dicomgen import make_ct_series, write_datasets
from tests.peers import StoreSCP
from tests.ports import free_port

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
            dicom_port=free_port(),
            http_port=free_port(),
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
        dicom_port=free_port(),
        http_port=free_port(),
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


# ---- several nodes: "edgenode-<name>" modalities --------------------------------------------------------------------

NODES = ("edgenode-a", "edgenode-b")


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's ID of a study: the SHA-1 of "<PatientID>|<StudyInstanceUID>", in five groups of eight hex digits."""
    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def own_node(study_id: str) -> str:
    """The node the shipped script sends a study to: the ID's first eight hex digits modulo the number of nodes."""
    return sorted(NODES)[int(study_id[:8], 16) % len(NODES)]


def studies_by_node(each: int) -> dict[str, list[list[Dataset]]]:
    """`each` small CT studies for every node, grouped by the node the script will choose for them."""
    by_node: dict[str, list[list[Dataset]]] = {node: [] for node in NODES}
    seed = 0
    while any(len(studies) < each for studies in by_node.values()):
        ct = make_ct_series(2, 32, 32, patient_id="ROUTED", seed=seed)
        seed += 1
        node = own_node(orthanc_study_id("ROUTED", ct[0].StudyInstanceUID))
        if len(by_node[node]) < each:
            by_node[node].append(ct)
    return by_node


def sop_uids(scp: StoreSCP) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()}


def routing_to_nodes(tmp_path: Path, nodes: dict[str, StoreSCP], failover: bool = False) -> Orthanc:
    return Orthanc(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        aet="PACS",
        modalities={name: ("EDGENODE", "127.0.0.1", scp.port) for name, scp in nodes.items()},
        lua_scripts=[LUA],
        extra_config={"StableAge": 1, **({"EdgenodeFailover": True} if failover else {})},
    )


def test_orthanc_sends_each_study_whole_to_its_own_node_of_several(tmp_path: Path) -> None:
    by_node = studies_by_node(2)
    files = [f for node in NODES for ct in by_node[node] for f in write_datasets(ct, tmp_path / ct[0].StudyInstanceUID)]
    scps = {node: StoreSCP(tmp_path / f"{node}-inbox", aet="EDGENODE") for node in NODES}
    with scps["edgenode-a"], scps["edgenode-b"], routing_to_nodes(tmp_path, scps) as pacs:
        _storescu(pacs.dicom_port, files)
        # The choice the test made is the script's: Orthanc's study IDs are the ones computed here.
        assert {s for s in pacs.get("/studies")} == {
            orthanc_study_id("ROUTED", ct[0].StudyInstanceUID) for node in NODES for ct in by_node[node]
        }
        want = {node: {str(ds.SOPInstanceUID) for ct in by_node[node] for ds in ct} for node in NODES}
        got = lambda: {node: sop_uids(scp) for node, scp in scps.items()}  # noqa: E731
        assert _wait_for(lambda: got() == want), (got(), (tmp_path / "orthanc" / "orthanc.log").read_text()[-3000:])
        time.sleep(2.5)  # a further stable period: nothing more arrives anywhere
        assert got() == want


def test_with_failover_a_study_whose_node_is_down_goes_to_the_next_node(tmp_path: Path) -> None:
    by_node = studies_by_node(1)
    files = [f for node in NODES for ct in by_node[node] for f in write_datasets(ct, tmp_path / ct[0].StudyInstanceUID)]
    scps = {node: StoreSCP(tmp_path / f"{node}-inbox", aet="EDGENODE") for node in NODES}
    with scps["edgenode-a"], routing_to_nodes(tmp_path, scps, failover=True) as pacs:  # edgenode-b is down
        _storescu(pacs.dicom_port, files)
        want = {str(ds.SOPInstanceUID) for node in NODES for ct in by_node[node] for ds in ct}
        assert _wait_for(lambda: sop_uids(scps["edgenode-a"]) == want), sop_uids(scps["edgenode-a"])
        log = (tmp_path / "orthanc" / "orthanc.log").read_text(errors="replace")
        b_study = orthanc_study_id("ROUTED", by_node["edgenode-b"][0][0].StudyInstanceUID)
        assert f"edgenode-b did not take study {b_study}" in log
        assert f"sent 1 series of study {b_study} to edgenode-a" in log
