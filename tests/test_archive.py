"""The Archive's rules, in process: durability, duplicates, untidy data, crash recovery."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from pacsgrid.archive import Archive, Caller
from pacsgrid.dicomfile.part10 import build_file_meta
from pacsgrid.errors import InvalidDataset, NotFound, QuorumNotMet
from pacsgrid.matching import Query, parse_match
from pacsgrid.model import Level
from pacsgrid.settings import Overrides, load_settings
from pacsgrid.storage import object_key
from tests.behind_the_archive import committer_of, index_of, placement_of

EXPLICIT = "1.2.840.10008.1.2.1"
MODALITY = Caller("MODALITY", "127.0.0.1")


def dataset(
    sop: str,
    *,
    study: str = "1.2.3",
    series: str = "1.2.3.4",
    pid: str = "P1",
    name: str = "DOE^JANE",
    pixels: bytes = b"\x01\x02" * 8,
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = pid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.BitsAllocated = 16
    ds.PixelData = pixels
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    a = Archive(load_settings(Overrides(data_dir=tmp_path / "data"), environ={}), probe_interval=0)
    yield a
    a.close()


def objects(a: Archive) -> Path:
    return a.settings.data_dir / "objects"


def flip_last_byte(path: Path) -> bytes:
    """Damage a stored object in place (as bit rot would); return the damaged bytes."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    return bytes(raw)


def stored_files(a: Archive) -> list[Path]:
    return sorted(p for p in objects(a).rglob("*.dcm") if ".quarantine" not in p.parts)


def test_ingest_is_durable_and_indexed(archive: Archive) -> None:
    data = dataset("1.2.3.4.5")
    result = archive.ingest(data, EXPLICIT, MODALITY)
    assert result.outcome == "stored"
    record = index_of(archive).instance("1.2.3.4.5")
    assert record is not None
    path = objects(archive) / record.copies[0].key
    content = path.read_bytes()
    assert content.endswith(data)  # the dataset exactly as received, after the file meta
    assert hashlib.sha256(content).hexdigest() == record.sha256 == record.copies[0].sha256
    assert record.copies[0].key == object_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert not list((objects(archive) / ".incoming").iterdir())
    assert archive.read(record).dataset.tobytes() == data
    archive.close()
    assert not list((archive.settings.data_dir / "journal").iterdir())  # clean stop


def test_duplicate_keeps_the_first_by_default(archive: Archive) -> None:
    first = dataset("1.9", pixels=b"\x00\x01" * 8)
    archive.ingest(first, EXPLICIT, MODALITY)
    path = stored_files(archive)[0]
    before = path.stat()
    again = archive.ingest(dataset("1.9", pixels=b"\x07\x07" * 8), EXPLICIT, MODALITY)
    assert again.outcome == "duplicate"
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert path.read_bytes().endswith(first)
    assert index_of(archive).stats().instances == 1


def test_duplicate_replaces_when_configured(tmp_path: Path) -> None:
    s = load_settings(
        Overrides(data_dir=tmp_path / "d", values={"dicom.on_duplicate": "replace"}), environ={}
    )
    a = Archive(s, probe_interval=0)
    try:
        a.ingest(dataset("1.9", pixels=b"\x00\x01" * 8), EXPLICIT, MODALITY)
        second = dataset("1.9", pixels=b"\x07\x07" * 8)
        assert a.ingest(second, EXPLICIT, MODALITY).outcome == "replaced"
        record = index_of(a).instance("1.9")
        assert record is not None
        assert index_of(a).stats().instances == 1
        assert a.read(record).dataset.tobytes() == second
        assert index_of(a).stats().series == 1
    finally:
        a.close()


def test_concurrent_stores_of_one_uid_agree_on_one_object(archive: Archive) -> None:
    """Different bytes under one SOP Instance UID from many threads at once: one row, and
    the stored bytes are the ones the index checksum describes."""
    variants = [dataset("7.7.7", pixels=bytes([i]) * 16) for i in range(16)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(variants))

    def store(data: bytes) -> None:
        barrier.wait()
        try:
            archive.ingest(data, EXPLICIT, MODALITY)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=store, args=(v,)) for v in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert index_of(archive).stats().instances == 1
    record = index_of(archive).instance("7.7.7")
    assert record is not None
    stored = archive.read(record)  # verifies the SHA-256 of what is on disk
    assert stored.dataset.tobytes() in variants
    assert len(stored_files(archive)) == 1


def test_concurrent_stores_share_index_transactions(archive: Archive) -> None:
    def store(t: int) -> None:
        for i in range(40):
            archive.ingest(dataset(f"2.{t}.{i}", series=f"2.{t}"), EXPLICIT, MODALITY)

    threads = [threading.Thread(target=store, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert index_of(archive).stats().instances == 320
    assert committer_of(archive).committed == 320
    assert committer_of(archive).batches < committer_of(archive).committed  # group commit happened


def test_study_under_another_patient_is_filed_with_a_warning(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    archive.ingest(dataset("3.1", pid="A"), EXPLICIT, MODALITY)
    result = archive.ingest(dataset("3.2", pid="B", series="1.2.3.5"), EXPLICIT, MODALITY)
    assert result.outcome == "stored"
    assert result.warnings and "stored under another PatientID" in result.warnings[0]
    assert "stored under another PatientID" in caplog.text
    assert "'A'" not in caplog.text and "'B'" not in caplog.text  # no patient identifiers
    found = list(
        archive.find(
            MODALITY.__class__(via="cli"),
            Query(Level.IMAGE, (parse_match("StudyInstanceUID", "1.2.3"),)),
        )
    )
    assert sorted(r["SOPInstanceUID"] for r in found) == ["3.1", "3.2"]


def test_untidy_but_valid_data_is_stored(archive: Archive) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.3.4.5.6.7.8.9"  # private SOP class
    ds.SOPInstanceUID = "4.1"
    ds.StudyInstanceUID = "4.2"
    ds.SeriesInstanceUID = "4.3"
    ds.PatientName = ""  # empty type 2
    block = ds.private_block(0x0011, "ACME", create=True)
    block.add_new(0x01, "LO", "odd")  # odd length value
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    assert archive.ingest(fp.getvalue(), "1.2.840.10008.1.2", MODALITY).outcome == "stored"


@pytest.mark.parametrize("data", [b"garbage" * 10, dataset("1.5")[:-7]])
def test_invalid_input_writes_nothing(archive: Archive, data: bytes) -> None:
    with pytest.raises(InvalidDataset):
        archive.ingest(data, EXPLICIT, MODALITY)
    assert stored_files(archive) == []
    assert not list((objects(archive) / ".incoming").iterdir())
    assert index_of(archive).stats().instances == 0


def test_missing_uids_refused(archive: Archive) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "5.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    with pytest.raises(InvalidDataset) as e:
        archive.ingest(fp.getvalue(), EXPLICIT, MODALITY)
    assert e.value.missing_uids
    assert "StudyInstanceUID" in e.value.reason


def test_no_healthy_site_means_nothing_is_acknowledged(archive: Archive) -> None:
    (objects(archive) / ".pacsgrid-site").unlink()  # as if the volume were unmounted
    placement_of(archive).probe()
    with pytest.raises(QuorumNotMet) as e:
        archive.ingest(dataset("6.1"), EXPLICIT, MODALITY)
    assert "volume not mounted" in str(e.value)
    assert index_of(archive).stats().instances == 0


def test_a_known_site_without_its_sentinel_is_not_reinitialised(tmp_path: Path) -> None:
    s = load_settings(Overrides(data_dir=tmp_path / "d"), environ={})
    Archive(s, probe_interval=0).close()
    sentinel = tmp_path / "d" / "objects" / ".pacsgrid-site"
    sentinel.unlink()
    a = Archive(s, probe_interval=0)
    try:
        assert not sentinel.exists()
        assert not placement_of(a).is_up("local")
    finally:
        a.close()


def test_journal_indexes_what_a_crash_left_behind(archive: Archive) -> None:
    """A crash after the object was durable but before its index commit: the next start
    finds the marker and indexes the object."""
    from pacsgrid.journal import IngestJournal

    data = dataset("8.1")
    key = object_key("1.2.3", "1.2.3.4", "8.1")
    dying = IngestJournal(archive.settings.data_dir / "journal")  # another process's journal
    token = dying.begin(key, ["local"])
    meta = build_file_meta("1.2.840.10008.5.1.4.1.1.2", "8.1", EXPLICIT, "MODALITY")
    placement_of(archive).sites["local"].put(key, [meta, data])
    assert archive.recover().journal == 0  # its owner is alive: not touched
    os.close(token[0].fd)  # the process dies: its lock goes, its journal stays
    assert not index_of(archive).has_instance("8.1")
    assert archive.recover().journal == 1
    assert index_of(archive).has_instance("8.1")
    assert not token[0].path.exists()
    assert archive.recover().journal == 0


def test_replay_never_takes_a_journal_file_being_created(archive: Archive) -> None:
    """The supervisor replays while workers ingest: a journal file that its new owner has
    created but not locked yet carries a name replay does not read, and only an old one of
    those (its owner died right there) is ever removed."""
    from pacsgrid.journal import NEW

    journal = archive.settings.data_dir / "journal"
    being_created = journal / f"4242-abc{NEW}"
    being_created.write_text("")
    left_by_the_dead = journal / f"4343-def{NEW}"
    left_by_the_dead.write_text("")
    os.utime(left_by_the_dead, (time.time() - 7200, time.time() - 7200))
    assert archive.recover().journal == 0
    assert being_created.exists()
    assert not left_by_the_dead.exists()
    archive.ingest(dataset("8.2"), EXPLICIT, MODALITY)  # a journal file of its own: renamed
    assert not list(journal.glob(f"{os.getpid()}-*{NEW}"))


def test_a_corrupt_copy_is_never_served(archive: Archive) -> None:
    archive.ingest(dataset("9.1"), EXPLICIT, MODALITY)
    record = index_of(archive).instance("9.1")
    assert record is not None
    flip_last_byte(objects(archive) / record.copies[0].key)
    with pytest.raises(NotFound, match="does not match its SHA-256"):
        archive.read(record)


def test_with_verify_reads_off_reads_trust_the_storage_but_repair_does_not(
    tmp_path: Path,
) -> None:
    """audit.verify_reads = false: retrieves serve what the site returns without hashing it
    (the admin trusts a checksumming filesystem), but the repair and audit jobs still check
    every copy they read: a bad copy is never the source of a new one."""
    settings = load_settings(
        Overrides(data_dir=tmp_path / "data"), environ={"PACSGRID_AUDIT_VERIFY_READS": "false"}
    )
    assert settings.audit.verify_reads is False
    a = Archive(settings, probe_interval=0)
    try:
        a.ingest(dataset("9.2"), EXPLICIT, MODALITY)
        record = index_of(a).instance("9.2")
        assert record is not None
        damaged = flip_last_byte(objects(a) / record.copies[0].key)
        assert a.read(record).data == damaged  # not checked: served as stored
        with pytest.raises(NotFound, match="does not match its SHA-256"):
            a.read(record, use_cache=False, verify=True)  # what repair and audit do
    finally:
        a.close()


def test_unknown_callers_may_store_but_not_query(archive: Archive) -> None:
    stranger = Caller("STRANGER", "10.0.0.9")
    assert archive.may(stranger, "store") and archive.may(stranger, "echo")
    assert not any(archive.may(stranger, op) for op in ("find", "move", "get"))


def test_work_queue_leases(archive: Archive) -> None:
    index = index_of(archive)
    assert index.enqueue("copy", [("a", ""), ("b", "x"), ("c", "")]) == 3
    assert index.enqueue("copy", [("a", "")]) == 0  # already pending
    first = index.claim("copy", "node-1", 2, lease=60)
    assert [w.key for w in first] == ["a", "b"]
    assert [w.key for w in index.claim("copy", "node-2", 5, lease=60)] == ["c"]
    assert index.claim("copy", "node-3", 5, lease=60) == []
    index.complete([first[0].pk])
    index.fail(first[1].pk, "site down", retry_at=time.time() + 3600)
    assert index.work_counts("copy") == {"done": 1, "pending": 2}
    assert index.claim("copy", "node-3", 5, lease=60) == []  # b waits, c is leased
    index.fail(first[1].pk, "gave up", retry_at=None)
    assert index.work_counts("copy")["failed"] == 1
    assert index.enqueue("copy", [("a", "")]) == 1  # done items can be queued again


def test_a_claim_reads_only_the_items_it_takes(archive: Archive) -> None:
    """With millions of items queued, sorting them all took seconds inside the write
    transaction that stores wait for: a claim follows work_ready_idx."""
    from pacsgrid.index.work import READY

    rows = index_of(archive)._all(f"EXPLAIN QUERY PLAN {READY}", ("copy", 0, 0, 1))  # type: ignore[attr-defined]
    plan = " ".join(str(r[-1]) for r in rows)
    assert "work_ready_idx" in plan and "TEMP B-TREE" not in plan, plan
