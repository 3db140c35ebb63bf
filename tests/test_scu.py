"""Outbound C-STORE: TLS to a peer that requires it (dcmtk storescp with a test PKI), contexts proposed."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import NodeSettings, PeerSettings
from node.scu import OutgoingFile, contexts_for, store_files
from tests.dicomgen import make_ct_series, write_datasets
from tests.peers import StoreSCP
from tests.test_scp_tls import make_pki


def test_contexts_are_the_distinct_pairs_the_files_need(tmp_path: Path) -> None:
    series = make_ct_series(3, 16, 16)
    series[2].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    files = [OutgoingFile.from_path(n, p) for n, p in enumerate(write_datasets(series, tmp_path))]
    assert contexts_for(files) == [(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, ImplicitVRLittleEndian)]


def test_tls_peer_receives_over_tls_and_plain_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    series = make_ct_series(2, 16, 16)
    files = [OutgoingFile.from_path(n, p) for n, p in enumerate(write_datasets(series, tmp_path / "out"))]
    node = NodeSettings(tls_cert=pki["client.pem"], tls_key=pki["client.key"], tls_ca=pki["ca.pem"])
    tls_args = ["+tls", str(pki["server.key"]), str(pki["server.pem"]), "+cf", str(pki["ca.pem"]), "-rc", "-pw"]
    with StoreSCP(tmp_path / "scp", extra_args=tls_args) as scp:
        plain = list(store_files(node, PeerSettings(ae_title="STORESCP", port=scp.port), files))
        assert [o.stored for o in plain] == [False, False] and all(o.error for o in plain)
        secure = list(store_files(node, PeerSettings(ae_title="STORESCP", port=scp.port, tls=True), files))
        assert [(o.key, o.status) for o in secure] == [(0, 0), (1, 0)]
        received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()}
    assert received == {str(ds.SOPInstanceUID) for ds in series}


def test_untrusted_peer_certificate_is_refused(tmp_path: Path) -> None:
    """The node verifies the PACS against its CA: a peer with a certificate from another CA gets nothing."""
    ours, theirs = make_pki(tmp_path / "ours"), make_pki(tmp_path / "theirs")
    files = [OutgoingFile.from_path(0, write_datasets(make_ct_series(1, 16, 16), tmp_path / "out")[0])]
    node = NodeSettings(tls_cert=ours["client.pem"], tls_key=ours["client.key"], tls_ca=ours["ca.pem"])
    tls_args = ["+tls", str(theirs["server.key"]), str(theirs["server.pem"]), "+cf", str(ours["ca.pem"]), "-pw"]
    with StoreSCP(tmp_path / "scp", extra_args=tls_args) as scp:
        (outcome,) = store_files(node, PeerSettings(ae_title="STORESCP", port=scp.port, tls=True), files)
        assert not outcome.stored and outcome.status is None and "STORESCP" in outcome.error
        assert scp.received() == []


def test_outbound_associations_send_without_nagle_delay(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every outbound association's socket has TCP_NODELAY set, before the association request."""
    import socket

    import node.scu as scu

    seen: list[int] = []
    real = scu.prepare_socket

    def recording(event, *args):  # type: ignore[no-untyped-def]
        real(event, *args)
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(scu, "prepare_socket", recording)
    series = make_ct_series(2, 16, 16)
    files = [OutgoingFile.from_path(n, p) for n, p in enumerate(write_datasets(series, tmp_path / "out"))]
    with StoreSCP(tmp_path / "scp") as scp:
        outcomes = list(store_files(NodeSettings(), PeerSettings(ae_title="STORESCP", port=scp.port), files))
    assert [o.stored for o in outcomes] == [True, True]
    assert seen and all(value != 0 for value in seen)


def test_a_peer_certificate_from_the_right_ca_for_another_host_is_refused(tmp_path: Path) -> None:
    """Chaining to a trusted CA is not enough: the certificate must name the peer (an impostor with any
    certificate from the same CA, or from a public one, gets nothing) unless the peer trusts the private CA alone."""
    pki = make_pki(tmp_path / "pki")
    files = [OutgoingFile.from_path(0, write_datasets(make_ct_series(1, 16, 16), tmp_path / "out")[0])]
    node = NodeSettings(tls_cert=pki["client.pem"], tls_key=pki["client.key"], tls_ca=pki["ca.pem"])
    # the impostor presents the CA-signed certificate of "SENDER", which names no host
    impostor = ["+tls", str(pki["client.key"]), str(pki["client.pem"]), "+cf", str(pki["ca.pem"]), "-pw"]
    with StoreSCP(tmp_path / "scp", extra_args=impostor) as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port, tls=True)
        (outcome,) = store_files(node, peer, files)
        assert not outcome.stored and scp.received() == []
        trusting = PeerSettings(ae_title="STORESCP", port=scp.port, tls=True, tls_verify_name=False)
        (outcome,) = store_files(node, trusting, files)
        assert outcome.stored and len(scp.received()) == 1


def test_trusting_the_ca_alone_needs_a_private_ca() -> None:
    from node.config import ConfigError, load_settings

    peer = {"ae_title": "PACS", "tls": True, "tls_verify_name": False}
    with pytest.raises(ConfigError, match="tls_verify_name = false needs \\[node\\] tls_ca"):
        load_settings(None, peers=[peer])


def _store_in_thread(node: NodeSettings, peer: PeerSettings, files: list[OutgoingFile]) -> tuple[list, float]:
    import threading
    import time

    result: dict[str, object] = {}

    def send() -> None:
        started = time.monotonic()
        result["outcomes"] = list(store_files(node, peer, files))
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the sender hung"  # a hung sender holds the send lock: no PACS gets results
    return result["outcomes"], result["seconds"]  # type: ignore[return-value]


def test_a_tls_peer_that_never_completes_the_handshake_cannot_hang_the_sender(tmp_path: Path) -> None:
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    files = [OutgoingFile.from_path(0, write_datasets(make_ct_series(1, 16, 16), tmp_path / "out")[0])]
    node = NodeSettings(acse_timeout=2, dimse_timeout=2, network_timeout=2)
    peer = PeerSettings(ae_title="SILENT", port=silent.getsockname()[1], tls=True)
    (outcome,), _ = _store_in_thread(node, peer, files)
    assert not outcome.stored
    silent.close()


def test_a_peer_that_stops_reading_mid_store_cannot_hang_the_sender(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    from pynetdicom.association import Association

    paths = write_datasets(make_ct_series(2, 2048, 2048), tmp_path / "out")  # 8 MB each: more than socket buffers
    files = [OutgoingFile.from_path(n, p) for n, p in enumerate(paths)]
    with StoreSCP(tmp_path / "scp") as scp:
        send = Association.send_c_store

        def frozen_peer(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            os.kill(scp.proc.pid, signal.SIGSTOP)  # the PACS process hangs: it stops reading its socket
            return send(self, *args, **kwargs)

        monkeypatch.setattr(Association, "send_c_store", frozen_peer)
        try:
            node = NodeSettings(acse_timeout=2, dimse_timeout=2, network_timeout=2)
            outcomes, _ = _store_in_thread(node, PeerSettings(ae_title="STORESCP", port=scp.port), files)
        finally:
            os.kill(scp.proc.pid, signal.SIGCONT)
    assert not any(o.stored for o in outcomes)  # retried later, by the queue


def test_a_pacs_that_accepts_only_implicit_vr_still_gets_the_results(tmp_path: Path) -> None:
    series = make_ct_series(2, 16, 16)  # written Explicit VR Little Endian, like every result object
    files = [OutgoingFile.from_path(n, p) for n, p in enumerate(write_datasets(series, tmp_path / "out"))]
    with StoreSCP(tmp_path / "scp", extra_args=["+xi"]) as scp:  # storescp: accept Implicit VR Little Endian only
        outcomes = list(store_files(NodeSettings(), PeerSettings(ae_title="STORESCP", port=scp.port), files))
        assert [(o.key, o.status) for o in outcomes] == [(0, 0), (1, 0)]
        received = [pydicom.dcmread(p) for p in scp.received()]
    assert {str(ds.SOPInstanceUID) for ds in received} == {str(ds.SOPInstanceUID) for ds in series}
    assert all(ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian for ds in received)
    assert all(
        ds.PixelData == src.PixelData
        for ds, src in zip(
            sorted(received, key=lambda d: d.SOPInstanceUID),
            sorted(series, key=lambda d: d.SOPInstanceUID),
            strict=True,
        )
    )
