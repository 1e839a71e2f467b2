"""The DICOM upper layer state machine (PS3.8 section 9.2): states, events, actions, ARTIM.

Every association, on either side, is driven by one `StateMachine`. The transport (TCP bytes
framed into PDUs) and the service user (negotiation, DIMSE) only report *events* to it; what
happens next is looked up in `TABLE`, the state transition table of PS3.8 (table 9-10), and
carried out by the *action* of that cell (tables 9-6 to 9-9): send a PDU, start or stop the
ARTIM timer, close the transport connection, or hand a primitive to the service user. A pair
that the table leaves empty is a local programming error (`InvalidEvent`), never something a
peer can cause: every PDU a peer can send has a cell in every state that can receive it.

The machine does no I/O itself: its `Provider` (the association) sends bytes, closes the
connection and receives the indications. Indications are delivered after the new state is set,
so a service user that answers at once (an A-ASSOCIATE response to the indication, say) meets
the machine in the state the standard says it is in.

The ARTIM timer (association request/reject/release timer) bounds the two states in which the
standard waits on the peer without an association: Sta2, a new connection that has not yet
sent its A-ASSOCIATE-RQ, and Sta13, after an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT, waiting
for the peer to close. Bytes arriving do not restart it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pacsgrid.dicom import pdu


class State(enum.IntEnum):
    """PS3.8 table 9-1 (the thirteen states)."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU
    STA6 = 6  # Association established and ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision requestor side: awaiting A-RELEASE response
    STA10 = 10  # Release collision acceptor side: awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side: awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side: awaiting A-RELEASE response primitive
    STA13 = 13  # Awaiting transport connection close indication

    def __str__(self) -> str:
        return f"Sta{self.value}"


class Event(enum.IntEnum):
    """PS3.8 table 9-9 (the nineteen events)."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT2 = 2  # Transport connect confirmation (local transport service)
    EVT3 = 3  # A-ASSOCIATE-AC PDU received
    EVT4 = 4  # A-ASSOCIATE-RJ PDU received
    EVT5 = 5  # Transport connection indication (local transport service)
    EVT6 = 6  # A-ASSOCIATE-RQ PDU received
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU received
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU received
    EVT13 = 13  # A-RELEASE-RP PDU received
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU received
    EVT17 = 17  # Transport connection closed indication
    EVT18 = 18  # ARTIM timer expired
    EVT19 = 19  # Unrecognized or invalid PDU received

    def __str__(self) -> str:
        return f"Evt{self.value}"


class Action(enum.Enum):
    """PS3.8 tables 9-6 to 9-9: what each cell of the transition table does."""

    AE_1 = "AE-1"  # ask the transport to connect -> Sta4
    AE_2 = "AE-2"  # send A-ASSOCIATE-RQ PDU -> Sta5
    AE_3 = "AE-3"  # give the user A-ASSOCIATE confirmation (accept) primitive -> Sta6
    AE_4 = "AE-4"  # give the user A-ASSOCIATE confirmation (reject), close transport -> Sta1
    AE_5 = "AE-5"  # accept the transport connection, start ARTIM -> Sta2
    AE_6 = "AE-6"  # stop ARTIM; acceptable: A-ASSOCIATE indication -> Sta3,
    #                otherwise send A-ASSOCIATE-RJ, start ARTIM -> Sta13
    AE_7 = "AE-7"  # send A-ASSOCIATE-AC PDU -> Sta6
    AE_8 = "AE-8"  # send A-ASSOCIATE-RJ PDU, start ARTIM -> Sta13
    DT_1 = "DT-1"  # send P-DATA-TF PDU -> Sta6
    DT_2 = "DT-2"  # give the user P-DATA indication -> Sta6
    AR_1 = "AR-1"  # send A-RELEASE-RQ PDU -> Sta7
    AR_2 = "AR-2"  # give the user A-RELEASE indication -> Sta8
    AR_3 = "AR-3"  # give the user A-RELEASE confirmation, close transport -> Sta1
    AR_4 = "AR-4"  # send A-RELEASE-RP PDU, start ARTIM -> Sta13
    AR_5 = "AR-5"  # stop ARTIM -> Sta1
    AR_6 = "AR-6"  # give the user P-DATA indication -> Sta7
    AR_7 = "AR-7"  # send P-DATA-TF PDU -> Sta8
    AR_8 = "AR-8"  # give the user A-RELEASE indication (collision) -> Sta9 or Sta10
    AR_9 = "AR-9"  # send A-RELEASE-RP PDU -> Sta11
    AR_10 = "AR-10"  # give the user A-RELEASE confirmation -> Sta12
    AA_1 = "AA-1"  # send A-ABORT PDU (service-user source), (re)start ARTIM -> Sta13
    AA_2 = "AA-2"  # stop ARTIM, close transport -> Sta1
    AA_3 = "AA-3"  # give the user A-ABORT (or A-P-ABORT) indication, close transport -> Sta1
    AA_4 = "AA-4"  # give the user A-P-ABORT indication -> Sta1
    AA_5 = "AA-5"  # stop ARTIM -> Sta1
    AA_6 = "AA-6"  # ignore PDU -> Sta13
    AA_7 = "AA-7"  # send A-ABORT PDU -> Sta13
    AA_8 = "AA-8"  # send A-ABORT PDU (service-provider source), A-P-ABORT indication,
    #                start ARTIM -> Sta13


S, E, A = State, Event, Action
_ASSOCIATED = (S.STA6, S.STA7, S.STA8, S.STA9, S.STA10, S.STA11, S.STA12)
_AFTER_REQUEST = (S.STA3, S.STA5, *_ASSOCIATED)  # every state after an A-ASSOCIATE-RQ


def _table() -> dict[tuple[State, Event], Action]:
    """Table 9-10, row by row (each row one event; cells not listed are empty)."""
    t: dict[tuple[State, Event], Action] = {
        (S.STA1, E.EVT1): A.AE_1,
        (S.STA4, E.EVT2): A.AE_2,
        (S.STA1, E.EVT5): A.AE_5,
        (S.STA2, E.EVT6): A.AE_6,
        (S.STA3, E.EVT7): A.AE_7,
        (S.STA3, E.EVT8): A.AE_8,
        (S.STA6, E.EVT9): A.DT_1,
        (S.STA8, E.EVT9): A.AR_7,
        (S.STA6, E.EVT11): A.AR_1,
        (S.STA8, E.EVT14): A.AR_4,
        (S.STA9, E.EVT14): A.AR_9,
        (S.STA12, E.EVT14): A.AR_4,
        (S.STA4, E.EVT15): A.AA_2,
        (S.STA2, E.EVT16): A.AA_2,
        (S.STA13, E.EVT16): A.AA_2,
        (S.STA2, E.EVT17): A.AA_5,
        (S.STA4, E.EVT17): A.AA_4,
        (S.STA13, E.EVT17): A.AR_5,
        (S.STA2, E.EVT18): A.AA_2,
        (S.STA13, E.EVT18): A.AA_2,
    }
    # PDUs received: in Sta2 anything but an A-ASSOCIATE-RQ is answered with A-ABORT (AA-1);
    # in the states after a request, an unexpected PDU is a provider abort (AA-8); in Sta13
    # PDUs are ignored (AA-6), a new A-ASSOCIATE-RQ or an invalid PDU answered with A-ABORT.
    for event in (E.EVT3, E.EVT4, E.EVT10, E.EVT12, E.EVT13, E.EVT19):
        t[(S.STA2, event)] = A.AA_1
    for event in (E.EVT3, E.EVT4, E.EVT6, E.EVT10, E.EVT12, E.EVT13, E.EVT19):
        for state in _AFTER_REQUEST:
            t[(state, event)] = A.AA_8
        t[(S.STA13, event)] = A.AA_6
    t[(S.STA13, E.EVT6)] = A.AA_7
    t[(S.STA13, E.EVT19)] = A.AA_7
    t[(S.STA5, E.EVT3)] = A.AE_3
    t[(S.STA5, E.EVT4)] = A.AE_4
    t[(S.STA6, E.EVT10)] = A.DT_2
    t[(S.STA7, E.EVT10)] = A.AR_6
    t[(S.STA6, E.EVT12)] = A.AR_2
    t[(S.STA7, E.EVT12)] = A.AR_8
    t[(S.STA7, E.EVT13)] = A.AR_3
    t[(S.STA10, E.EVT13)] = A.AR_10
    t[(S.STA11, E.EVT13)] = A.AR_3
    for state in _AFTER_REQUEST:
        t[(state, E.EVT15)] = A.AA_1
        t[(state, E.EVT16)] = A.AA_3
        t[(state, E.EVT17)] = A.AA_4
    return t


TABLE: dict[tuple[State, Event], Action] = _table()

# The actions that read the PDU of their event; for every other cell the PDU's header is
# enough (it is ignored, or answered with an abort), so its body need not be received whole.
READS_PDU = frozenset({A.AE_3, A.AE_4, A.AE_6, A.DT_2, A.AR_6, A.AA_3})


class Indication(enum.Enum):
    """Primitives the machine hands to the service user (PS3.8 section 7)."""

    ASSOCIATE = "A-ASSOCIATE indication"  # payload: AssociateRQ
    ACCEPTED = "A-ASSOCIATE confirmation (accept)"  # payload: AssociateAC
    REJECTED = "A-ASSOCIATE confirmation (reject)"  # payload: AssociateRJ
    P_DATA = "P-DATA indication"  # payload: list of PDVs
    RELEASE = "A-RELEASE indication"
    RELEASE_COLLISION = "A-RELEASE indication (collision)"
    RELEASED = "A-RELEASE confirmation"
    ABORT = "A-ABORT indication"  # payload: the peer's Abort
    P_ABORT = "A-P-ABORT indication"  # payload: a text saying why


@dataclass(frozen=True)
class Abort:
    """An A-ABORT: what a local abort request asks for (Evt15) or a received one said (Evt16)."""

    source: int = pdu.ABORT_SOURCE_USER
    reason: int = 0


@dataclass(frozen=True)
class Violation:
    """Why a PDU is invalid (Evt19, or an unexpected PDU): the A-ABORT reason code of
    PS3.8 9.3.8 and a text for the log."""

    reason: int
    text: str


class InvalidEvent(Exception):
    """An event the table has no cell for in the current state: a bug in the caller."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"{event} is not valid in {state}")
        self.state = state
        self.event = event


class Provider(Protocol):
    """What the actions act on: the association's transport and its service user."""

    def send_pdu(self, data: bytes) -> None: ...

    def send_pdata(self, message: Any) -> None: ...

    def close_transport(self) -> None: ...

    def open_transport(self) -> None: ...

    def provider_rejection(self, rq: pdu.AssociateRQ) -> pdu.AssociateRJ | None: ...

    def indicate(self, what: Indication, payload: Any) -> None: ...

    def artim_expired(self, state: State) -> None: ...


Schedule = Callable[[float, Callable[[], None]], "asyncio.TimerHandle"]


class StateMachine:
    """One association's upper layer state. `handle(event, payload)` runs the table's action
    and returns it; `artim` is the ARTIM timeout in seconds; `schedule` starts a timer
    (the event loop's `call_later`)."""

    def __init__(
        self,
        provider: Provider,
        *,
        requestor: bool,
        artim: float,
        schedule: Schedule | None = None,
    ) -> None:
        self.provider = provider
        self.requestor = requestor
        self.state = State.STA1
        self.artim = artim
        self._schedule = schedule
        self._artim_handle: asyncio.TimerHandle | None = None
        self._pending: list[tuple[Indication, Any]] = []

    # ------------------------------------------------------------------ driving
    def action_for(self, event: Event) -> Action | None:
        """The action `event` would cause now (None: an empty cell)."""
        return TABLE.get((self.state, event))

    def handle(self, event: Event, payload: Any = None) -> Action:
        action = TABLE.get((self.state, event))
        if action is None:
            raise InvalidEvent(self.state, event)
        self.state = _RUN[action](self, payload)
        while self._pending:  # after the state is set: the user may answer at once
            what, value = self._pending.pop(0)
            self.provider.indicate(what, value)
        return action

    @property
    def artim_running(self) -> bool:
        return self._artim_handle is not None

    # ------------------------------------------------------------------ ARTIM
    def _artim_start(self) -> None:
        self._artim_stop()
        schedule = self._schedule or asyncio.get_running_loop().call_later
        self._artim_handle = schedule(self.artim, self._artim_expired)

    def _artim_stop(self) -> None:
        if self._artim_handle is not None:
            self._artim_handle.cancel()
            self._artim_handle = None

    def _artim_expired(self) -> None:
        self._artim_handle = None
        if (self.state, Event.EVT18) in TABLE:
            self.provider.artim_expired(self.state)
            self.handle(Event.EVT18)

    def _indicate(self, what: Indication, payload: Any = None) -> None:
        self._pending.append((what, payload))

    # ------------------------------------------------------------------ actions
    def _ae_1(self, _: Any) -> State:
        self.provider.open_transport()
        return State.STA4

    def _ae_2(self, rq: pdu.AssociateRQ) -> State:
        self.provider.send_pdu(pdu.encode_associate_rq(rq))
        return State.STA5

    def _ae_3(self, ac: pdu.AssociateAC) -> State:
        self._indicate(Indication.ACCEPTED, ac)
        return State.STA6

    def _ae_4(self, rj: pdu.AssociateRJ) -> State:
        self._indicate(Indication.REJECTED, rj)
        self.provider.close_transport()
        return State.STA1

    def _ae_5(self, _: Any) -> State:
        self._artim_start()
        return State.STA2

    def _ae_6(self, rq: pdu.AssociateRQ) -> State:
        self._artim_stop()
        rj = self.provider.provider_rejection(rq)
        if rj is None:
            self._indicate(Indication.ASSOCIATE, rq)
            return State.STA3
        self.provider.send_pdu(pdu.encode_associate_rj(rj))
        self._artim_start()
        return State.STA13

    def _ae_7(self, ac: pdu.AssociateAC) -> State:
        self.provider.send_pdu(pdu.encode_associate_ac(ac))
        return State.STA6

    def _ae_8(self, rj: pdu.AssociateRJ) -> State:
        self.provider.send_pdu(pdu.encode_associate_rj(rj))
        self._artim_start()
        return State.STA13

    def _dt_1(self, message: Any) -> State:
        self.provider.send_pdata(message)
        return State.STA6

    def _dt_2(self, pdvs: Any) -> State:
        self._indicate(Indication.P_DATA, pdvs)
        return State.STA6

    def _ar_1(self, _: Any) -> State:
        self.provider.send_pdu(pdu.RELEASE_RQ)
        return State.STA7

    def _ar_2(self, _: Any) -> State:
        self._indicate(Indication.RELEASE)
        return State.STA8

    def _ar_3(self, _: Any) -> State:
        self._indicate(Indication.RELEASED)
        self.provider.close_transport()
        return State.STA1

    def _ar_4(self, _: Any) -> State:
        self.provider.send_pdu(pdu.RELEASE_RP)
        self._artim_start()
        return State.STA13

    def _ar_5(self, _: Any) -> State:
        self._artim_stop()
        return State.STA1

    def _ar_6(self, pdvs: Any) -> State:
        self._indicate(Indication.P_DATA, pdvs)
        return State.STA7

    def _ar_7(self, message: Any) -> State:
        self.provider.send_pdata(message)
        return State.STA8

    def _ar_8(self, _: Any) -> State:
        self._indicate(Indication.RELEASE_COLLISION)
        return State.STA9 if self.requestor else State.STA10

    def _ar_9(self, _: Any) -> State:
        self.provider.send_pdu(pdu.RELEASE_RP)
        return State.STA11

    def _ar_10(self, _: Any) -> State:
        self._indicate(Indication.RELEASED)
        return State.STA12

    def _aa_1(self, payload: Any) -> State:
        abort = payload if isinstance(payload, Abort) else Abort()
        self.provider.send_pdu(pdu.encode_abort(abort.source, abort.reason))
        self._artim_start()
        return State.STA13

    def _aa_2(self, _: Any) -> State:
        self._artim_stop()
        self.provider.close_transport()
        return State.STA1

    def _aa_3(self, abort: Abort) -> State:
        if abort.source == pdu.ABORT_SOURCE_PROVIDER:
            why = f"the peer's provider aborted (reason {abort.reason})"
            self._indicate(Indication.P_ABORT, why)
        else:
            self._indicate(Indication.ABORT, abort)
        self.provider.close_transport()
        return State.STA1

    def _aa_4(self, _: Any) -> State:
        self._indicate(Indication.P_ABORT, "the connection was closed")
        return State.STA1

    def _aa_5(self, _: Any) -> State:
        self._artim_stop()
        return State.STA1

    def _aa_6(self, _: Any) -> State:
        return State.STA13

    def _aa_7(self, _: Any) -> State:
        self.provider.send_pdu(pdu.encode_abort(pdu.ABORT_SOURCE_PROVIDER, 0))
        return State.STA13

    def _aa_8(self, payload: Any) -> State:
        why = payload if isinstance(payload, Violation) else _UNEXPECTED
        self.provider.send_pdu(pdu.encode_abort(pdu.ABORT_SOURCE_PROVIDER, why.reason))
        self._indicate(Indication.P_ABORT, why.text)
        self._artim_start()
        return State.STA13


_UNEXPECTED = Violation(pdu.ABORT_UNEXPECTED_PDU, "unexpected PDU")

_RUN: dict[Action, Callable[[StateMachine, Any], State]] = {
    action: getattr(StateMachine, "_" + action.name.lower()) for action in Action
}
