"""C-CANCEL of a C-MOVE in progress: retrieve reads one instance ahead, and a cancel must
still stop the sub-operations, answer Cancel with honest counters, and leave the association
and the server ready for the next request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from bench.synth import Spec, studies, write
from tests.conftest import Server, free_port, pacsgrid_cli

INSTANCES = 40
CANCEL = 0xFE00


def test_cancel_a_move_then_move_again(tmp_path: Path) -> None:
    spec = Spec(studies=1, series=1, instances=INSTANCES, size=64, seed="cancel")
    files = write(spec, tmp_path)
    dest_port = free_port()
    server = Server(tmp_path / "archive", args=("--peer", f"SLOWSCP@127.0.0.1:{dest_port}"))
    server.start()
    received: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        time.sleep(0.05)  # a slow receiver, so that the cancel arrives mid-way
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
            final = statuses[-1]
            assert final.Status == CANCEL, final
            completed = int(final.get("NumberOfCompletedSuboperations", 0))
            remaining = int(final.get("NumberOfRemainingSuboperations", 0))
            assert 3 <= completed < INSTANCES
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
