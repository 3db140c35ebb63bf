"""C-STORE requests taken out of the P-DATA PDUs by the association's DUL thread and stored by it.

pynetdicom's own path decodes each PDU into PDU and PDV objects, hands them through two queues to a second
thread (the association reactor), decodes them once more as a DIMSE message (the command set through pydicom,
each UID checked by regular expression), raises an event, and hands the response back through a queue: about a
third of a listener's interpreter time per image, measured with py-spy (benchmarks/RESULTS.md, "Ingest: the
interpreter's share cut").

Here the DUL thread reads each P-DATA-TF PDU itself and walks its PDVs (PS3.8 9.3.5, E.2). A command set that is
a C-STORE-RQ with a data set, under an accepted presentation context, for a storage SOP class, is kept: its data
fragments are collected as they arrive, the store handler is called with them once the last one is in, and the
C-STORE-RSP goes out on the socket at once (what DT-1 does in Sta6). Everything else goes to pynetdicom as it
came, as a P-DATA-TF PDU of the same PDVs (command fragments held back while undecided included, in order):
C-ECHO and any other service, a command set this cannot read, any PDU outside Sta6 and any other PDU type. A
protocol error inside a kept message (a command fragment where data was due, data on another context, PDV
lengths that do not add up) is an invalid PDU (Evt19): pynetdicom aborts the association, as it does for a PDU it
cannot decode.
"""

from __future__ import annotations

import logging
import select
import ssl
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
COMMAND, LAST_FRAGMENT = 0x01, 0x02  # the message control header's bits (PS3.8 E.2)
C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
STATUS_HANDLER_FAILED = 0xC211  # what pynetdicom answers when a C-STORE handler raises
ESTABLISHED_POLL_SECONDS = 0.001  # a first request's wait for pynetdicom to finish accepting the association
ACCEPT_WAIT_SECONDS = 30.0  # that wait's bound when the association has no ACSE timeout

_BE_UL = struct.Struct(">L")
_US, _UL, _TAG = struct.Struct("<H"), struct.Struct("<L"), struct.Struct("<HHL")


@dataclass(frozen=True)
class StoreRequest:
    """What the store handler needs of a C-STORE-RQ and of the presentation context it came under."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int  # 0 medium, 1 high, 2 low (PS3.7 C.4.1.1)
    context_id: int
    transfer_syntax: str


# The handler: (association, request, data set as sent) -> (status, error comment or "").
StoreHandler = Callable[[Association, StoreRequest, bytes], tuple[int, str]]


class InvalidCommandSet(ValueError):
    pass


def read_command_set(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set (group 0000), by element number."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise InvalidCommandSet("truncated element header")
        group, element, length = _TAG.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise InvalidCommandSet(f"element ({group:04X},{element:04X}) is not a command element that fits")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _us(value: bytes | None) -> int | None:
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _uid(value: bytes | None) -> str:
    """A UI value without its padding; "" when absent or not plain ASCII."""
    if not value:
        return ""
    try:
        return value.rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        return ""


@cache
def _is_storage(sop_class_uid: str) -> bool:
    return issubclass(uid_to_service_class(sop_class_uid), StorageServiceClass)


class AcceptedTransferSyntaxes(Mapping[int, str]):
    """The transfer syntax of each accepted presentation context, by context ID, read from pynetdicom's accepted
    contexts (`Association._accepted_cx`) as requests name them: a sender proposing 128 contexts uses a few, and
    `Association.accepted_contexts` sorts them all on every call."""

    def __init__(self, accepted: dict[int, PresentationContext]) -> None:
        self._accepted = accepted
        self._read: dict[int, str] = {}

    def __getitem__(self, context_id: int) -> str:
        known = self._read.get(context_id)
        if known is None:
            context = self._accepted[context_id]  # KeyError: not an accepted context
            if not context.transfer_syntax:
                raise KeyError(context_id)
            known = self._read[context_id] = str(context.transfer_syntax[0])
        return known

    def __iter__(self) -> Iterator[int]:
        return (context_id for context_id in self._accepted if context_id in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, context_id: object) -> bool:
        try:
            self[context_id]  # type: ignore[index]
        except KeyError:
            return False
        return True


def store_request(
    elements: dict[int, bytes], context_id: int, transfer_syntaxes: Mapping[int, str]
) -> StoreRequest | None:
    """The C-STORE-RQ these command elements make, or None when they are anything else (pynetdicom's to serve):
    another command, no data set, a presentation context not accepted, a SOP class of another service."""
    if _us(elements.get(0x0100)) != C_STORE_RQ or _us(elements.get(0x0800)) in (None, NO_DATA_SET):
        return None
    message_id = _us(elements.get(0x0110))
    priority = _us(elements.get(0x0700))
    sop_class, sop_instance = _uid(elements.get(0x0002)), _uid(elements.get(0x1000))
    transfer_syntax = transfer_syntaxes.get(context_id)
    if message_id is None or not sop_class or not sop_instance or transfer_syntax is None:
        return None
    if not _is_storage(sop_class):
        return None
    return StoreRequest(message_id, sop_class, sop_instance, priority or 0, context_id, transfer_syntax)


def store_response_pdv(message_id: int, sop_class: str, sop_instance: str, status: int, comment: str = "") -> bytes:
    """A C-STORE-RSP as the one presentation data value pynetdicom makes of it: the message control header (command,
    last fragment) and the command set, Implicit VR Little Endian (PS3.7 9.3.1.2), with an Error Comment when
    `comment` is given. tests/test_direct_store.py compares it with pynetdicom's encoding."""
    body = (
        _element(0x0002, _uid_bytes(sop_class))
        + _element(0x0100, _US.pack(0x8001))  # C-STORE-RSP
        + _element(0x0120, _US.pack(message_id))
        + _element(0x0800, _US.pack(0x0101))  # no data set
        + _element(0x0900, _US.pack(status))
        + (_element(0x0902, _text(comment[:64])) if comment else b"")
        + _element(0x1000, _uid_bytes(sop_instance))
    )
    return b"\x03" + _element(0x0000, _UL.pack(len(body))) + body


def p_data_pdu(context_id: int, pdv: bytes) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value (`pdv`: control header and fragment)."""
    return _p_data_pdu(_BE_UL.pack(len(pdv) + 1) + bytes((context_id,)) + pdv)


def _p_data_pdu(items: bytes) -> bytes:
    """A P-DATA-TF PDU of presentation data value items, each already framed (length, context id, value)."""
    return bytes((P_DATA_TF, 0)) + _BE_UL.pack(len(items)) + items


def _element(element: int, value: bytes) -> bytes:
    return _TAG.pack(0x0000, element, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(text: str) -> bytes:
    raw = text.encode("ascii", errors="replace")
    return raw + b" " if len(raw) % 2 else raw


class DirectStore:
    """Takes the place of one acceptor association's `DULServiceProvider._read_pdu_data` (node/association_io.wire).

    Runs in the DUL thread only. The socket is node.association_io.EventSocket: bytes put back in its `primed`
    buffer are what pynetdicom's own reader reads next."""

    def __init__(self, assoc: Association, handler: StoreHandler) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.handler = handler
        self._pynetdicom_read: Callable[[], None] = self.dul._read_pdu_data
        self._held: list[memoryview] = []  # PDV items of a command set still arriving
        self._command = bytearray()
        self._request: StoreRequest | None = None  # the C-STORE kept here, while its data set arrives
        self._fragments: list[memoryview] = []
        self._transfer_syntaxes: AcceptedTransferSyntaxes | None = None

    def read_pdu(self) -> None:
        """Read a PDU; while a kept data set is arriving, also the PDUs after it that are there already (a data set
        comes in several: dcmtk sends at most 128 KiB per PDU), without a turn of pynetdicom's loop between them."""
        while self._read_one() and self._request is not None and self._more_now():
            pass

    def _read_one(self) -> bool:
        """Read and take one PDU; False when it went to pynetdicom or ended the association."""
        sock = self.dul.socket
        assert sock is not None
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):  # as pynetdicom: the transport connection is closed
            self.dul.event_queue.put("Evt17")
            return False
        if len(header) != 6 or header[0] != P_DATA_TF or self.dul.state_machine.current_state != "Sta6":
            self._forget()  # a partial message kept here ends with the association (release, abort) or as pynetdicom's
            self._to_pynetdicom(header)
            return False
        length = _BE_UL.unpack_from(header, 2)[0]
        try:
            body: bytearray | None = sock.recv(length)
        except (OSError, TimeoutError):
            body = None
        if body is None or len(body) != length:  # the peer closed the connection mid-PDU
            self.dul.event_queue.put("Evt17")
            return False
        try:
            self._take(body)
        except InvalidCommandSet as exc:
            log.warning("invalid P-DATA-TF from %s: %s; aborting the association", self._peer(), exc)
            self._forget()
            self.dul.event_queue.put("Evt19")
            return False
        return True

    def _more_now(self) -> bool:
        """Whether the next PDU's bytes can be read at once (never wait here: pynetdicom's loop does that, and
        checks its timers and kill flag meanwhile)."""
        if self.dul._kill_thread:
            return False
        raw = self.dul.socket.socket if self.dul.socket is not None else None
        if raw is None:
            return False
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return True
        try:
            return bool(select.select([raw], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _take(self, body: bytearray) -> None:
        """Walk the PDVs of one P-DATA-TF PDU: keep what is this class's, hand the rest to pynetdicom in order."""
        view = memoryview(body)
        passed: list[memoryview] = []
        offset, end = 0, len(body)
        while offset < end:
            if offset + 6 > end:
                raise InvalidCommandSet("truncated presentation data value item")
            length = _BE_UL.unpack_from(body, offset)[0]
            if length < 2 or offset + 4 + length > end:
                raise InvalidCommandSet(f"presentation data value item of length {length} does not fit the PDU")
            context_id, control = body[offset + 4], body[offset + 5]
            item, value = view[offset : offset + 4 + length], view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            request = self._request
            if request is not None:
                if control & COMMAND or context_id != request.context_id:
                    raise InvalidCommandSet("a command fragment or another context inside a C-STORE data set")
                self._fragments.append(value)
                if control & LAST_FRAGMENT:
                    self._hand_over(passed)
                    self._store(request)
            elif control & COMMAND:
                self._held.append(item)
                self._command += value
                if control & LAST_FRAGMENT:
                    self._decide(context_id, passed)
            else:  # data with no command kept here: pynetdicom's message, or pynetdicom's to refuse
                passed.extend(self._held)
                self._held, self._command = [], bytearray()
                passed.append(item)
        self._hand_over(passed)

    def _decide(self, context_id: int, passed: list[memoryview]) -> None:
        try:
            elements = read_command_set(self._command)
        except InvalidCommandSet:
            request = None  # pynetdicom reads it and answers as it does
        else:
            request = store_request(elements, context_id, self._contexts())
        if request is None:
            passed.extend(self._held)
        self._request = request
        self._held, self._command = [], bytearray()

    def _contexts(self) -> Mapping[int, str]:
        if self._transfer_syntaxes is None:  # fixed once the association is established (Sta6)
            self._transfer_syntaxes = AcceptedTransferSyntaxes(self.assoc._accepted_cx)
        return self._transfer_syntaxes

    def _store(self, request: StoreRequest) -> None:
        stream = b"".join(self._fragments)
        self._request, self._fragments = None, []
        if not self._established():
            return  # the association ended meanwhile: nothing to store it for, nor to answer on
        try:
            status, comment = self.handler(self.assoc, request, stream)
        except Exception:  # the handler answers its own failures; this is a bug in it, answered as pynetdicom does
            log.exception("C-STORE handler failed")
            status, comment = STATUS_HANDLER_FAILED, "Exception in the C-STORE handler"
        if not self.assoc.is_established:  # aborted meanwhile: nothing to answer on (pynetdicom does the same)
            return
        pdv = store_response_pdv(request.message_id, request.sop_class_uid, request.sop_instance_uid, status, comment)
        sock = self.dul.socket
        assert sock is not None
        sock.send(p_data_pdu(request.context_id, pdv))  # DT-1: the state stays Sta6

    def _established(self) -> bool:
        """Wait until pynetdicom has marked the association established; False if it ended instead.

        pynetdicom's reactor thread marks it only after sending the A-ASSOCIATE-AC and running the EVT_ACCEPTED
        handlers (the node audits the accept there), and this thread may have the sender's first request before
        that: serving it then would answer nothing (pynetdicom answers only on an established association) and
        record the store before the accept. pynetdicom's own path served nothing before either.

        An association being aborted or killed is not established either and never will be: `Association.kill`
        marks it so before it waits for this thread to take the A-ABORT (Sta6 -> Sta13 -> Sta1), so waiting on for
        the mark here would hold both threads forever (a node's stop that never returned, seen under load)."""
        assoc = self.assoc
        deadline = time.monotonic() + (assoc.acse_timeout or ACCEPT_WAIT_SECONDS)
        while not assoc.is_established:
            if assoc._kill or assoc._sent_abort or assoc.is_aborted or assoc.is_released:
                return False
            if self.dul._kill_thread or self.dul.state_machine.current_state != "Sta6":
                return False
            if time.monotonic() > deadline:
                log.warning("association from %s was never marked established; C-STORE not served", self._peer())
                return False
            time.sleep(ESTABLISHED_POLL_SECONDS)
        return True

    def _hand_over(self, passed: list[memoryview]) -> None:
        """Hand PDV items to pynetdicom as one P-DATA-TF PDU, read by its own reader next."""
        if not passed:
            return
        items = b"".join(passed)
        passed.clear()
        self._to_pynetdicom(_p_data_pdu(items))

    def _to_pynetdicom(self, pdu: bytes | bytearray) -> None:
        sock = self.dul.socket
        assert sock is not None
        sock.primed[:0] = pdu  # type: ignore[attr-defined]  # EventSocket (node/association_io.py)
        self._pynetdicom_read()

    def _forget(self) -> None:
        self._held, self._command = [], bytearray()
        self._request, self._fragments = None, []

    def _peer(self) -> str:
        return str((self.assoc.requestor.ae_title or "").strip())
