"""The DICOM upper layer as peers meet it: what the state machine of PS3.8 says about PDUs
before an association, PDU lengths, the ARTIM timer, absurd maximum PDU sizes, and misuse
that must cost one log line, not a traceback. Raw sockets send the malformed PDUs; pynetdicom
and DCMTK are the well-behaved peers; the server is the real `pacsgrid serve`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from bench.synth import Spec, write
from pacsgrid.dicom import dimse, pdu
from tests.conftest import Server, dcmtk
from tests.test_bad_input import index_count
from tests.ul_peer import EXPLICIT, IMPLICIT, VERIFICATION, RawPeer, associate_rq, rss_kib

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(
        tmp_path_factory.mktemp("ul") / "archive",
        args=("--peer", "FINDER@127.0.0.1:9", "--peer", "GETTER@127.0.0.1:9"),
    ).start()
    yield s
    s.stop()


def echo_ok(server: Server) -> bool:
    return dcmtk("echoscu", "-aec", "PACSGRID", "127.0.0.1", server.port).returncode == 0


def a_dataset(tmp_path: Path, seed: str) -> tuple[str, bytes]:
    """(SOP Instance UID, dataset bytes in explicit VR little endian) of a new instance."""
    (path,) = write(Spec(studies=1, series=1, instances=1, size=8, seed=seed), tmp_path)
    data = path.read_bytes()
    from pacsgrid.dicomfile.part10 import split_part10

    p10 = split_part10(data)
    assert p10.transfer_syntax == EXPLICIT
    return p10.sop_instance_uid, data[p10.dataset_offset :]


@pytest.mark.slow
def test_pdata_before_the_association_request_is_aborted_not_executed(
    server: Server, tmp_path: Path
) -> None:
    """PS3.8 Sta2 + Evt10 is AA-1: A-ABORT. Today's server queued the C-STORE and ran it
    once the association was accepted."""
    sop_uid, dataset = a_dataset(tmp_path, "early-pdata")
    before = index_count(server)
    with RawPeer(server.port) as peer:
        peer.message(
            1,
            {
                dimse.AFFECTED_SOP_CLASS: CT,
                dimse.COMMAND_FIELD: dimse.C_STORE_RQ,
                dimse.MESSAGE_ID: 1,
                dimse.PRIORITY: 0,
                dimse.AFFECTED_SOP_INSTANCE: sop_uid,
            },
            dataset,
        )
        peer.send(associate_rq("EARLY", [(CT, [EXPLICIT])], 16384))
        first = peer.recv_pdu()
        assert first is not None and first.type == pdu.A_ABORT, first
        assert first.body == bytes(4)  # AA-1: service-user source, no reason
        assert peer.closed_by_server(30) or True  # it waits for our close (Sta13)
    assert index_count(server) == before
    assert echo_ok(server)


@pytest.mark.parametrize("pdu_type", [pdu.A_ASSOCIATE_RQ, 0x09], ids=["associate-rq", "unknown"])
def test_a_huge_pdu_before_association_is_refused_unread(server: Server, pdu_type: int) -> None:
    """A PDU declaring 4 GB before any association: refused from its header. Today's server
    buffered whatever came (300 MB sent raised its memory by 500 MB)."""
    assert server.proc is not None
    rss_before = rss_kib(server.proc.pid)
    chunk = b"\xab" * 65536
    sent = 0
    with RawPeer(server.port, timeout=10) as peer:
        peer.send(bytes([pdu_type, 0]) + (0xFFFFFFF0).to_bytes(4, "big"))
        answer = None
        peer.sock.settimeout(0.05)
        while sent < 64 * 2**20 and answer is None:
            try:
                peer.send(chunk)
                sent += len(chunk)
            except OSError:
                break  # the server closed: the answer is already waiting
            try:
                answer = peer.recv_pdu(0.01)
            except TimeoutError:
                pass
        if answer is None:
            answer = peer.recv_pdu(10)
        assert answer is not None and answer.type == pdu.A_ABORT, answer
    assert sent < 16 * 2**20, f"the server read {sent} bytes before refusing"
    assert rss_kib(server.proc.pid) - rss_before < 16 * 1024
    assert echo_ok(server)


@pytest.mark.slow
def test_a_silent_peer_is_closed_by_the_artim_timer(server: Server) -> None:
    """A peer that connects and dribbles bytes without completing an A-ASSOCIATE-RQ is closed
    when the ARTIM timer (10 s by default) expires. Today any byte restarted the idle timer,
    so such a connection lived for ever."""
    started = time.monotonic()
    with RawPeer(server.port) as peer:
        peer.sock.settimeout(0.5)
        closed = False
        for byte in b"\x01\x00\x00\x00\x01\x00" + bytes(200):  # 100 s at most
            try:
                peer.send(bytes([byte]))
                if peer.sock.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "the server kept a connection that never associated"
    print(f"closed after {time.monotonic() - started:.1f}s")


def test_an_absurd_maximum_pdu_size_is_rejected_at_association(server: Server) -> None:
    """A requestor accepting PDUs of 7 bytes asks for a PDU per byte of every dataset (a
    2 MB C-GET ran for minutes at a full core): rejected at association, with an
    A-ASSOCIATE-RJ (permanent, ACSE) read off the wire, and one log line saying why."""
    with RawPeer(server.port) as peer:
        peer.send(associate_rq("GETTER", [(VERIFICATION, [IMPLICIT])], 7))
        answer = peer.recv_pdu()
    tail = server.text()[-2000:]
    assert answer is not None, f"the server closed without answering; its log ends:\n{tail}"
    assert answer.type == pdu.A_ASSOCIATE_RJ, f"{answer}; the server log ends:\n{tail}"
    assert answer.body[1:3] == bytes((pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE)), answer
    assert "accepts PDUs of at most 7 bytes" in server.text()


def test_a_small_maximum_pdu_still_gets_the_exact_bytes(server: Server, tmp_path: Path) -> None:
    """At the smallest size we serve (1 KiB) a 2 MB instance comes back whole, in PDUs no
    larger than the peer accepts."""
    (path,) = write(Spec(studies=1, series=1, instances=1, size=1024, seed="smallpdu"), tmp_path)
    assert dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, path).returncode == 0
    from pydicom import dcmread

    sent = dcmread(path)
    got: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        got.append(bytes(event.request.DataSet.getvalue()))
        return 0

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [EXPLICIT])
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="PACSGRID",
        max_pdu=1024,
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = sent.StudyInstanceUID
        query.SeriesInstanceUID = sent.SeriesInstanceUID
        query.SOPInstanceUID = sent.SOPInstanceUID
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if s
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0
    (dataset,) = got
    assert dataset == path.read_bytes()[-len(dataset) :]
    assert len(dataset) > 2_000_000


def test_protocol_misuse_costs_one_warning_line(server: Server) -> None:
    """A message on a context that was not accepted, C-FIND on a Verification context, a
    message ID of 0, an AE title with a newline: each gets a DICOM answer and at most one
    log line, control characters escaped, no traceback."""
    log_before = len(server.text())
    with RawPeer(server.port) as peer:  # a message on context 99, never proposed
        assert peer.associate("MISUSE", [(VERIFICATION, [IMPLICIT])]).type == pdu.A_ASSOCIATE_AC
        peer.message(99, {dimse.AFFECTED_SOP_CLASS: VERIFICATION, dimse.COMMAND_FIELD: 0x30})
        abort = peer.recv_pdu()
        assert abort is not None and abort.type == pdu.A_ABORT
        assert abort.body[2] == pdu.ABORT_SOURCE_PROVIDER
    with RawPeer(server.port) as peer:  # C-FIND on the Verification context
        assert peer.associate("FINDER", [(VERIFICATION, [IMPLICIT])]).type == pdu.A_ASSOCIATE_AC
        identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
        peer.message(
            1,
            {
                dimse.AFFECTED_SOP_CLASS: VERIFICATION,
                dimse.COMMAND_FIELD: dimse.C_FIND_RQ,
                dimse.MESSAGE_ID: 7,
                dimse.PRIORITY: 0,
            },
            identifier,
        )
        rsp = peer.response()
        assert rsp[dimse.STATUS] == dimse.UNRECOGNIZED_OPERATION
        assert rsp[dimse.MESSAGE_ID_RESPONDED] == 7
        # a C-FIND with message ID 0 on a Q/R context is answered like any other
    with RawPeer(server.port) as peer:
        assert peer.associate("FINDER", [(STUDY_FIND, [IMPLICIT])]).type == pdu.A_ASSOCIATE_AC
        peer.message(
            1,
            {
                dimse.AFFECTED_SOP_CLASS: STUDY_FIND,
                dimse.COMMAND_FIELD: dimse.C_FIND_RQ,
                dimse.MESSAGE_ID: 0,
                dimse.PRIORITY: 0,
            },
            identifier,
        )
        while (rsp := peer.response())[dimse.STATUS] == dimse.PENDING:
            pass
        assert rsp[dimse.STATUS] == dimse.SUCCESS and rsp[dimse.MESSAGE_ID_RESPONDED] == 0
        peer.send(pdu.RELEASE_RQ)
        assert peer.recv_pdu().type == pdu.A_RELEASE_RP  # type: ignore[union-attr]
    with RawPeer(server.port) as peer:  # an AE title with a newline and an escape
        assert peer.associate("EVIL\nAE\x1b[2J").type == pdu.A_ASSOCIATE_AC
        peer.send(pdu.RELEASE_RQ)
        assert peer.recv_pdu().type == pdu.A_RELEASE_RP  # type: ignore[union-attr]
        assert peer.closed_by_server(0.1) or True
    assert echo_ok(server)
    deadline = time.monotonic() + 30
    while "EVIL" not in server.text()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.text()[log_before:]
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "\x1b" not in log
    assert "EVIL\\x0aAE\\x1b[2J@127.0.0.1" in log
    assert not any(line.startswith("AE") for line in log.splitlines())
    assert log.count("which was not accepted") == 1
    assert log.count("C-FIND-RQ on presentation context 1") == 1
