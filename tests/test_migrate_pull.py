"""`pacsgrid migrate pull` and `pacsgrid verify --against` with a real legacy PACS: Orthanc
(Debian's package) loaded with the shared corpus through its REST API."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from pacsgrid.index.sqlite import SqliteIndex
from pacsgrid.migration_ledger import DONE
from tests.conftest import Server, free_port, pacsgrid_cli
from tests.corpus import corpus
from tests.peers import Orthanc

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


@dataclass
class Legacy:
    orthanc: Orthanc
    pacsgrid_port: int  # where Orthanc sends C-MOVE sub-operations for AE PACSGRID
    uids: set[str]

    @property
    def address(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.orthanc.dicom_port}"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Legacy]:
    work = tmp_path_factory.mktemp("legacy")
    port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={"PACSGRID": ("127.0.0.1", port)}).start()
    try:
        orthanc.upload([f.path for f in corpus()])
        uids = orthanc.sop_uids()
        assert len(uids) > 50, "Orthanc should hold most of the corpus"
        yield Legacy(orthanc, port, uids)
    finally:
        orthanc.stop()


def pacsgrid(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli(*args, timeout=timeout)


def pull(legacy: Legacy, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`migrate pull` from the legacy Orthanc, moving to the pacsgrid port it knows."""
    return pacsgrid(
        "migrate",
        "pull",
        "--data-dir",
        data,
        "--from",
        legacy.address,
        "--port",
        str(legacy.pacsgrid_port),
        *args,
    )


def archived(data_dir: Path) -> tuple[set[str], int]:
    """SOP Instance UIDs in the archive's index, and object files on its site."""
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        rows = index._all("SELECT sop_uid FROM instance")
    finally:
        index.close()
    files = sum(1 for _ in (data_dir / "objects").rglob("*.dcm"))
    return {r[0] for r in rows}, files


def ledger(data_dir: Path, source: str) -> dict[str, tuple[str, int]]:
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        return {e.study_uid: (e.state, e.attempts) for e in index.study_ledger(source)}
    finally:
        index.close()


def test_pull_brings_everything_and_verify_finds_nothing_missing(
    legacy: Legacy, tmp_path: Path
) -> None:
    data = tmp_path / "archive"
    server = Server(data, port=legacy.pacsgrid_port).start()
    try:
        run = pull(legacy, data, "--parallel", "2")
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        assert "instances/s" in run.stdout
        print("\n" + run.stdout)
        uids, files = archived(data)
        assert uids == legacy.uids
        assert files == len(uids)
        states = ledger(data, legacy.address)
        assert states and all(state == DONE for state, _ in states.values())

        again = pull(legacy, data)
        assert again.returncode == 0, again.stdout + again.stderr[-2000:]
        assert f"{len(states)} already complete, 0 retrieved" in again.stdout

        verify = pacsgrid(
            "verify", "--data-dir", data, "--against", legacy.address, "--out", tmp_path / "r"
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]
        assert "| missing | 0 |" in verify.stdout
        assert verify.stdout.count("compared with the source, 0 bad") == 3
        assert (tmp_path / "r" / "verify.csv").read_text().startswith("kind,")

        # The legacy system gets one more instance in a study already migrated: verify sees
        # it missing, and the next pull retrieves that study again.
        late = tmp_path / "late.dcm"
        template = next(f for f in corpus() if f.accepted and f.sop_uid in legacy.uids)
        ds = pydicom.dcmread(template.path)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(late)
        assert legacy.orthanc.upload([late]) == [ds.SOPInstanceUID]
        legacy.uids.add(ds.SOPInstanceUID)
        verify = pacsgrid(
            "verify", "--data-dir", data, "--against", legacy.address, "--out", tmp_path / "r2"
        )
        assert verify.returncode == 1 and "| missing | 1 |" in verify.stdout, verify.stdout
        assert ds.SOPInstanceUID in (tmp_path / "r2" / "verify.csv").read_text()
        third = pull(legacy, data)
        assert third.returncode == 0 and ", 1 retrieved now" in third.stdout, third.stdout
        assert archived(data)[0] == legacy.uids
    finally:
        server.stop()


def test_pull_killed_midway_resumes_nothing_missing_nothing_twice(
    legacy: Legacy, tmp_path: Path
) -> None:
    data = tmp_path / "archive"
    server = Server(data, port=legacy.pacsgrid_port).start()
    log = tmp_path / "pull.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacsgrid", "migrate", "pull", "--data-dir", str(data)]
            + ["--from", legacy.address, "--max-rate", "20", "--port", str(legacy.pacsgrid_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        done_before: dict[str, int] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            states = ledger(data, legacy.address) if (data / "index.sqlite").exists() else {}
            done_before = {u: a for u, (s, a) in states.items() if s == DONE}
            if len(done_before) >= 8:
                break
        assert proc.poll() is None, "the pull ended before it could be killed:\n" + log.read_text()
        proc.send_signal(signal.SIGKILL)
        server.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    total = len(ledger(data, legacy.address))
    assert 8 <= len(done_before) < total

    server = Server(data, port=legacy.pacsgrid_port).start()
    try:
        run = pull(legacy, data)
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        print("\nafter the kill: " + run.stdout)
    finally:
        server.stop()
    uids, files = archived(data)
    assert uids == legacy.uids, "nothing missing"
    assert files == len(uids), "nothing stored twice"
    states = ledger(data, legacy.address)
    assert all(state == DONE for state, _ in states.values())
    # Studies complete before the kill were not retrieved again.
    assert all(states[u][1] == a for u, a in done_before.items())
    m = re.search(r"(\d+) already complete", run.stdout)
    assert m and int(m[1]) >= len(done_before)


def test_pull_with_c_get_and_a_capping_source(legacy: Legacy, tmp_path: Path) -> None:
    data = tmp_path / "archive"
    port = free_port()  # nothing listens here
    refused = pacsgrid(
        "migrate", "pull", "--data-dir", data, "--from", legacy.address, "--port", port
    )
    assert refused.returncode == 1 and "pacsgrid serve" in refused.stderr, refused.stderr

    run = pull(legacy, data, "--get", "--find-limit", "10", "--parallel", "2", "--attempts", "1")
    m = re.search(r"(\d+) studies found \((\d+) C-FIND\)", run.stdout)
    assert m and int(m[2]) > 3, run.stdout  # the answers were sliced by date
    states = ledger(data, legacy.address)
    assert len(states) == int(m[1])
    uids, files = archived(data)
    assert files == len(uids)
    # Orthanc 1.10's C-GET SCP cannot send one object of the corpus (its C-MOVE can): such a
    # study must be listed with the reason, never counted as done.
    failed = [line for line in run.stdout.splitlines() if line.startswith("  failed")]
    assert run.returncode == (1 if failed else 0), run.stdout + run.stderr[-3000:]
    assert all("C-GET status" in line for line in failed), failed
    assert len(failed) == sum(1 for state, _ in states.values() if state != DONE)
    assert len(failed) <= 2 and len(uids) >= len(legacy.uids) - 2
    assert uids <= legacy.uids


def test_pull_from_a_source_that_caps_its_answers(tmp_path: Path) -> None:
    """Orthanc with LimitFindResults answers at most 10 studies per C-FIND and says so with a
    Cancel status: discovery slices by date, and by PatientID for studies without a date."""
    orthanc = Orthanc(
        tmp_path / "capped",
        modalities={"PACSGRID": ("127.0.0.1", free_port())},
        extra={"LimitFindResults": 10},
    )
    port = orthanc.config_modality_port("PACSGRID")
    orthanc.start()
    try:
        orthanc.upload([f.path for f in corpus()])
        studies = orthanc.get("/studies?expand")
        findable = {
            s["MainDicomTags"]["StudyInstanceUID"]
            for s in studies
            if s["MainDicomTags"].get("StudyDate") or s["PatientMainDicomTags"].get("PatientID")
        }
        assert len(findable) > 2 * 10, "the corpus must hold well over the cap of 10 studies"
        data = tmp_path / "archive"
        source = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        run = pacsgrid(
            "migrate", "pull", "--data-dir", data, "--from", source, "--listen", "--port", port
        )
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        assert "warning: the source caps its answers" in run.stdout
        print("\n" + run.stdout)
        found = set(ledger(data, source))
        assert found >= findable, findable - found
        index = SqliteIndex(data / "index.sqlite")
        try:
            held = {r[0] for r in index._all("SELECT DISTINCT study_uid FROM study")}
        finally:
            index.close()
        assert held >= findable
    finally:
        orthanc.stop()


def test_window_and_dates() -> None:
    import datetime as dt

    from pacsgrid.errors import ConfigError
    from pacsgrid.migrate.pull import in_window, parse_date, parse_window, seconds_until_open

    night = parse_window("19:00-07:00")
    assert in_window(night, dt.datetime(2024, 1, 1, 23, 0))
    assert in_window(night, dt.datetime(2024, 1, 1, 6, 59))
    assert not in_window(night, dt.datetime(2024, 1, 1, 12, 0))
    assert seconds_until_open(night, dt.datetime(2024, 1, 1, 18, 0)) == 3600
    day = parse_window("8:30-17:00")
    assert in_window(day, dt.datetime(2024, 1, 1, 8, 30))
    assert not in_window(day, dt.datetime(2024, 1, 1, 17, 0))
    assert parse_date("2005-01-31", "--since") == dt.date(2005, 1, 31)
    for bad in ("25:00-07:00", "7-19", ""):
        with pytest.raises(ConfigError, match="--window"):
            parse_window(bad)
    with pytest.raises(ConfigError, match="--since"):
        parse_date("31.01.2005", "--since")


def _instance(out: Path, name: str, study: str, date: str, pixels: bytes) -> Path:
    """A small CT image (pydicom) in study `study`; the SOP Instance UID follows `name`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from tests.synthetic import uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = uid(f"verify-{name}")
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = uid(f"verify-series-{study}")
    ds.StudyDate, ds.Modality = date, "CT"
    ds.PatientID, ds.PatientName = "VERIFY-1", "Verify^Case"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = out / f"{name}-{study[-6:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_verify_against_a_pacs_reports_every_kind_of_finding(tmp_path: Path) -> None:
    """docs/migration.md (Verify): against a PACS, verify reports missing, extra, moved and
    mismatched instances (pixel data that differ, an archived copy that cannot be read), and
    exits 1.

    Orthanc holds the source; the archive was given the same instances with one of each
    defect. The two oldest complete studies are the sampled ones (--sample 2)."""
    from tests.synthetic import uid

    src, arc = tmp_path / "source", tmp_path / "archived"
    src.mkdir()
    arc.mkdir()
    s1, s2, s3, s4, s5 = (uid(f"verify-study-{n}") for n in range(1, 6))
    elsewhere = uid("verify-study-elsewhere")
    px, other = bytes(range(16)), bytes(range(16, 32))
    both = [
        ("i1", s1, "19990101"),  # identical
        ("i5", s3, "19990102"),  # archived copy damaged later
        ("i4", s4, "20200102"),  # identical
    ]
    for name, study, date in both:
        _instance(src, name, study, date, px)
        _instance(arc, name, study, date, px)
    _instance(src, "i2", s1, "19990101", px)
    _instance(arc, "i2", s1, "19990101", other)  # same UID, other pixels
    _instance(src, "i3", s2, "20200101", px)
    _instance(arc, "i3", elsewhere, "20200101", px)  # filed in another study
    _instance(arc, "i6", s4, "20200102", px)  # only in the archive
    _instance(src, "i7", s5, "20200103", px)  # only in the source
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"PACSGRID": ("127.0.0.1", free_port())})
    orthanc.start()
    try:
        assert len(orthanc.upload(sorted(src.iterdir()))) == 6
        data = tmp_path / "archive"
        imported = pacsgrid("import", "--data-dir", data, arc)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        i5 = uid("verify-i5")
        index = SqliteIndex(data / "index.sqlite")
        try:
            record = index.instance(i5)
        finally:
            index.close()
        assert record is not None
        stored = data / "objects" / record.copies[0].key
        damaged = bytearray(stored.read_bytes())
        damaged[-8] ^= 0xFF  # a bit flipped on the disk, in the pixel data
        stored.write_bytes(bytes(damaged))

        source = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        run = pacsgrid(
            "verify", "--data-dir", data, "--against", source, "--sample", "2",
            "--out", tmp_path / "report",
        )  # fmt: skip
        assert run.returncode == 1, run.stdout + run.stderr
        with open(tmp_path / "report" / "verify.csv", newline="") as fh:
            rows = [
                {**r, "study": r["study_instance_uid"], "sop": r["sop_instance_uid"]}
                for r in csv.DictReader(fh)
            ]
        found = {(r["kind"], r["study"], r["sop"]) for r in rows if r["kind"] != "sampled"}
        assert found == {
            ("missing", s5, uid("verify-i7")),
            ("extra", s4, uid("verify-i6")),
            ("moved", s2, uid("verify-i3")),
            ("mismatch", s1, uid("verify-i2")),
            ("mismatch", s3, i5),
        }, rows
        details = {r["sop"]: r["detail"] for r in rows}
        assert details[uid("verify-i2")] == "pixel data differ"
        assert details[i5].startswith("archive read:"), details[i5]
        assert {r["study"] for r in rows if r["kind"] == "sampled"} == {s1, s3}
        summary = (tmp_path / "report" / "verify.md").read_text()
        for kind, n in (("missing", 1), ("extra", 1), ("moved", 1), ("mismatch", 2)):
            assert f"| {kind} | {n} |" in summary, summary
    finally:
        orthanc.stop()
