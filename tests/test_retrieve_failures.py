"""Retrieve sub-operations that cannot be done are reported, never dropped (docs/dicom.md,
"Services"): final status B000 when some were sent, A702 when none could be, each with the
FailedSOPInstanceUIDList naming exactly the instances that were not sent; and every C-MOVE and
C-GET is in the audit log, which never holds a patient identifier.

The receivers are pynetdicom storage SCPs that accept CT Image Storage only, so the MR
instances of a study cannot be sent to them (no presentation context for their SOP class).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
)

from tests.conftest import Server, free_port, pacsgrid_cli
from tests.senders import c_get, c_move
from tests.synthetic import uid
from tests.web_helpers import audit_records

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
PATIENT_ID, PATIENT_NAME = "PID-RETRIEVE-0042", "Quixote^Alonso"
SUCCESS, B000, A702 = 0x0000, 0xB000, 0xA702


@dataclass
class Study:
    uid: str
    ct: set[str]
    mr: set[str]


def write_study(out: Path, name: str, n_ct: int, n_mr: int) -> Study:
    """A study of small CT and MR images (pydicom), written as Part 10 files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    study = Study(uid(f"{name}-study"), set(), set())
    for i, sop_class in enumerate([CT] * n_ct + [MR] * n_mr):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = uid(f"{name}-{i}")
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = uid(f"{name}-series-{sop_class}")
        ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
        ds.Modality = "CT" if sop_class == CT else "MR"
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
        ds.PixelData = bytes(range(16))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(out / f"{name}-{i}.dcm", enforce_file_format=True)
        (study.ct if sop_class == CT else study.mr).add(ds.SOPInstanceUID)
    return study


class CtOnlyReceiver:
    """A pynetdicom storage SCP accepting CT Image Storage only; what it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: set[str] = set()
        self._lock = threading.Lock()
        ae = AE(ae_title="CTONLY")
        ae.add_supported_context(CTImageStorage)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.add(str(event.request.AffectedSOPInstanceUID))
        return 0

    def take(self) -> set[str]:
        with self._lock:
            out, self.received = self.received, set()
        return out


@dataclass
class Archive:
    server: Server
    receiver: CtOnlyReceiver
    mixed: Study
    mr_only: Study
    ct_only: Study


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    work = tmp_path_factory.mktemp("retrieve-failures")
    files = work / "files"
    files.mkdir()
    mixed = write_study(files, "mixed", 2, 2)
    mr_only = write_study(files, "mr-only", 0, 2)
    ct_only = write_study(files, "ct-only", 2, 0)
    receiver = CtOnlyReceiver()
    server = Server(
        work / "archive",
        args=("--peer", "MOVER@127.0.0.1:9", "--peer", f"CTONLY@127.0.0.1:{receiver.port}"),
    ).start()
    try:
        run = pacsgrid_cli("import", "--data-dir", server.data_dir, files, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        yield Archive(server, receiver, mixed, mr_only, ct_only)
    finally:
        server.stop()
        receiver.server.shutdown()


def move(archive: Archive, study: str) -> tuple[Dataset, Dataset | None]:
    return c_move(archive.server.port, study, "CTONLY")[-1]


def get(archive: Archive, study: str) -> tuple[tuple[Dataset, Dataset | None], set[str]]:
    """C-GET with storage offered for CT only; (final response, what arrived)."""
    responses, received = c_get(archive.server.port, study, [CT])
    return responses[-1], set(received)


def failed_list(identifier: Dataset | None) -> set[str]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return set()
    value = identifier.FailedSOPInstanceUIDList
    return {str(value)} if isinstance(value, str) else {str(v) for v in value}


def counts(status: Dataset) -> tuple[int, int, int]:
    return (
        int(status.get("NumberOfCompletedSuboperations", 0)),
        int(status.get("NumberOfFailedSuboperations", 0)),
        int(status.get("NumberOfWarningSuboperations", 0)),
    )


def test_move_that_sends_nothing_is_a702_with_every_uid(archive: Archive) -> None:
    status, identifier = move(archive, archive.mr_only.uid)
    assert status.Status == A702, hex(status.Status)
    assert counts(status) == (0, 2, 0)
    assert failed_list(identifier) == archive.mr_only.mr
    assert archive.receiver.take() == set()


def test_move_that_sends_some_is_b000_with_the_others(archive: Archive) -> None:
    status, identifier = move(archive, archive.mixed.uid)
    assert status.Status == B000, hex(status.Status)
    assert counts(status) == (2, 2, 0)
    assert failed_list(identifier) == archive.mixed.mr
    assert archive.receiver.take() == archive.mixed.ct


def test_move_that_sends_everything_lists_nothing(archive: Archive) -> None:
    status, identifier = move(archive, archive.ct_only.uid)
    assert status.Status == SUCCESS, hex(status.Status)
    assert counts(status) == (2, 0, 0)
    assert failed_list(identifier) == set()
    assert archive.receiver.take() == archive.ct_only.ct


def test_get_reports_what_the_requester_cannot_take(archive: Archive) -> None:
    (status, identifier), received = get(archive, archive.mixed.uid)
    assert status.Status == B000, hex(status.Status)
    assert counts(status) == (2, 2, 0)
    assert failed_list(identifier) == archive.mixed.mr
    assert received == archive.mixed.ct
    (status, identifier), received = get(archive, archive.mr_only.uid)
    assert status.Status == A702, hex(status.Status)
    assert failed_list(identifier) == archive.mr_only.mr and received == set()


def test_retrieves_are_audited_without_patient_identifiers(archive: Archive) -> None:
    """Patient-level queries and retrieves by PatientID: the audit log records each, by study,
    and neither it nor the ordinary log holds the PatientID or the name."""
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="PACSGRID")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = PATIENT_ID
        query.PatientName = "QUIXOTE*"
        found = list(assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in found] == [0xFF00, SUCCESS]
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = PATIENT_ID
        moved = list(
            assoc.send_c_move(query, "CTONLY", PatientRootQueryRetrieveInformationModelMove)
        )
        assert moved[-1][0].Status == B000
    finally:
        assoc.release()
    archive.receiver.take()
    get(archive, archive.mixed.uid)
    records = audit_records(archive.server.data_dir / "audit.jsonl")
    ops = {(r["operation"], r["ae"]) for r in records}
    assert {("C-FIND", "MOVER"), ("C-MOVE", "MOVER"), ("C-GET", "MOVER")} <= ops, ops
    moves = [r for r in records if r["operation"] == "C-MOVE"]
    assert {r["study"] for r in moves} >= {archive.mixed.uid, archive.mr_only.uid}
    assert all(r["address"] == "127.0.0.1" for r in moves)
    audit_text = (archive.server.data_dir / "audit.jsonl").read_text()
    log_text = archive.server.text()
    for identifier in (PATIENT_ID, "Quixote", "QUIXOTE", "Alonso"):
        assert identifier not in audit_text, identifier
        assert identifier not in log_text, identifier


def test_a_move_that_sent_nothing_is_audited_as_failed(archive: Archive) -> None:
    """docs/operations.md (The audit log): a retrieve is recorded allowed, refused or failed."""
    before = len(audit_records(archive.server.data_dir / "audit.jsonl"))
    status, _ = move(archive, archive.mr_only.uid)
    assert status.Status == A702
    new = audit_records(archive.server.data_dir / "audit.jsonl")[before:]
    outcomes = [r["outcome"] for r in new if r["operation"] == "C-MOVE"]
    assert outcomes and outcomes[-1] == "failed", new
