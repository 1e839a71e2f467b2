"""C-CANCEL of a C-MOVE in progress: retrieve reads one instance ahead, and a cancel must
still stop the sub-operations, answer Cancel with honest counters, and leave the association
and the server ready for the next request."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from bench.synth import Spec, studies, write
from tests.conftest import Server, free_port, pacsgrid_cli

INSTANCES = 40
CANCEL = 0xFE00


@pytest.mark.slow
def test_cancel_a_move_then_move_again(tmp_path: Path) -> None:
    spec = Spec(studies=1, series=1, instances=INSTANCES, size=64, seed="cancel")
    files = write(spec, tmp_path)
    dest_port = free_port()
    server = Server(tmp_path / "archive", args=("--peer", f"SLOWSCP@127.0.0.1:{dest_port}"))
    server.start()
    received: list[str] = []
    lock = threading.Lock()
    # The receiver holds every store after the third until the test has sent its C-CANCEL,
    # so the cancel always arrives while the move is under way.
    cancel_sent = threading.Event()

    def on_store(event: evt.Event) -> int:
        with lock:
            hold = len(received) >= 3
        if hold and not cancel_sent.wait(120):
            return 0xA700  # the test never cancelled: let the move fail loudly
        with lock:
            received.append(event.request.AffectedSOPInstanceUID)
        return 0

    scp = AE(ae_title="SLOWSCP")
    scp.add_supported_context(CTImageStorage)
    receiver = scp.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        imported = pacsgrid_cli("import", "--data-dir", server.data_dir, *files, timeout=120)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        study = Dataset()
        study.QueryRetrieveLevel = "STUDY"
        study.StudyInstanceUID = next(studies(spec)).study_uid

        ae = AE(ae_title="SLOWSCP")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSGRID")
        assert assoc.is_established
        try:
            context = assoc._get_valid_context(
                StudyRootQueryRetrieveInformationModelMove, "", "scu"
            )
            statuses = []
            for status, _ in assoc.send_c_move(
                study, "SLOWSCP", StudyRootQueryRetrieveInformationModelMove, msg_id=7
            ):
                statuses.append(status)
                if len(statuses) == 3:
                    assoc.send_c_cancel(7, context.context_id)
                    cancel_sent.set()
            final = statuses[-1]
            assert final.Status == CANCEL, final
            completed = int(final.get("NumberOfCompletedSuboperations", 0))
            remaining = int(final.get("NumberOfRemainingSuboperations", 0))
            # Three were acknowledged before the cancel; the one held at that moment (and at
            # most the one read ahead) may still complete, nothing after them.
            assert 3 <= completed <= 5, final
            assert completed + remaining == INSTANCES
            with lock:
                assert len(received) == completed

            # The same association, the whole study: everything arrives.
            with lock:
                received.clear()
            final = None
            for status, _ in assoc.send_c_move(
                study, "SLOWSCP", StudyRootQueryRetrieveInformationModelMove, msg_id=8
            ):
                final = status
            assert final is not None and final.Status == 0, final
            with lock:
                assert len(set(received)) == INSTANCES
        finally:
            assoc.release()
        assert server.proc.poll() is None
    finally:
        receiver.shutdown()
        server.stop()
