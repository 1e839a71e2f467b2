"""The upper layer state machine against PS3.8 table 9-10, cell by cell, and the PDUs its
actions send against golden bytes (and against pynetdicom's decoder, an independent one).

The grid below is table 9-10 as the standard prints it (rows: events, columns: states; '.' an
empty cell), written here from the standard, not from the module under test. Every one of the
19 x 13 pairs is driven from its state; each filled cell must run its action, reach the next
state tables 9-6 to 9-9 give, and do what the action says (send which PDU, start or stop the
ARTIM timer, close the connection, indicate what); each empty cell must be refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pacsgrid.dicom import pdu
from pacsgrid.dicom.fsm import (
    TABLE,
    Abort,
    Action,
    Event,
    Indication,
    InvalidEvent,
    State,
    StateMachine,
    Violation,
)

#        Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
GRID = """
Evt1     AE-1  .     .     .     .     .     .     .     .     .     .     .     .
Evt2     .     .     .     AE-2  .     .     .     .     .     .     .     .     .
Evt3     .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt4     .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt5     AE-5  .     .     .     .     .     .     .     .     .     .     .     .
Evt6     .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
Evt7     .     .     AE-7  .     .     .     .     .     .     .     .     .     .
Evt8     .     .     AE-8  .     .     .     .     .     .     .     .     .     .
Evt9     .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .
Evt10    .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt11    .     .     .     .     .     AR-1  .     .     .     .     .     .     .
Evt12    .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt13    .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6
Evt14    .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .
Evt15    .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .
Evt16    .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2
Evt17    .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5
Evt18    .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2
Evt19    .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
"""

# Tables 9-6 to 9-9: the state each action leads to (AE-6 and AR-8 depend, see below).
NEXT = {
    "AE-1": 4, "AE-2": 5, "AE-3": 6, "AE-4": 1, "AE-5": 2, "AE-7": 6, "AE-8": 13,
    "DT-1": 6, "DT-2": 6,
    "AR-1": 7, "AR-2": 8, "AR-3": 1, "AR-4": 13, "AR-5": 1, "AR-6": 7, "AR-7": 8,
    "AR-9": 11, "AR-10": 12,
    "AA-1": 13, "AA-2": 1, "AA-3": 1, "AA-4": 1, "AA-5": 1, "AA-6": 13, "AA-7": 13, "AA-8": 13,
}  # fmt: skip

# Golden PDUs (PS3.8 9.3): type, reserved, length (4 bytes, big endian), body.
ABORT_USER = bytes.fromhex("07 00 00000004 00 00 00 00")
ABORT_PROVIDER_UNEXPECTED = bytes.fromhex("07 00 00000004 00 00 02 02")
ABORT_PROVIDER_NO_REASON = bytes.fromhex("07 00 00000004 00 00 02 00")
RELEASE_RQ = bytes.fromhex("05 00 00000004 00000000")
RELEASE_RP = bytes.fromhex("06 00 00000004 00000000")
RJ_CALLING_AE = bytes.fromhex("03 00 00000004 00 01 01 03")  # permanent, user, calling AE
RJ_LOCAL_LIMIT = bytes.fromhex("03 00 00000004 00 02 03 02")  # transient, presentation


def cells() -> dict[tuple[int, int], str]:
    out = {}
    for line in GRID.strip().splitlines():
        name, *row = line.split()
        assert len(row) == 13, line
        for state, cell in enumerate(row, 1):
            if cell != ".":
                out[(int(name[3:]), state)] = cell
    return out


@dataclass
class Timer:
    """What `call_later` returns, for the machine's ARTIM timer."""

    delay: float
    callback: Any
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Recorder:
    """The machine's provider: records what the actions ask for."""

    refuse: pdu.AssociateRJ | None = None
    sent: list[bytes] = field(default_factory=list)
    pdata: list[Any] = field(default_factory=list)
    indications: list[tuple[Indication, Any]] = field(default_factory=list)
    closed: int = 0
    opened: int = 0
    expired: list[State] = field(default_factory=list)

    def send_pdu(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def send_pdata(self, message: Any) -> None:
        self.pdata.append(message)

    def close_transport(self) -> None:
        self.closed += 1

    def open_transport(self) -> None:
        self.opened += 1

    def provider_rejection(self, rq: pdu.AssociateRQ) -> pdu.AssociateRJ | None:
        return self.refuse

    def indicate(self, what: Indication, payload: Any) -> None:
        self.indications.append((what, payload))

    def artim_expired(self, state: State) -> None:
        self.expired.append(state)


def machine(
    state: int, *, requestor: bool = False, refuse: bool = False
) -> tuple[StateMachine, Recorder, list[Timer]]:
    rec = Recorder(
        refuse=pdu.AssociateRJ(pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, 2) if refuse else None
    )
    timers: list[Timer] = []

    def schedule(delay: float, callback: Any) -> Timer:
        timers.append(Timer(delay, callback))
        return timers[-1]

    fsm = StateMachine(rec, requestor=requestor, artim=7.5, schedule=schedule)  # type: ignore[arg-type]
    fsm.state = State(state)
    return fsm, rec, timers


RQ = pdu.AssociateRQ(
    "ANY-SCP",
    "ECHOSCU",
    [pdu.PresentationContext(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
    16384,
    "1.2.3",
)
AC = pdu.AssociateAC("ANY-SCP", "ECHOSCU", [pdu.PresentationContext(1, "", ["1.2.840.10008.1.2"])])
RJ = pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_CALLING_AE_NOT_RECOGNIZED)
PAYLOAD: dict[int, Any] = {
    2: RQ,
    3: AC,
    4: RJ,
    6: RQ,
    7: AC,
    8: RJ,
    9: (1, b"command", None),
    10: [(1, 3, memoryview(b"x"))],
    16: Abort(0, 0),
    19: Violation(pdu.ABORT_UNRECOGNIZED_PDU, "unrecognized PDU type 0x47"),
}

ALL = [(e, s) for e in range(1, 20) for s in range(1, 14)]


@pytest.mark.parametrize(("event", "state"), ALL, ids=[f"Evt{e}-Sta{s}" for e, s in ALL])
def test_every_cell_of_table_9_10(event: int, state: int) -> None:
    expected = cells().get((event, state))
    actual = TABLE.get((State(state), Event(event)))
    assert (actual.value if actual else None) == expected
    fsm, rec, timers = machine(state)
    if expected is None:
        with pytest.raises(InvalidEvent):
            fsm.handle(Event(event), PAYLOAD.get(event))
        assert fsm.state == state and not rec.sent and not rec.closed and not timers
        return
    if state in (2, 13):
        fsm._artim_start()  # these states are entered with the timer running
    running = list(timers)
    action = fsm.handle(Event(event), PAYLOAD.get(event))
    assert action.value == expected
    if expected not in ("AE-6", "AR-8"):
        assert fsm.state == NEXT[expected]
    check_effects(expected, event, fsm, rec, timers, running)


def check_effects(
    action: str,
    event: int,
    fsm: StateMachine,
    rec: Recorder,
    timers: list[Timer],
    running: list[Timer],
) -> None:
    started = [t for t in timers if t not in running]
    stopped = all(t.cancelled for t in running)
    kinds = [what for what, _ in rec.indications]
    if action == "AA-1":
        assert rec.sent == [ABORT_USER]
        assert len(started) == 1 and started[0].delay == 7.5 and stopped
        assert not rec.closed and not kinds
    elif action == "AA-2":
        assert stopped and not started and rec.closed == 1 and not rec.sent and not kinds
    elif action == "AA-3":
        assert rec.closed == 1 and kinds == [Indication.ABORT] and not rec.sent
    elif action == "AA-4":
        assert kinds == [Indication.P_ABORT] and not rec.sent and not rec.closed
    elif action == "AA-5":
        assert stopped and not rec.closed and not rec.sent and not kinds
    elif action == "AA-6":
        assert not rec.sent and not rec.closed and not kinds and not started
    elif action == "AA-7":
        assert rec.sent == [ABORT_PROVIDER_NO_REASON] and not rec.closed and not kinds
    elif action == "AA-8":
        golden = (
            bytes.fromhex("07 00 00000004 00 00 02 01")  # the Violation's reason
            if event == 19
            else ABORT_PROVIDER_UNEXPECTED
        )
        assert rec.sent == [golden] and kinds == [Indication.P_ABORT]
        assert len(started) == 1 and not rec.closed
    elif action == "AE-1":
        assert rec.opened == 1 and not rec.sent
    elif action == "AE-2":
        assert rec.sent == [pdu.encode_associate_rq(RQ)]
    elif action == "AE-3":
        assert kinds == [Indication.ACCEPTED] and not rec.sent
    elif action == "AE-4":
        assert kinds == [Indication.REJECTED] and rec.closed == 1
    elif action == "AE-5":
        assert len(started) == 1 and started[0].delay == 7.5 and not rec.sent
    elif action == "AE-6":
        assert stopped and kinds == [Indication.ASSOCIATE] and fsm.state == State.STA3
        assert not fsm.artim_running
    elif action == "AE-7":
        assert rec.sent == [pdu.encode_associate_ac(AC)] and not started
    elif action == "AE-8":
        assert rec.sent == [RJ_CALLING_AE] and len(started) == 1 and not rec.closed
    elif action in ("DT-1", "AR-7"):
        assert rec.pdata == [PAYLOAD[9]] and not rec.sent
    elif action in ("DT-2", "AR-6"):
        assert kinds == [Indication.P_DATA] and not rec.sent
    elif action == "AR-1":
        assert rec.sent == [RELEASE_RQ]
    elif action == "AR-2":
        assert kinds == [Indication.RELEASE] and not rec.sent
    elif action == "AR-3":
        assert kinds == [Indication.RELEASED] and rec.closed == 1
    elif action == "AR-4":
        assert rec.sent == [RELEASE_RP] and len(started) == 1 and not rec.closed
    elif action == "AR-5":
        assert stopped and not rec.closed and not rec.sent
    elif action == "AR-8":
        assert kinds == [Indication.RELEASE_COLLISION] and fsm.state == State.STA10
    elif action == "AR-9":
        assert rec.sent == [RELEASE_RP]
    elif action == "AR-10":
        assert kinds == [Indication.RELEASED] and not rec.closed
    else:
        raise AssertionError(f"no check for {action}")


def test_ae6_rejects_what_the_provider_cannot_take() -> None:
    fsm, rec, timers = machine(2, refuse=True)
    fsm._artim_start()
    assert fsm.handle(Event.EVT6, RQ) == Action.AE_6
    assert fsm.state == State.STA13
    assert rec.sent == [RJ_LOCAL_LIMIT] and not rec.indications
    assert timers[0].cancelled and not timers[1].cancelled  # ARTIM stopped, then started again


def test_release_collision_goes_to_sta9_on_the_requestor() -> None:
    fsm, _, _ = machine(7, requestor=True)
    assert fsm.handle(Event.EVT12) == Action.AR_8
    assert fsm.state == State.STA9
    # the requestor answers (Evt14), then awaits the peer's A-RELEASE-RP
    assert fsm.handle(Event.EVT14) == Action.AR_9 and fsm.state == State.STA11
    assert fsm.handle(Event.EVT13) == Action.AR_3 and fsm.state == State.STA1


def test_artim_expiry_fires_evt18_only_where_it_runs() -> None:
    fsm, rec, timers = machine(1)
    fsm.handle(Event.EVT5)  # AE-5: Sta2, timer started
    timers[-1].callback()
    assert rec.expired == [State.STA2] and fsm.state == State.STA1 and rec.closed == 1


def test_indications_see_the_new_state() -> None:
    """A user that answers inside the indication meets the state the standard gives."""
    seen: list[State] = []
    fsm, rec, _ = machine(2)

    def answer(what: Indication, payload: Any) -> None:
        seen.append(fsm.state)
        fsm.handle(Event.EVT7, AC)

    rec.indicate = answer  # type: ignore[method-assign]
    fsm.handle(Event.EVT6, RQ)
    assert seen == [State.STA3] and fsm.state == State.STA6


def test_golden_associate_rq_and_pynetdicom_reads_it() -> None:
    raw = pdu.encode_associate_rq(RQ)
    golden = bytes.fromhex(
        "01 00 000000a4"
        "0001 0000" + b"ANY-SCP         ".hex() + b"ECHOSCU         ".hex() + "00" * 32 +
        "10 00 0015" + b"1.2.840.10008.3.1.1.1".hex() +
        "20 00 002e 01 00 00 00"
        "30 00 0011" + b"1.2.840.10008.1.1".hex() +
        "40 00 0011" + b"1.2.840.10008.1.2".hex() +
        "50 00 0011 51 00 0004 00004000 52 00 0005" + b"1.2.3".hex()
    )  # fmt: skip
    assert raw == golden
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert theirs.called_ae_title == "ANY-SCP" and theirs.calling_ae_title == "ECHOSCU"
    (ctx,) = theirs.presentation_context
    assert (ctx.context_id, ctx.abstract_syntax, ctx.transfer_syntax) == (
        1,
        "1.2.840.10008.1.1",
        ["1.2.840.10008.1.2"],
    )


@pytest.mark.parametrize(
    ("ours", "golden"),
    [
        (pdu.encode_abort(), ABORT_USER),
        (
            pdu.encode_abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_UNEXPECTED_PDU),
            ABORT_PROVIDER_UNEXPECTED,
        ),
        (pdu.RELEASE_RQ, RELEASE_RQ),
        (pdu.RELEASE_RP, RELEASE_RP),
        (pdu.encode_associate_rj(RJ), RJ_CALLING_AE),
    ],
)
def test_golden_short_pdus(ours: bytes, golden: bytes) -> None:
    assert ours == golden
    from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ

    theirs = {7: A_ABORT_RQ, 5: A_RELEASE_RQ, 6: A_RELEASE_RP, 3: A_ASSOCIATE_RJ}[golden[0]]()
    theirs.decode(golden)
    assert theirs.encode() == golden
