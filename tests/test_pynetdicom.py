"""The archive through a second, independent DICOM stack: pynetdicom as SCU and as SCP.

pynetdicom sends a file's encoded dataset without decoding it, so here stored objects must be
the original files' datasets byte for byte; it also sends the files DCMTK cannot read.
"""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.conftest import Server, free_port
from tests.corpus import CorpusFile, accepted, dataset_bytes

IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"

# Send a file's encoded dataset as it is, without decoding and re-encoding it.
_config.STORE_SEND_CHUNKED_DATASET = True


def has_meta(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def syntax_of(f: CorpusFile) -> str:
    """The transfer syntax a file is encoded in (detected by pydicom when it has no meta)."""
    if has_meta(f.path):
        return f.transfer_syntax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        implicit, little = pydicom.dcmread(f.path, force=True).original_encoding
    return IMPLICIT if implicit else EXPLICIT if little else "1.2.840.10008.1.2.2"


def with_meta(f: CorpusFile, workdir: Path) -> Path:
    """A copy of a bare dataset file with a file meta group in front (written by pydicom), so
    that pynetdicom sends its bytes as they are."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = f.sop_class_uid
    meta.MediaStorageSOPInstanceUID = f.sop_uid
    meta.TransferSyntaxUID = syntax_of(f)
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    out = workdir / f.path.name
    out.write_bytes(fp.getvalue() + f.path.read_bytes())
    return out


def send_files(port: int, files: list[CorpusFile], workdir: Path) -> dict[Path, int]:
    """C-STORE each file (as raw encoded bytes when it has file meta); return statuses."""
    statuses: dict[Path, int] = {}
    groups: dict[tuple[str, str], list[CorpusFile]] = defaultdict(list)
    for f in files:
        groups[(f.sop_class_uid, syntax_of(f))].append(f)
    keys = sorted(groups)
    for start in range(0, len(keys), 120):
        ae = AE(ae_title="PYNETDICOM")
        for sop_class, ts in keys[start : start + 120]:
            ae.add_requested_context(
                sop_class, [ts, EXPLICIT, IMPLICIT] if ts not in (EXPLICIT, IMPLICIT) else [ts]
            )
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
        assert assoc.is_established
        try:
            for key in keys[start : start + 120]:
                for f in groups[key]:
                    if has_meta(f.path):
                        with warnings.catch_warnings():  # pydicom reads the meta of odd files
                            warnings.simplefilter("ignore")
                            status = assoc.send_c_store(f.path)
                    else:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            status = assoc.send_c_store(with_meta(f, workdir))
                    statuses[f.path] = int(status.Status) if status else -1
        finally:
            assoc.release()
    return statuses


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict]]:
    work = tmp_path_factory.mktemp("pynetdicom")
    dest_port = free_port()
    server = Server(
        work / "archive",
        args=("--peer", "PYNETDICOM@127.0.0.1:9", "--peer", f"PYSCP@127.0.0.1:{dest_port}"),
    ).start()
    try:
        statuses = send_files(server.port, accepted(), work)
        yield server, {"statuses": statuses, "dest_port": dest_port}
    finally:
        server.stop()


def first_per_uid(files: list[CorpusFile], statuses: dict[Path, int]) -> dict[str, CorpusFile]:
    """The file the archive kept for each SOP Instance UID: the first one sent (statuses is
    in sending order), since duplicates keep the stored object."""
    by_path = {f.path: f for f in files}
    out: dict[str, CorpusFile] = {}
    for path, status in statuses.items():
        if status == 0 and path in by_path:
            out.setdefault(by_path[path].sop_uid, by_path[path])
    return out


def stored_dataset(server: Server, sop_uid: str) -> tuple[str, bytes]:
    from pacsgrid.index.sqlite import SqliteIndex

    index = SqliteIndex(server.data_dir / "index.sqlite")
    try:
        record = index.instance(sop_uid)
    finally:
        index.close()
    assert record is not None, sop_uid
    return dataset_bytes(server.data_dir / "objects" / record.copies[0].key)


def test_echo(loaded: tuple[Server, dict]) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", loaded[0].port, ae_title="PACSGRID")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_every_valid_file_is_stored_byte_for_byte(loaded: tuple[Server, dict]) -> None:
    server, ctx = loaded
    statuses = ctx["statuses"]
    refused = {p: s for p, s in statuses.items() if s != 0}
    assert not refused, refused
    winners = first_per_uid(accepted(), statuses)
    identical = 0
    for sop, f in winners.items():
        stored_ts, stored_body = stored_dataset(server, sop)
        if has_meta(f.path):
            assert (stored_ts, stored_body) == dataset_bytes(f.path), f.path
        else:
            assert stored_body == f.path.read_bytes(), f.path  # a bare dataset
        identical += 1
    print(
        f"\npynetdicom: {len(statuses)} files stored, {len(winners)} distinct instances, "
        f"{identical} byte-identical to the original file"
    )


def find(port: int, model: object, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
    assert assoc.is_established
    out = []
    try:
        for status, ds in assoc.send_c_find(identifier, model):
            assert status is not None
            if status.Status in (0xFF00, 0xFF01):
                out.append(ds)
            else:
                assert status.Status == 0, hex(status.Status)
    finally:
        assoc.release()
    return out


def test_find_at_every_level(loaded: tuple[Server, dict]) -> None:
    server, ctx = loaded
    winners = first_per_uid(accepted(), ctx["statuses"])
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    studies = find(server.port, StudyRootQueryRetrieveInformationModelFind, q)
    assert len(studies) == len({f.study_uid for f in winners.values()})
    assert sum(int(s.NumberOfStudyRelatedInstances) for s in studies) == len(winners)
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = ""
    q.NumberOfPatientRelatedInstances = ""
    patients = find(server.port, PatientRootQueryRetrieveInformationModelFind, q)
    assert sum(int(p.NumberOfPatientRelatedInstances) for p in patients) == len(winners)
    some = sorted(winners)[0]
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.SOPInstanceUID = some
    q.SOPClassUID = ""
    images = find(server.port, StudyRootQueryRetrieveInformationModelFind, q)
    assert [i.SOPInstanceUID for i in images] == [some]
    assert images[0].SOPClassUID == winners[some].sop_class_uid


def storage_contexts(files: list[CorpusFile]) -> list[tuple[str, str]]:
    return sorted({(f.sop_class_uid, syntax_of(f)) for f in files})


def test_get_returns_the_stored_bytes(loaded: tuple[Server, dict]) -> None:
    server, ctx = loaded
    winners = first_per_uid(accepted(), ctx["statuses"])
    study = max(
        {f.study_uid for f in winners.values()},
        key=lambda s: sum(1 for f in winners.values() if f.study_uid == s),
    )
    members = [f for f in winners.values() if f.study_uid == study]
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = (
            event.context.transfer_syntax,
            bytes(event.encoded_dataset(include_meta=False)),
        )
        return 0

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class, ts in storage_contexts(members):
        ae.add_requested_context(sop_class, [ts])
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="PACSGRID",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    final = None
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        final = status
    assoc.release()
    assert final is not None and final.Status == 0
    assert set(received) == {f.sop_uid for f in members}
    for sop, got in received.items():
        assert got == stored_dataset(server, sop)


@pytest.mark.slow
def test_move_to_a_pynetdicom_scp(loaded: tuple[Server, dict]) -> None:
    server, ctx = loaded
    winners = first_per_uid(accepted(), ctx["statuses"])
    received: dict[str, tuple[str, bytes]] = {}
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received[event.request.AffectedSOPInstanceUID] = (
                event.context.transfer_syntax,
                bytes(event.encoded_dataset(include_meta=False)),
            )
        return 0

    scp = AE(ae_title="PYSCP")
    for sop_class, ts in storage_contexts(list(winners.values()))[:120]:
        scp.add_supported_context(sop_class, [ts, EXPLICIT, IMPLICIT])
    server_thread = scp.start_server(
        ("127.0.0.1", ctx["dest_port"]), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        studies = sorted({f.study_uid for f in winners.values()})[:10]
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSGRID")
        assert assoc.is_established
        for study in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = study
            final = None
            for status, _ in assoc.send_c_move(
                q, "PYSCP", StudyRootQueryRetrieveInformationModelMove
            ):
                final = status
            assert final is not None and final.Status == 0, final
        assoc.release()
    finally:
        server_thread.shutdown()
    want = {f.sop_uid for f in winners.values() if f.study_uid in studies}
    assert set(received) == want
    for sop, got in received.items():
        assert got == stored_dataset(server, sop)
