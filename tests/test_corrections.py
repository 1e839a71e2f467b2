"""Corrections through the Archive, in process: real folder sites, real SQLite files and a
real PostgreSQL server (the index engines run the same tests).

What is checked: patient updates, merges, study moves and their undo change what queries
answer and what retrieves send, never a stored byte; rejection notes hide instances (also
ones that arrive after the note) and their counts; the index rebuilt from the sites alone
answers exactly as before, corrections applied in order; a correction a crash or a missing
quorum left pending is finished before the next; documents reach sites that were down; an
index behind the sites refuses new corrections.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from bench import synth
from pacsgrid.archive import Archive, Caller, Match, Query
from pacsgrid.archive.correction_plans import PatientRef
from pacsgrid.correction import Correction, doc_key, inverse
from pacsgrid.errors import CorrectionConflict, InvalidCorrection, NotFound, QuorumNotMet
from pacsgrid.model import Level
from pacsgrid.node import auditor, reindexer
from pacsgrid.settings import Overrides, Settings, load_settings, parse_site_options
from tests.behind_the_archive import index_of, sites_of
from tests.iocm import rejection_note

ADMIN = Caller(user="tester", via="cli")
QUORUM = "replication.write_quorum"
ENGINES = ("sqlite", "postgres")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six studies of three patients (P0000000..2), two series of three instances each."""
    out = tmp_path_factory.mktemp("synth")
    spec = synth.Spec(studies=6, series=2, instances=3, size=8, patients=3)
    return synth.write(spec, out)


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("pg_url"))


def settings_for(tmp_path: Path, database: str = "", sites: int = 1, **values: object) -> Settings:
    ov = Overrides(data_dir=tmp_path / "archive", database=database or None, values=dict(values))
    if sites > 1:
        ov.sites = parse_site_options([f"s{i}={tmp_path / f'site{i}'}" for i in range(sites)])
    return load_settings(ov, environ={})


@pytest.fixture
def archive(tmp_path: Path, database: str, files: list[Path]) -> Iterator[Archive]:
    a = Archive(settings_for(tmp_path, database), probe_interval=0)
    for p in files:
        a.ingest_file(p.read_bytes(), ADMIN)
    yield a
    a.close()


def answers(a: Archive) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    """Every level's complete C-FIND answer, sorted."""
    return {
        lv.value: sorted(tuple(sorted(r.items())) for r in a.find(ADMIN, Query(lv))) for lv in Level
    }


def by_patient(pid: str, level: Level = Level.IMAGE) -> Query:
    return Query(level, (Match("PatientID", "single", (pid,)),))


def studies_of(a: Archive, pid: str) -> set[str]:
    q = Query(Level.STUDY, (Match("PatientID", "single", (pid,)),))
    return {r["StudyInstanceUID"] for r in a.find(ADMIN, q)}


def by_study(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in files:
        out.setdefault(
            str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID), []
        ).append(p)
    return out


def stored_digests(a: Archive) -> dict[str, str]:
    """SHA-256 of every file on every site (the bytes corrections must never touch)."""
    out = {}
    for site in sites_of(a):
        for info in site.list():
            out[f"{site.name}:{info.key}"] = hashlib.sha256(site.get(info.key)).hexdigest()
    return out


def wipe_index(a: Archive, settings: Settings, database: str) -> Archive:
    """Close `a`, lose its index (file deleted, or every table of the database dropped), and
    open the archive again on the empty index."""
    a.close()
    if not database:
        for f in settings.data_dir.glob("index.sqlite*"):
            f.unlink()
    else:
        import psycopg

        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
    return Archive(settings, probe_interval=0)


def rebuild(a: Archive) -> int:
    report = reindexer(a, a.settings.sites, jobs=1).run()
    assert not report.unreadable and not report.conflicts, report
    return report.corrections


# ---------------------------------------------------------------- documents


def test_document_round_trip_and_inverse(archive: Archive) -> None:
    out = archive.corrections.merge(
        ADMIN, PatientRef("P0000000"), PatientRef("P0000001"), {"PatientName": "ROE^RICHARD"}, "dup"
    )
    c = out.correction
    assert c is not None
    again = Correction.from_json(c.to_json())
    assert again == c and again.to_json() == c.to_json()
    assign, hide, show = inverse(c)
    back = {m.study: a.patient["PatientID"] for a in assign for m in a.studies}
    assert set(back) == set(c.studies)
    assert sorted(back.values()).count("P0000000") == 2  # the merged patient's two studies
    assert not hide and not show
    doc = sites_of(archive)[0].get(doc_key(c.seq))
    assert doc == c.to_json()  # what the site holds is what the index applied


# ---------------------------------------------------------------- patients


def test_merge_update_move_undo(archive: Archive, files: list[Path]) -> None:
    before = answers(archive)
    digests = stored_digests(archive)
    a_studies, b_studies = studies_of(archive, "P0000000"), studies_of(archive, "P0000001")
    assert len(a_studies) == 2 and len(b_studies) == 2

    merged = archive.corrections.merge(
        ADMIN, PatientRef("P0000000"), PatientRef("P0000001"), reason="registry merge"
    )
    assert merged.correction is not None
    assert studies_of(archive, "P0000001") == a_studies | b_studies
    assert studies_of(archive, "P0000000") == set()
    patients = {r["PatientID"]: r for r in archive.find(ADMIN, Query(Level.PATIENT))}
    assert "P0000000" not in patients  # no study left: not answered
    assert patients["P0000001"]["NumberOfPatientRelatedStudies"] == "4"
    assert patients["P0000001"]["NumberOfPatientRelatedInstances"] == "24"

    updated = archive.corrections.update_patient(
        ADMIN, PatientRef("P0000001"), {"PatientName": "ROE^RICHARD", "PatientSex": "m"}, "typo"
    )
    assert updated.correction is not None
    q = Query(Level.STUDY, (Match("PatientName", "wildcard", ("ROE*",)),))
    assert {r["StudyInstanceUID"] for r in archive.find(ADMIN, q)} == a_studies | b_studies

    study = sorted(a_studies)[0]
    moved = archive.corrections.move_study(ADMIN, study, PatientRef("NEW1"), reason="wrong")
    assert moved.correction is not None and studies_of(archive, "NEW1") == {study}

    # Undo newest first; an older one is refused while a later one touches its studies.
    with pytest.raises(CorrectionConflict, match="later corrections"):
        archive.corrections.undo(ADMIN, merged.correction.seq, "too early")
    for c in (moved.correction, updated.correction, merged.correction):
        archive.corrections.undo(ADMIN, c.seq, "restore")
    assert answers(archive) == before
    assert stored_digests(archive) == digests
    with pytest.raises(CorrectionConflict, match="undone already"):
        archive.corrections.undo(ADMIN, merged.correction.seq, "twice")

    # The undo of an undo redoes.
    rows = archive.corrections.recent(ADMIN, 10)
    last_undo = rows[0]
    assert last_undo.kind == "undo" and last_undo.doc.undoes == merged.correction.seq
    archive.corrections.undo(ADMIN, last_undo.seq, "redo")
    assert studies_of(archive, "P0000001") == a_studies | b_studies


def test_requests_that_cannot_be_made_change_nothing(archive: Archive) -> None:
    before = answers(archive)
    with pytest.raises(NotFound):
        archive.corrections.update_patient(ADMIN, PatientRef("NOBODY"), {"PatientSex": "F"}, "x")
    with pytest.raises(InvalidCorrection, match="PatientBirthDate"):
        archive.corrections.update_patient(
            ADMIN, PatientRef("P0000000"), {"PatientBirthDate": "19701301"}, "x"
        )
    with pytest.raises(InvalidCorrection, match="PatientSex"):
        archive.corrections.update_patient(ADMIN, PatientRef("P0000000"), {"PatientSex": "X"}, "x")
    with pytest.raises(CorrectionConflict, match="merge"):
        archive.corrections.update_patient(
            ADMIN, PatientRef("P0000000"), {"PatientID": "P0000001"}, "x"
        )
    with pytest.raises(InvalidCorrection, match="itself"):
        archive.corrections.merge(ADMIN, PatientRef("P0000000"), PatientRef("P0000000"))
    with pytest.raises(NotFound):
        archive.corrections.undo(ADMIN, 99, "x")
    nothing = archive.corrections.update_patient(
        ADMIN, PatientRef("P0000000"), {"PatientID": "P0000000"}, "same"
    )
    assert nothing.correction is None
    assert answers(archive) == before
    assert archive.corrections.recent(ADMIN) == []


def test_corrected_objects_are_sent_corrected_and_stored_ones_stay(archive: Archive) -> None:
    digests = stored_digests(archive)
    archive.corrections.update_patient(
        ADMIN,
        PatientRef("P0000002"),
        {"PatientID": "MRN-77", "PatientName": "Ærø^Jürgen", "PatientBirthDate": "1970-01-02"},
        "registry",
    )
    records = archive.locate(
        ADMIN, Query(Level.IMAGE, (Match("PatientID", "single", ("MRN-77",)),))
    )
    assert len(records) == 12
    other = archive.locate(
        ADMIN, Query(Level.IMAGE, (Match("PatientID", "single", ("P0000001",)),))
    )
    for r in records:
        sent = archive.read(r, ADMIN)
        ds = pydicom.dcmread(io.BytesIO(sent.data))
        assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate) == (
            "MRN-77",
            "Ærø^Jürgen",
            "19700102",
        )
        old = ds.OriginalAttributesSequence[-1]
        assert old.ReasonForTheAttributeModification == "CORRECT"
        assert old.ModifiedAttributesSequence[0].PatientID == "P0000002"
        stored = sites_of(archive)[0].get(r.copies[0].key)
        assert hashlib.sha256(stored).hexdigest() == r.sha256  # the stored object as it was
        assert pydicom.dcmread(io.BytesIO(stored)).PixelData == ds.PixelData
    for r in other:  # studies without a correction: the stored bytes, as they are
        assert not r.corrections
        assert archive.read(r, ADMIN).data == sites_of(archive)[0].get(r.copies[0].key)
    assert stored_digests(archive) == digests
    report = auditor(archive).run(threading.Event())  # the fixity audit checks the originals
    assert report.counts["ok"] == len(digests) and not report.findings


# ---------------------------------------------------------------- rejection notes


def test_rejection_note_hides_instances_also_late_ones_and_unhide(
    tmp_path: Path, database: str, files: list[Path]
) -> None:
    a = Archive(settings_for(tmp_path, database), probe_interval=0)
    try:
        studies = by_study(files)
        study, other = sorted(studies)[:2]
        late = studies[study][-1]  # referenced by the note, stored after it
        for p in files:
            if p != late:
                a.ingest_file(p.read_bytes(), ADMIN)
        others_before = [r for r in answers(a)["STUDY"] if ("StudyInstanceUID", other) in r]
        rejected = studies[study][3:]  # the second series, all three instances
        note = rejection_note(tmp_path / "kos.dcm", rejected, "113001")
        stored = a.ingest_file(note.read_bytes(), ADMIN)
        assert stored.outcome == "stored"
        a.ingest_file(late.read_bytes(), ADMIN)

        q = Query(Level.IMAGE, (Match("StudyInstanceUID", "single", (study,)),))
        visible = {r["SOPInstanceUID"] for r in a.find(ADMIN, q)}
        rejected_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in rejected}
        assert not visible & rejected_uids
        assert stored.sop_instance_uid in visible  # the note itself is findable
        assert len(visible) == 4  # three of the first series and the note
        assert {r.sop_uid for r in a.locate(ADMIN, q)} == visible
        series = Query(Level.SERIES, q.matches)
        assert len(list(a.find(ADMIN, series))) == 2  # the rejected series is not answered
        row = next(iter(a.find(ADMIN, Query(Level.STUDY, q.matches))))
        assert row["NumberOfStudyRelatedInstances"] == "4"
        assert row["NumberOfStudyRelatedSeries"] == "2"
        assert row["ModalitiesInStudy"] == "CT\\KO"
        others = [r for r in answers(a)["STUDY"] if ("StudyInstanceUID", other) in r]
        assert others == others_before
        hidden = a.corrections.hidden(ADMIN)
        assert {h.sop_uid for h in hidden} == rejected_uids and all(h.stored for h in hidden)

        # A second copy of the note does not reject twice.
        again = a.ingest_file(note.read_bytes(), ADMIN)
        assert again.outcome == "duplicate" and len(a.corrections.recent(ADMIN)) == 1

        shown = a.corrections.unhide(ADMIN, by=hidden[0].by, reason="quality was fine")
        assert shown.correction is not None
        assert {r["SOPInstanceUID"] for r in a.find(ADMIN, q)} == visible | rejected_uids
        row = next(iter(a.find(ADMIN, Query(Level.STUDY, q.matches))))
        assert (row["NumberOfStudyRelatedInstances"], row["NumberOfStudyRelatedSeries"]) == (
            "7",
            "3",
        )
        assert a.corrections.hidden(ADMIN) == []
    finally:
        a.close()


def test_ordinary_key_objects_and_broken_notes_hide_nothing(
    archive: Archive, tmp_path: Path, files: list[Path]
) -> None:
    study = by_study(files)
    first = sorted(study)[0]
    plain = rejection_note(tmp_path / "plain.dcm", study[first][:2], "113000")
    archive.ingest_file(plain.read_bytes(), ADMIN)
    assert archive.corrections.recent(ADMIN) == [] and archive.corrections.hidden(ADMIN) == []


# ---------------------------------------------------------------- rebuild from the sites


def test_the_index_rebuilt_from_the_sites_answers_as_before(
    tmp_path: Path, database: str, files: list[Path]
) -> None:
    settings = settings_for(tmp_path, database)
    a = Archive(settings, probe_interval=0)
    try:
        for p in files:
            a.ingest_file(p.read_bytes(), ADMIN)
        studies = by_study(files)
        s0, s1 = sorted(studies)[:2]
        m = a.corrections.merge(ADMIN, PatientRef("P0000000"), PatientRef("P0000001"), reason="a")
        a.corrections.update_patient(ADMIN, PatientRef("P0000001"), {"PatientName": "X^Y"}, "b")
        note = rejection_note(tmp_path / "kos.dcm", studies[s1][:2], "113037")
        a.ingest_file(note.read_bytes(), ADMIN)
        a.corrections.move_study(ADMIN, s0, PatientRef("P0000002"), reason="c")
        a.corrections.undo(ADMIN, 4, "d")  # the move
        hl7 = a.corrections.update_patient(
            ADMIN, PatientRef("P0000002"), {"PatientSex": "O"}, "e", source="hl7:ADT|H|M1"
        )
        assert m.correction is not None and hl7.correction is not None
        before = answers(a)
        history = [(r.seq, r.kind, r.undone_by) for r in a.corrections.recent(ADMIN, 100)]
        hidden = {(h.sop_uid, h.by) for h in a.corrections.hidden(ADMIN)}
        digests = stored_digests(a)

        a = wipe_index(a, settings, database)
        assert answers(a) == {lv.value: [] for lv in Level}
        assert rebuild(a) == 6
        assert answers(a) == before
        assert [(r.seq, r.kind, r.undone_by) for r in a.corrections.recent(ADMIN, 100)] == history
        assert {(h.sop_uid, h.by) for h in a.corrections.hidden(ADMIN)} == hidden
        assert a.corrections.seen("hl7:ADT|H|M1") == ("applied", hl7.correction.seq)
        assert stored_digests(a) == digests
        assert rebuild(a) == 0  # nothing more the second time
        nxt = a.corrections.update_patient(ADMIN, PatientRef("P0000002"), {"PatientSex": "M"}, "f")
        assert nxt.seq == 7  # numbering goes on after the rebuilt history
    finally:
        a.close()


# ---------------------------------------------------------------- durability


def test_a_pending_correction_is_finished_before_the_next(archive: Archive) -> None:
    """A crash after a correction was recorded pending (its document not yet on the sites):
    whoever takes the lock next finishes it first, so the order stays as numbered."""
    from pacsgrid.archive.correction_plans import Request, plan_merge
    from pacsgrid.correction import Who

    req = Request(Who(user="crashed", via="cli"), "2024-01-01T00:00:00Z", "crash")
    with index_of(archive).corrections_lock():
        c = plan_merge(
            index_of(archive), 1, req, PatientRef("P0000000"), PatientRef("P0000001"), {}
        )
        assert c is not None
        index_of(archive).add_pending_correction(c)  # ... and the process died here
    assert studies_of(archive, "P0000000")  # not applied yet
    assert sites_of(archive)[0].stat(doc_key(1)) is None
    out = archive.corrections.update_patient(
        ADMIN, PatientRef("P0000001"), {"PatientSex": "O"}, "x"
    )
    assert out.seq == 2
    assert not studies_of(archive, "P0000000") and len(studies_of(archive, "P0000001")) == 4
    assert sites_of(archive)[0].get(doc_key(1)) == c.to_json()
    assert [r.state for r in archive.corrections.recent(ADMIN)] == ["applied", "applied"]


def test_below_the_write_quorum_a_correction_waits_for_the_sites(
    tmp_path: Path, files: list[Path]
) -> None:
    settings = settings_for(tmp_path, sites=2, **{"replication.copies": 2, QUORUM: 2})
    a = Archive(settings, probe_interval=0)
    try:
        for p in files[:6]:
            a.ingest_file(p.read_bytes(), ADMIN)
        site1 = tmp_path / "site1"
        site1.rename(tmp_path / "site1-unmounted")  # the volume goes away
        a.probe()
        before = answers(a)
        with pytest.raises(QuorumNotMet, match="once the sites take it"):
            a.corrections.update_patient(ADMIN, PatientRef("P0000000"), {"PatientSex": "O"}, "x")
        assert answers(a) == before
        assert [r.state for r in a.corrections.recent(ADMIN)] == ["pending"]
        (tmp_path / "site1-unmounted").rename(site1)
        a.probe()
        assert a.corrections.recover() == 1  # as at the next start
        assert [r.state for r in a.corrections.recent(ADMIN)] == ["applied"]
        assert answers(a) != before
        for site in sites_of(a):
            assert Correction.from_json(site.get(doc_key(1))).seq == 1
    finally:
        a.close()


def test_documents_reach_a_site_that_was_down(tmp_path: Path, files: list[Path]) -> None:
    settings = settings_for(tmp_path, sites=2, **{"replication.copies": 2, QUORUM: 1})
    a = Archive(settings, probe_interval=0)
    try:
        for p in files[:6]:
            a.ingest_file(p.read_bytes(), ADMIN)
        (tmp_path / "site1").rename(tmp_path / "site1-away")
        a.probe()
        out = a.corrections.update_patient(ADMIN, PatientRef("P0000000"), {"PatientSex": "O"}, "x")
        assert out.correction is not None
        assert a.corrections.recent(ADMIN)[0].missing == ("s1",)
        (tmp_path / "site1-away").rename(tmp_path / "site1")
        a.probe()  # the site is up again: it gets what it missed
        assert a.corrections.recent(ADMIN)[0].missing == ()
        assert sites_of(a)[1].get(doc_key(1)) == out.correction.to_json()
    finally:
        a.close()


def test_an_index_behind_the_sites_refuses_new_corrections(
    tmp_path: Path, files: list[Path]
) -> None:
    """An index restored from a backup older than a correction must not number a new one
    over it: reindex first."""
    settings = settings_for(tmp_path)
    a = Archive(settings, probe_interval=0)
    try:
        for p in files[:12]:
            a.ingest_file(p.read_bytes(), ADMIN)
        a.close()
        backup = tmp_path / "backup.sqlite"
        shutil.copy(settings.data_dir / "index.sqlite", backup)
        a = Archive(settings, probe_interval=0)
        a.corrections.update_patient(ADMIN, PatientRef("P0000000"), {"PatientSex": "O"}, "x")
        a.close()
        for f in settings.data_dir.glob("index.sqlite*"):
            f.unlink()
        shutil.copy(backup, settings.data_dir / "index.sqlite")
        a = Archive(settings, probe_interval=0)
        with pytest.raises(CorrectionConflict, match="reindex"):
            a.corrections.update_patient(ADMIN, PatientRef("P0000001"), {"PatientSex": "O"}, "y")
        assert rebuild(a) == 1
        out = a.corrections.update_patient(ADMIN, PatientRef("P0000001"), {"PatientSex": "O"}, "y")
        assert out.seq == 2
    finally:
        a.close()


# ---------------------------------------------------------------- the retention policy


def test_purge_deletes_only_what_the_policy_allows_and_confirms(
    tmp_path: Path, files: list[Path]
) -> None:
    """The archive's one deletion: the objects of a 113039 rejection, only with
    retention.purge_rejected, after retention.purge_after_days, with the code of the list."""
    study = by_study(files)
    s0, s1 = sorted(study)[:2]

    def archive(**values: object) -> Archive:
        s = settings_for(tmp_path, sites=2, **{"replication.copies": 2, QUORUM: 2, **values})
        return Archive(s, probe_interval=0)

    a = archive()
    try:
        for p in files[:12]:
            a.ingest_file(p.read_bytes(), ADMIN)
        expired = rejection_note(tmp_path / "expired.dcm", study[s0][3:], "113039")
        quality = rejection_note(tmp_path / "quality.dcm", study[s1][3:], "113001")
        a.ingest_file(expired.read_bytes(), ADMIN)
        a.ingest_file(quality.read_bytes(), ADMIN)
        rows = {r.doc.request["code"]: r.seq for r in a.corrections.recent(ADMIN)}
        digests = stored_digests(a)
        plan = a.corrections.purge_plan(ADMIN, rows["113039"])
        assert len(plan.instances) == 3 and "purge_after_days" in plan.refusal
        with pytest.raises(CorrectionConflict, match="purge_after_days"):
            a.corrections.purge(ADMIN, rows["113039"], plan.code, "expired")
    finally:
        a.close()

    a = archive(**{"retention.purge_after_days": 0})
    try:
        plan = a.corrections.purge_plan(ADMIN, rows["113039"])
        assert "purge_rejected is off" in plan.refusal  # the policy must be turned on
        with pytest.raises(CorrectionConflict, match="off"):
            a.corrections.purge(ADMIN, rows["113039"], plan.code, "expired")
    finally:
        a.close()

    a = archive(**{"retention.purge_after_days": 0, "retention.purge_rejected": True})
    try:
        assert "113039" in a.corrections.purge_plan(ADMIN, rows["113001"]).refusal
        with pytest.raises(CorrectionConflict, match="113039"):
            a.corrections.purge(ADMIN, rows["113001"], "", "quality")
        plan = a.corrections.purge_plan(ADMIN, rows["113039"])
        assert plan.refusal == ""
        with pytest.raises(CorrectionConflict, match="confirmation code"):
            a.corrections.purge(ADMIN, rows["113039"], "0" * 12, "expired")
        assert stored_digests(a) == digests  # nothing deleted so far, on any site

        done = a.corrections.purge(ADMIN, rows["113039"], plan.code, "retention expired")
        assert done.correction is not None and len(done.correction.purge) == 3
        gone = {f"{c.site}:{c.key}" for r in plan.instances for c in r.copies}
        assert len(gone) == 6  # three objects, two copies each
        assert set(digests) - set(stored_digests(a)) == gone
        assert all(a.instance(r.sop_uid) is None for r in plan.instances)
        with pytest.raises(CorrectionConflict, match="cannot be undone"):
            a.corrections.undo(ADMIN, done.correction.seq, "oops")
        with pytest.raises(CorrectionConflict, match="later corrections"):
            a.corrections.undo(ADMIN, rows["113039"], "oops")
        before = answers(a)
        a = wipe_index(a, a.settings, "")
        assert rebuild(a) == 3  # two rejections and the purge
        assert answers(a) == before
    finally:
        a.close()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pacsgrid.archive import Archive, Caller
    from pacsgrid.archive.correction_plans import PatientRef
    from pacsgrid.settings import Overrides, load_settings
    a = Archive(load_settings(Overrides(data_dir=Path(sys.argv[1])), environ={}), probe_interval=0)
    for path in sys.argv[2:]:
        a.ingest_file(Path(path).read_bytes(), Caller(via="cli"))
    out = a.corrections.update_patient(
        Caller(via="cli"), PatientRef("P0000000"), {"PatientSex": "O"}, "before the crash"
    )
    print("acknowledged", out.seq, flush=True)
    time.sleep(3600)  # killed before any checkpoint
    """
)


def test_recovery_rewrites_a_correction_document_a_power_cut_lost(
    tmp_path: Path, files: list[Path]
) -> None:
    """A correction was acknowledged, then the process died before a checkpoint flushed its
    document's file: the site's log has it, and recovery writes the file again."""
    data = tmp_path / "archive"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(data), *map(str, files[:6])],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["acknowledged", "1"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    doc = data / "objects" / doc_key(1)
    written = doc.read_bytes()
    doc.unlink()  # its name never reached the disk
    a = Archive(settings_for(tmp_path), probe_interval=0)
    try:
        report = a.recover()
        assert report.rewritten == 1
        assert doc.read_bytes() == written
        assert Correction.from_json(written).seq == 1
        assert [r.state for r in a.corrections.recent(ADMIN)] == ["applied"]
    finally:
        a.close()


def test_hl7_is_refused_while_the_sites_cannot_take_it_and_applied_once_they_can(
    tmp_path: Path, files: list[Path]
) -> None:
    """AR (send it again) while the write quorum is missing; once the site is back the message
    is applied exactly once, however often it is sent again."""
    from pacsgrid.hl7.adt import answer
    from tests.iocm import adt

    a = Archive(settings_for(tmp_path), probe_interval=0)
    try:
        for p in files[:12]:
            a.ingest_file(p.read_bytes(), ADMIN)
        site = tmp_path / "archive" / "objects"
        site.rename(tmp_path / "unmounted")
        a.probe()
        message = adt("A40", "Q-1", "P0000001", merged_id="P0000000")
        ack = answer(a, message, "127.0.0.1")
        assert "MSA|AR|Q-1|the archive cannot apply it now" in ack
        (tmp_path / "unmounted").rename(site)
        a.probe()
        # The refused message was recorded (pending): it takes effect before anything else
        # once the site is back, and the copy sent again is answered with that.
        again = answer(a, message, "127.0.0.1")
        assert "MSA|AA|Q-1|" in again and "correction #1" in again
        assert "not applied again" in answer(a, message, "127.0.0.1")
        assert [r.state for r in a.corrections.recent(ADMIN)] == ["applied"]
        assert studies_of(a, "P0000000") == set()
    finally:
        a.close()
