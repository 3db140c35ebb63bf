"""An A-ASSOCIATE-RQ the listener has negotiated before is answered from what its first negotiation made.

pynetdicom negotiates every association from scratch: it decodes the request into PDU items, turns them into a
primitive, negotiates each proposed presentation context against the ~130 supported ones and builds and encodes the
A-ASSOCIATE-AC, each step making UID objects through setters that check them (a regular expression per UID per
step). For the 128 contexts dcmtk's storescu proposes that is ~15 ms of CPU per association, six times what Orthanc
spends on a whole association (benchmarks/associations.py), and a PACS sends each study, or series, over an
association of its own, with the same request bytes every time.

All three steps are functions of the request's bytes and the listener's fixed configuration, so `NegotiationMemo`
keeps their results per distinct request (up to MAX_REQUESTS, least recently used dropped):

1. decoding: `wire()` (node/association_io.py) gives each association `decode_pdu`, which returns the request
   decoded once (`RememberedRequest`, a full pynetdicom A_ASSOCIATE_RQ); its `to_primitive` returns a copy of
   the primitive made once, whose context list (`Proposal`) points back to it;
2. presentation context negotiation: `install()` wraps `pynetdicom.acse.negotiate_as_acceptor` (ACSE calls it
   through its module), which for a `Proposal` returns the result of the first call with the same supported
   contexts and requested roles, and for anything else calls pynetdicom's function;
3. the A-ASSOCIATE-AC: `install()` puts `send_accept` in place of pynetdicom's state machine action AE-7, which
   sends the same encoded A-ASSOCIATE-AC for an accept primitive whose request is remembered and whose fields
   (titles, application context, the very result contexts of step 2, user information values) are those of a
   previous one, and otherwise builds it as AE-7 does.

Everything else about an association (AE title, user identity, extended negotiation and association-limit checks,
the events, the roles) runs as before, per association. The objects shared between associations (the decoded
request, the negotiated presentation contexts, the encoded accept) are only read by pynetdicom after negotiation;
each association gets its own copy of the request primitive, which pynetdicom writes to on a rejection.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, cast

import pynetdicom.acse
import pynetdicom.fsm
import pynetdicom.presentation
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

if TYPE_CHECKING:
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.presentation import PresentationContext

MAX_REQUESTS = 64  # distinct requests remembered per listener process (each holds its ~130 contexts, ~0.2 MB)
MAX_REMEMBERED_BYTES = 64 * 1024  # larger requests are negotiated but not kept (dcmtk's 128 contexts: ~10 KB)
MAX_VARIANTS = 8  # negotiations (or accepts) remembered per request; one each in practice (fixed configuration)
A_ASSOCIATE_RQ_TYPE = 0x01
EVT6_REQUEST_RECEIVED = "Evt6"  # the state machine's event for a received A-ASSOCIATE-RQ (PS3.8 9.2)
ACCEPT_ACTION = "AE-7"

Negotiated = tuple[list["PresentationContext"], list[Any]]  # negotiate_as_acceptor's (contexts, role items)
Negotiate = Callable[..., Negotiated]


class Proposal(list["PresentationContext"]):
    """A remembered request's proposed presentation contexts, pointing back to the request."""

    def __init__(self, contexts: Sequence[PresentationContext], request: RememberedRequest) -> None:
        super().__init__(contexts)
        self.request = request


class RememberedRequest(A_ASSOCIATE_RQ):
    """A decoded A-ASSOCIATE-RQ shared by the associations that sent the same bytes, with what pynetdicom made of
    it: the primitive, the negotiations (per supported contexts and roles) and the encoded accepts."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.decode(encoded)
        self._lock = threading.Lock()
        self._primitive = super().to_primitive()
        self._negotiations: dict[Hashable, tuple[Negotiated, object]] = {}
        self._accepts: dict[Hashable, tuple[bytes, object]] = {}

    def to_primitive(self) -> A_ASSOCIATE:
        """A copy of the request primitive, for one association (pynetdicom sets its result on a rejection)."""
        primitive = copy.copy(self._primitive)
        # The setters would make plain lists of these, checking each item again: set what they would hold.
        primitive._presentation_context_definition_list = Proposal(
            self._primitive.presentation_context_definition_list, self
        )
        primitive._user_information = list(self._primitive.user_information)
        return primitive

    def negotiated(
        self,
        supported: Sequence[PresentationContext],
        roles: dict[Any, tuple[bool | None, bool | None]] | None,
        negotiate: Negotiate,
    ) -> Negotiated:
        """`negotiate`'s result for this request's contexts, `supported` and `roles`: made once per distinct input.
        The supported contexts are told apart by identity (the listener hands every association the same objects,
        node/gate.py) and kept with the result so that their identities stay theirs."""
        key = (tuple(map(id, supported)), tuple(sorted((roles or {}).items())))
        with self._lock:
            known = self._negotiations.get(key)
        if known is not None:
            contexts, role_items = known[0]
            return list(contexts), list(role_items)
        result = negotiate(self._primitive.presentation_context_definition_list, supported, roles)
        with self._lock:
            _bounded(self._negotiations)[key] = (result, list(supported))
        return list(result[0]), list(result[1])

    def accept(self, primitive: A_ASSOCIATE) -> bytes:
        """The encoded A-ASSOCIATE-AC for `primitive`: built once per distinct set of the fields it encodes."""
        results = primitive.presentation_context_definition_results_list
        try:
            key = (
                primitive.called_ae_title,
                primitive.calling_ae_title,
                primitive.application_context_name,
                tuple(map(id, results)),
                tuple((type(item), tuple(sorted(vars(item).items()))) for item in primitive.user_information),
            )
            hash(key)
        except TypeError:  # a user information value that cannot be compared as it is: not remembered
            return A_ASSOCIATE_AC(primitive).encode()
        with self._lock:
            known = self._accepts.get(key)
        if known is not None:
            return known[0]
        encoded = A_ASSOCIATE_AC(primitive).encode()
        with self._lock:
            _bounded(self._accepts)[key] = (encoded, list(results))  # the contexts kept: their identities stay theirs
        return encoded


def _bounded(remembered: dict[Hashable, Any]) -> dict[Hashable, Any]:
    """`remembered`, emptied when full: a configuration that made new supported contexts per association (not this
    listener's) would otherwise pin them all."""
    if len(remembered) >= MAX_VARIANTS:
        remembered.clear()
    return remembered


class RememberedAccept(A_ASSOCIATE_AC):
    """An A-ASSOCIATE-AC encoded before: what AE-7 sends in its place."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded

    def encode(self) -> bytes:
        return self.encoded


class NegotiationMemo:
    """The requests one listener process has seen, by their bytes."""

    def __init__(self, capacity: int = MAX_REQUESTS) -> None:
        self.capacity = capacity
        self._requests: OrderedDict[bytes, RememberedRequest] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # requests answered from the memo (for tests and diagnostics)

    def request(self, encoded: bytes) -> RememberedRequest:
        """The request these bytes encode, decoded once (a decoding error propagates, as pynetdicom's would)."""
        with self._lock:
            known = self._requests.get(encoded)
            if known is not None:
                self._requests.move_to_end(encoded)
                self.hits += 1
                return known
        request = RememberedRequest(encoded)
        if len(encoded) > MAX_REMEMBERED_BYTES:  # 64 of the largest the gate lets through would be hundreds of MB
            return request
        with self._lock:
            self._requests[encoded] = request
            while len(self._requests) > self.capacity:
                self._requests.popitem(last=False)
        return request

    def decode_pdu(self, dul: DULServiceProvider) -> Callable[[bytearray], tuple[Any, str]]:
        """A stand-in for `dul._decode_pdu` (one association's) that decodes an A-ASSOCIATE-RQ through the memo and
        any other PDU as before; like pynetdicom's it triggers EVT_DATA_RECV before and EVT_PDU_RECV after."""
        decode = dul._decode_pdu

        def decode_pdu(bytestream: bytearray) -> tuple[Any, str]:
            if not bytestream or bytestream[0] != A_ASSOCIATE_RQ_TYPE:
                return decode(bytestream)
            encoded = bytes(bytestream)
            evt.trigger(dul.assoc, evt.EVT_DATA_RECV, {"data": encoded})
            pdu = self.request(encoded)
            evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
            return pdu, EVT6_REQUEST_RECEIVED

        return decode_pdu


def negotiate_as_acceptor(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[Any, tuple[bool | None, bool | None]] | None = None,
) -> Negotiated:
    """pynetdicom's `negotiate_as_acceptor`, remembered per request for the contexts of a remembered request."""
    if isinstance(rq_contexts, Proposal):
        return rq_contexts.request.negotiated(ac_contexts, roles, _pynetdicom_negotiate)
    return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)


def send_accept(dul: DULServiceProvider) -> str:
    """pynetdicom's AE-7 (send the A-ASSOCIATE-AC for the accept primitive the ACSE queued, go to Sta6), with the
    encoded AC remembered per request when the association's request is a remembered one."""
    primitive = cast(A_ASSOCIATE, dul.to_provider_queue.get(False))
    proposed = dul.assoc.requestor.primitive
    contexts = proposed.presentation_context_definition_list if proposed is not None else None
    if isinstance(contexts, Proposal):
        dul._send(RememberedAccept(contexts.request.accept(primitive)))
    else:
        dul._send(A_ASSOCIATE_AC(primitive))
    return "Sta6"


_pynetdicom_negotiate: Negotiate = pynetdicom.presentation.negotiate_as_acceptor  # where ACSE imports it from
_install_lock = threading.Lock()


def install() -> None:
    """Put `negotiate_as_acceptor` and `send_accept` in pynetdicom's place (idempotent). Both behave as pynetdicom's
    for anything but a remembered request, which only associations wired with a memo have."""
    with _install_lock:
        pynetdicom.acse.negotiate_as_acceptor = negotiate_as_acceptor
        description, _, state = pynetdicom.fsm.ACTIONS[ACCEPT_ACTION]
        pynetdicom.fsm.ACTIONS[ACCEPT_ACTION] = (description, send_accept, state)
