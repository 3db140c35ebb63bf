"""Outbound C-STORE: one association per destination, proposing exactly the contexts the files need.

This module only talks DICOM; what to send and what an outcome means for the queue is node/outbound.py.
Outcomes are yielded one file at a time, right after the peer's response, so the caller can commit each
acknowledgement before the next file goes out.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context

from node.config import NodeSettings, PeerSettings

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Warnings that still mean "stored": coercion of data elements, elements discarded, data set does not match SOP class.
ACCEPTED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # DICOM allows 128 presentation contexts per association (odd IDs 1..255)


@dataclass(frozen=True)
class OutgoingFile:
    """A file to send, with what the association has to propose for it."""

    key: int  # the caller's id (the outbound item)
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def from_path(cls, key: int, path: Path) -> OutgoingFile:
        """Read only the file meta information (the SOP class, instance and transfer syntax)."""
        meta = read_file_meta_info(path)
        return cls(
            key=key,
            path=path,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
        )


@dataclass(frozen=True)
class StoreOutcome:
    key: int
    status: int | None  # DIMSE status; None when no response came (association refused, aborted, timed out)
    error: str = ""
    tried: bool = True  # False: never sent, the association was gone before its turn (no attempt to count)

    @property
    def stored(self) -> bool:
        return self.status is not None and (self.status == SUCCESS or self.status in ACCEPTED_WARNINGS)


def proposed_contexts(files: Sequence[OutgoingFile]) -> list[PresentationContext]:
    """One context per distinct (SOP class, transfer syntax) the files need. An uncompressed file's context also
    offers the other uncompressed syntax, the file's own first: every SCP must accept Implicit VR Little Endian,
    so a PACS that takes nothing else still gets the results (re-encoded by pynetdicom)."""
    contexts = []
    for sop_class, syntax in contexts_for(files):
        syntaxes = [syntax, *(u for u in UNCOMPRESSED if u != syntax)] if syntax in UNCOMPRESSED else [syntax]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts


def contexts_for(files: Sequence[OutgoingFile]) -> list[tuple[str, str]]:
    """The distinct (SOP class, transfer syntax) pairs the files need, in first-seen order."""
    return list(dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in files))


def tls_context(node: NodeSettings, peer: PeerSettings) -> ssl.SSLContext:
    """Client TLS for peers marked `tls = true`: the peer's certificate must chain to tls_ca (else the system CAs)
    and name the peer (`tls_server_name`, else `host`), unless the peer says to trust the private CA alone; our
    certificate is presented when configured."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(node.tls_ca) if node.tls_ca else None)
    context.check_hostname = peer.tls_verify_name
    if node.tls_cert and node.tls_key:
        context.load_cert_chain(str(node.tls_cert), str(node.tls_key))
    return context


def prepare_socket(event: evt.Event, send_timeout: float | None = None) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once (TCP_NODELAY), and give up a send the peer stops reading.

    With Nagle's algorithm a PDU smaller than a segment waits for the peer's acknowledgement of the previous one;
    sending a CT's results (5 MB in 16 KB PDUs) to Orthanc took 0.20 s with it and 0.09 s without. Without a
    socket timeout a peer that stops reading blocks the send for ever (the DIMSE timeout cannot abort it).
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not TCP (never in practice): sending works, just with Nagle
            log.debug("TCP_NODELAY not set: %s", exc)
        if send_timeout is not None:
            sock.settimeout(send_timeout)


def store_files(node: NodeSettings, peer: PeerSettings, files: Sequence[OutgoingFile]) -> Iterator[StoreOutcome]:
    """Send `files` to `peer` over one association (or a few, past 128 contexts); one outcome per file."""
    remaining = list(files)
    while remaining:
        batch: list[OutgoingFile] = []
        pairs: set[tuple[str, str]] = set()
        for f in remaining:
            pair = (f.sop_class_uid, f.transfer_syntax_uid)
            if pair not in pairs and len(pairs) == MAX_CONTEXTS:
                continue
            pairs.add(pair)
            batch.append(f)
        remaining = [f for f in remaining if f not in batch]
        yield from _store_batch(node, peer, batch)


def _store_batch(node: NodeSettings, peer: PeerSettings, files: list[OutgoingFile]) -> Iterator[StoreOutcome]:
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.network_timeout  # TCP connect and the TLS handshake: a silent peer cannot hang us
    ae.requested_contexts = proposed_contexts(files)
    tls_args = (tls_context(node, peer), peer.tls_server_name or peer.host) if peer.tls else None
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, prepare_socket, [node.network_timeout])],
        )
    except (OSError, ssl.SSLError) as exc:
        for f in files:
            yield StoreOutcome(f.key, None, f"cannot connect to {where}: {exc}")
        return
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        for f in files:
            yield StoreOutcome(f.key, None, f"association to {where} {reason}")
        return
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for f in files:
            if not assoc.is_established:
                yield StoreOutcome(f.key, None, f"association to {where} was lost before it was sent", tried=False)
                continue
            as_written = (f.sop_class_uid, f.transfer_syntax_uid) in accepted
            re_encodable = f.transfer_syntax_uid in UNCOMPRESSED and any(
                (f.sop_class_uid, u) in accepted for u in UNCOMPRESSED
            )
            if not (as_written or re_encodable):
                yield StoreOutcome(
                    f.key, None, f"{where} did not accept {f.sop_class_uid} in transfer syntax {f.transfer_syntax_uid}"
                )
                continue
            try:
                # The file's bytes as they are when the peer takes its syntax; else the data set, which pynetdicom
                # encodes in the uncompressed syntax the peer accepted.
                response = assoc.send_c_store(f.path if as_written else dcmread(f.path))
            except (OSError, ValueError, AttributeError) as exc:
                yield StoreOutcome(f.key, None, f"sending {f.sop_instance_uid}: {exc}")
                continue
            status = int(response.Status) if response is not None and "Status" in response else None
            if status is None:
                yield StoreOutcome(f.key, None, f"no response from {where} (timeout or abort)")
            else:
                comment = str(response.get("ErrorComment", "") or "")
                log.info("C-STORE %s to %s: status 0x%04X %s", f.sop_instance_uid, where, status, comment)
                yield StoreOutcome(f.key, status, comment)
    finally:
        if assoc.is_established:
            assoc.release()
