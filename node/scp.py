"""The DICOM listener: C-ECHO and C-STORE from allowed peers, durably stored before Success.

Per C-STORE: free-space check, completeness check and index parse of the encoded bytes (no pixel
decode), duplicate/own-output lookup, file write under its final name, then file and folder fsync (at
the same time) and database commit with the audit event (group-committed with concurrent stores,
node/committer.py), and only then the Success response. Anything that cannot be stored gets a failure
status with an Error Comment and an `instance.rejected` audit event; nothing is half-kept.

Statuses (PS3.4 B.2.3): 0xA700 out of resources (disk below `node.min_free_disk_mb`), 0xA900 data set
does not match the SOP class (required UIDs missing, or not the ones in the C-STORE request, or pixel
data that does not match Rows x Columns x ... / Number of Frames: node/pixel_check.py),
0xC210 cannot understand (truncated or undecodable stream), 0x0110 processing failure (our fault).
A SOP Instance UID already stored: Success when the bytes are the same (idempotent resend), warning
0xB000 and an `instance.conflict` audit event when the content differs (node/resend.py); the first
copy is kept either way.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from db.ingest import IngestIndex, InstanceRecord
from db.models import AuditEventType
from node.audit_limit import DETAILED_PER_INTERVAL, RateLimitedAudit
from node.committer import GroupCommitter
from node.config import Settings
from node.direct_store import StoreRequest
from node.gate import (
    REJECT_LOCAL_LIMIT,
    ConnectionGate,
    GatedAssociationServer,
    Refusal,
    normalise_ip,
    start_gated_server,
)
from node.instance_locks import InstanceLocks
from node.listener_counts import AdmissionCounts
from node.part10 import part10_header
from node.received import OWN_MANUFACTURER, STATUS_DOES_NOT_MATCH, InvalidDataSet, parse_index_fields
from node.resend import Resend, compare_resend
from node.spool import Spool

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
# PS3.4 B.2.3 Warning "Coercion of Data Elements": the instance the node holds under this UID is not
# what was just sent (the first copy was kept). A warning, not a failure: the sender must not retry.
STATUS_CONFLICT_KEPT_FIRST = 0xB000

Answer = tuple[int, str]  # a C-STORE's answer: its status and Error Comment ("" for none)
SUCCESS: Answer = (STATUS_SUCCESS, "")

# Everything pydicom can hold. pynetdicom accepts the first syntax in THIS order that the sender
# proposes, so: lossless compressed first (the sender keeps its native encoding, nothing is lost), then
# uncompressed, then lossy last (only chosen when the sender offers nothing else, i.e. holds lossy data).
TRANSFER_SYNTAXES = [
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
]

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE title not recognized

INSTANCE_LOCK_FILE = "instances.lock"
ABORT_MARGIN_SECONDS = 5.0  # beyond the ARTIM timer, for a stopping node's abort of an open association
MAX_PDU = 1 << 20  # receive PDUs up to 1 MiB: fewer round trips per image than the 16 KiB default


def resolve_peers(settings: Settings) -> dict[str, set[str]]:
    """AE title -> the source IP addresses it may connect from (hostnames resolved at start)."""
    allowed: dict[str, set[str]] = {}
    for peer in settings.peers:
        try:
            addresses = {normalise_ip(peer.host)}
        except ValueError:
            infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
            addresses = {normalise_ip(str(info[4][0])) for info in infos}
        allowed.setdefault(peer.ae_title, set()).update(addresses)
    return allowed


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    node = settings.node
    if node.tls_cert is None or node.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(node.tls_cert), str(node.tls_key))
    if node.tls_ca is not None:
        context.load_verify_locations(str(node.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _store_request(event: evt.Event) -> C_STORE:
    """The request of an EVT_C_STORE event (pynetdicom types `event.request` as any DIMSE message)."""
    request = event.request
    assert isinstance(request, C_STORE)
    return request


def build_ae(settings: Settings) -> AE:
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:  # always set in pynetdicom's list (the attribute is Optional)
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.maximum_pdu_size = MAX_PDU
    ae.require_called_aet = False  # checked by the gate (_screen), so the rejection is audited
    return ae


class StorageSCP:
    """A pynetdicom association server bound to the spool and the ingest index."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        index: IngestIndex,
        on_source_instance: Callable[[str], None] | None = None,
        *,
        listen_socket: socket.socket | None = None,
        counts: AdmissionCounts | None = None,
        listeners: int = 1,
        slot: int = 0,
    ) -> None:
        """`on_source_instance(study_uid)` is called after each source instance (not our own results) is committed.

        In a listener process (node/listeners.py) `listen_socket` is the port's socket, shared with the node's other
        `listeners`, and `counts` are the node's, shared with them too; this is listener `slot` (from 0)."""
        self.settings = settings
        self.listen_socket = listen_socket
        self.counts = counts
        self.listeners = listeners
        self.which = f" (listener {slot + 1} of {listeners})" if listeners > 1 else ""
        self.spool = spool
        self.index = index
        self.on_source_instance = on_source_instance
        self.ae = build_ae(settings)
        self.allowed = resolve_peers(settings)
        self.min_free_bytes = settings.node.min_free_disk_mb * 1024 * 1024
        self.committer = GroupCommitter(index, spool)
        self._server: GatedAssociationServer | None = None
        # Several listener processes: a store of one UID in one of them excludes the others' (a lock file).
        self._instance_locks = InstanceLocks(settings.data_dir / INSTANCE_LOCK_FILE if listeners > 1 else None)
        self._inflight = 0
        self._draining = False
        self._cond = threading.Condition()

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        node = self.settings.node
        # Each listener process has a refusal audit limiter of its own: the detailed rows are divided among them.
        detailed = max(1, DETAILED_PER_INTERVAL // self.listeners)
        gate = ConnectionGate(
            self._screen,
            RateLimitedAudit(self._audit, node.refusal_audit_interval_seconds, detailed_per_interval=detailed),
            pending_timeout=node.pending_timeout_seconds,
            max_pending_per_address=node.max_pending_per_address,
            max_associations=node.max_associations,
            counts=self.counts,
            ssl_context=build_ssl_context(self.settings),
        )
        self.committer.start()
        self._server = start_gated_server(
            self.ae, (node.host, node.port), gate, handlers, listen_socket=self.listen_socket, store=self.receive
        )
        log.info(
            "listening as %s on %s:%d (%d peer(s) allowed)%s",
            node.ae_title,
            node.host,
            self.port,
            len(self.allowed),
            self.which,
        )

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop accepting, give open associations `grace_seconds` to finish, then end them.

        A C-STORE being handled always completes (file, commit, response); stores that arrive after
        the grace period are refused with 0xA700 so the sender keeps them and retries later.
        """
        if self._server is None:
            return
        self._server.shutdown()  # no new associations; connections still at the gate are closed
        self._server = None
        grace_end = time.monotonic() + grace_seconds
        while any(a.is_established for a in self._acceptors()) and time.monotonic() < grace_end:
            time.sleep(0.05)
        with self._cond:
            self._draining = True
            while self._inflight:
                self._cond.wait()
        self._abort_open_associations()
        self.committer.stop()
        self.index.close()
        log.info("listener stopped")

    def _abort_open_associations(self) -> None:
        """Abort the associations still open, side by side, each bounded: pynetdicom's blocking abort waits for the
        association's DUL thread to reach Sta1 with no limit of its own, and a stop must end (no store is in flight
        by now: the drain saw to it)."""
        still_open = [a for a in self._acceptors() if a.is_established]
        aborts = [threading.Thread(target=a.abort, name="abort-association", daemon=True) for a in still_open]
        for thread in aborts:
            thread.start()
        bound = (self.settings.node.acse_timeout or 30.0) + ABORT_MARGIN_SECONDS  # the ARTIM timer of Sta13
        deadline = time.monotonic() + bound
        for assoc, thread in zip(still_open, aborts, strict=True):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "association from %s did not end within %.0f s of its A-ABORT; stopping without waiting for it",
                    self._peer(assoc)[0],
                    bound,
                )

    def _acceptors(self) -> list[Association]:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    # --- association events ----------------------------------------------------------------------

    def _peer(self, assoc: Association) -> tuple[str, str, str]:
        calling = (assoc.requestor.ae_title or "").strip()
        called = (assoc.acceptor.ae_title or "").strip()
        try:
            address = assoc.requestor.address
        except ValueError:
            address = ""
        return calling, called, address

    def _screen(self, calling: str, called: str, address: str) -> Refusal | None:
        """The gate's check of an A-ASSOCIATE-RQ (node/gate.py): why it is refused, or None to accept it."""
        if self.settings.node.require_called_ae and called != self.settings.node.ae_title:
            return REJECT_CALLED_AE, f"called AE {called!r} is not {self.settings.node.ae_title!r}"
        allowed = self.allowed.get(calling)
        if allowed is None:
            return REJECT_CALLING_AE, f"calling AE {calling!r} is not a configured peer"
        try:
            source = normalise_ip(address)
        except ValueError:
            source = address
        if source not in allowed:
            return REJECT_CALLING_AE, f"calling AE {calling!r} is not allowed from {address}"
        if self.spool.free_bytes() < self.min_free_bytes:
            return REJECT_LOCAL_LIMIT, "free disk space below node.min_free_disk_mb"
        if self._draining:
            return REJECT_LOCAL_LIMIT, "node is shutting down"
        return None

    def _audit_association(self, event: evt.Event, event_type: AuditEventType, **fields: Any) -> None:
        calling, called, address = self._peer(event.assoc)
        self._audit(event_type, calling_ae=calling, called_ae=called, peer_address=address, **fields)

    def _on_accepted(self, event: evt.Event) -> None:
        tls = " (TLS)" if self.settings.node.tls_cert else ""
        accepted = len(event.assoc._accepted_cx)  # (`accepted_contexts` sorts them: ~130 for dcmtk's storescu)
        self._audit_association(
            event,
            AuditEventType.ASSOCIATION_ACCEPTED,
            detail=f"{accepted} presentation context(s) accepted{tls}{self.which}",
        )

    def _on_rejected(self, event: evt.Event) -> None:  # rejections made by pynetdicom itself (max associations)
        self._audit_association(
            event,
            AuditEventType.ASSOCIATION_REJECTED,
            outcome="failure",
            detail="local limit exceeded (node.max_associations)",
        )

    def _on_aborted(self, event: evt.Event) -> None:
        self._audit_association(event, AuditEventType.ASSOCIATION_ABORTED, outcome="warning")

    def _on_released(self, event: evt.Event) -> None:
        self._audit_association(event, AuditEventType.ASSOCIATION_RELEASED)

    def _on_echo(self, event: evt.Event) -> int:
        calling, called, address = self._peer(event.assoc)
        self._audit(AuditEventType.ECHO, calling_ae=calling, called_ae=called, peer_address=address)
        return STATUS_SUCCESS

    def _audit(self, event_type: AuditEventType, **fields: Any) -> None:
        try:
            self.index.record_event(event_type, **fields)
        except Exception:  # auditing must never take the listener down; the log keeps the trace
            log.exception("could not record audit event %s", event_type)

    # --- C-STORE ---------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """A C-STORE that pynetdicom served (the DUL thread hands it those it does not take: node/direct_store.py)."""
        request = _store_request(event)
        context = event.context
        store = StoreRequest(
            message_id=int(request.MessageID or 0),
            sop_class_uid=str(request.AffectedSOPClassUID or "").strip(),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or "").strip(),
            priority=int(request.Priority or 0),
            context_id=int(context.context_id),
            transfer_syntax=str(context.transfer_syntax),
        )
        status, comment = self.receive(event.assoc, store, event.encoded_dataset(include_meta=False))
        return _status(status, comment) if comment else status

    def receive(self, assoc: Association, request: StoreRequest, stream: bytes) -> Answer:
        """Store one C-STORE's data set (`stream`, as sent) and say what to answer: (status, error comment)."""
        with self._cond:
            draining = self._draining
            if not draining:
                self._inflight += 1
        if draining:  # answered and audited outside the lock: the sender keeps the instance and retries
            return self._refuse_unread(assoc, request, STATUS_OUT_OF_RESOURCES, "node is shutting down; retry later")
        try:
            return self._store(assoc, request, stream)
        except Exception as exc:  # an unforeseen failure still gets a DIMSE answer and an audit event
            log.exception("C-STORE handling failed")
            return self._refuse_unread(
                assoc, request, STATUS_PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"
            )
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _refuse_unread(self, assoc: Association, request: StoreRequest, status: int, reason: str) -> Answer:
        """Refuse a C-STORE whose data set was not (or could not be) looked at: named by the request's UID."""
        calling, called, address = self._peer(assoc)
        who = {"calling_ae": calling, "called_ae": called, "peer_address": address}
        return self._reject(status, reason, request.sop_instance_uid, who)

    def _store(self, assoc: Association, request: StoreRequest, stream: bytes) -> Answer:
        calling, called, address = self._peer(assoc)
        requested_sop = request.sop_instance_uid
        requested_class = request.sop_class_uid
        who = {"calling_ae": calling, "called_ae": called, "peer_address": address}
        transfer_syntax = request.transfer_syntax

        if self.spool.free_bytes() - len(stream) < self.min_free_bytes:
            return self._reject(
                STATUS_OUT_OF_RESOURCES, "free disk space below node.min_free_disk_mb", requested_sop, who
            )
        try:
            fields = parse_index_fields(stream, transfer_syntax)
            if fields.sop_instance_uid != requested_sop:
                raise InvalidDataSet(STATUS_DOES_NOT_MATCH, "SOP Instance UID differs from the C-STORE request")
            if fields.sop_class_uid != requested_class:
                raise InvalidDataSet(STATUS_DOES_NOT_MATCH, "SOP Class UID differs from the C-STORE request")
        except InvalidDataSet as exc:
            return self._reject(exc.status, exc.reason, requested_sop, who)

        sop = fields.sop_instance_uid
        ids = {
            "patient_id": fields.patient_id,
            "accession_number": fields.accession_number,
            "study_instance_uid": fields.study_instance_uid,
            "series_instance_uid": fields.series_instance_uid,
            "sop_instance_uid": sop,
        }
        with self._instance_locks.holding(sop):
            try:
                stored_before, is_result, series_study = self.index.lookup(sop, fields.series_instance_uid)
                if stored_before:
                    return self._answer_resend(sop, stream, transfer_syntax, who, ids)
                if series_study is not None and series_study != fields.study_instance_uid:
                    # A UID collision at the sender: filing it would mix two studies (two patients) in one series.
                    return self._reject(
                        STATUS_DOES_NOT_MATCH, "Series Instance UID already belongs to another study", sop, who, ids
                    )
                own = is_result or fields.manufacturer.lower() == OWN_MANUFACTURER
                header = part10_header(fields.sop_class_uid, sop, transfer_syntax)
                placed = self.spool.place_instance(
                    fields.study_instance_uid, fields.series_instance_uid, sop, header, stream
                )
            except OSError as exc:
                log.error("cannot write instance %s: %s", sop, exc)
                return self._reject(
                    STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}", sop, who, ids
                )
            except Exception as exc:
                log.exception("cannot store instance %s", sop)
                return self._reject(STATUS_PROCESSING_FAILURE, f"internal error: {type(exc).__name__}", sop, who, ids)
            record = InstanceRecord(
                study_instance_uid=fields.study_instance_uid,
                series_instance_uid=fields.series_instance_uid,
                sop_instance_uid=sop,
                sop_class_uid=fields.sop_class_uid,
                transfer_syntax_uid=transfer_syntax,
                path=placed.relpath,
                size_bytes=placed.size,
                sha256="",  # the committer hashes the file while its fsync runs
                calling_ae=calling,
                called_ae=called,
                peer_address=address,
                patient_id=fields.patient_id,
                accession_number=fields.accession_number,
                study_date=fields.study_date,
                study_description=fields.study_description,
                modality=fields.modality,
                body_part=fields.body_part,
                series_description=fields.series_description,
                series_number=fields.series_number,
                instance_number=fields.instance_number,
                own_output=own,
                stat=fields.stat or request.priority == 1,  # C-STORE priority HIGH
            )
            try:
                added = self.committer.submit(record, placed)  # file and folder fsync, commit: shared with others
            except OSError as exc:  # an fsync failed: the file may not be on disk
                log.error("cannot write instance %s: %s", sop, exc)
                self._remove_unindexed(sop, placed.relpath)
                return self._reject(
                    STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}", sop, who, ids
                )
            except Exception as exc:
                log.exception("cannot index instance %s", sop)
                self._remove_unindexed(sop, placed.relpath)
                return self._reject(STATUS_PROCESSING_FAILURE, f"database error: {type(exc).__name__}", sop, who, ids)
            finally:
                placed.close()
            if not added:  # another process indexed the same SOP Instance UID in between: its row, this file
                return SUCCESS
        if self.on_source_instance is not None and not own:
            try:
                self.on_source_instance(fields.study_instance_uid)
            except Exception:  # the periodic scan still completes the study
                log.exception("instance %s stored; notifying the stability scan failed", sop)
        log.debug("stored %s (%d bytes) from %s", sop, placed.size, calling)
        return SUCCESS

    def _answer_resend(
        self, sop: str, stream: bytes, transfer_syntax: str, who: dict[str, str], ids: dict[str, str]
    ) -> Answer:
        """An already stored SOP Instance UID: the first copy stays. Identical bytes are a plain success;
        different content is audited as a conflict with both hashes and answered with a warning."""
        first = self.index.stored_copy(sop)
        if first is None:  # removed (retention) since the lookup: the sender's next resend stores it afresh
            resend = Resend(None, "", "", "first copy removed meanwhile; not compared")
        else:
            resend = compare_resend(self.spool.path(first.path), first.transfer_syntax_uid, stream, transfer_syntax)
        if resend.identical is False:
            log.warning("instance %s from %s: other content under a stored SOP Instance UID", sop, who["calling_ae"])
            self._audit(
                AuditEventType.INSTANCE_CONFLICT,
                outcome="warning",
                **who,
                **ids,
                dimse_status=STATUS_CONFLICT_KEPT_FIRST,
                detail=f"different content under a stored SOP Instance UID; kept the first copy "
                f"(sha256 {resend.first_sha256}), discarded this one (sha256 {resend.this_sha256})",
            )
            return STATUS_CONFLICT_KEPT_FIRST, "SOP Instance UID stored with other content; first copy kept"
        log.info("duplicate instance %s from %s: already stored", sop, who["calling_ae"])
        detail = "already stored; kept the first copy" + (f" ({resend.note})" if resend.note else "")
        self._audit(AuditEventType.INSTANCE_DUPLICATE, **who, **ids, dimse_status=STATUS_SUCCESS, detail=detail)
        return SUCCESS

    def _remove_unindexed(self, sop: str, relpath: str) -> None:
        """After a failed index write: remove the file so a retry starts clean, unless a row for the instance
        exists after all (it names this same path); if the database cannot say, keep the file (start-up
        recovery removes files no row names, so keeping one never loses anything)."""
        try:
            indexed = self.index.lookup(sop)[0]
        except Exception:  # noqa: BLE001 - the database is failing; keeping the file is the safe side
            log.warning("instance %s: cannot check the index; its file stays for start-up recovery", sop)
            return
        if not indexed:
            self.spool.delete(relpath)

    def _reject(
        self, status: int, reason: str, sop: str, who: dict[str, str], ids: dict[str, str] | None = None
    ) -> Answer:
        log.warning("refused instance %s from %s: %s (status 0x%04X)", sop, who.get("calling_ae"), reason, status)
        fields = dict(ids or {"sop_instance_uid": sop})
        self._audit(
            AuditEventType.INSTANCE_REJECTED, outcome="failure", **who, **fields, dimse_status=status, detail=reason
        )
        return status, reason[:64]


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds
