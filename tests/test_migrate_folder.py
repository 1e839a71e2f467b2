"""`pacsgrid migrate folder` and `pacsgrid verify --folder` on a real tree: the shared corpus
(any names, nested, with and without preamble) mixed with junk files, then changed, grown,
shrunk and interrupted between passes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from pacsgrid.archive import Archive
from pacsgrid.migrate.folder import migrate_pass, parse_duration, source_key
from pacsgrid.migrate.verify import CONFLICT, verify_folder, write_report
from pacsgrid.migration_ledger import DUPLICATE, FAILED, REMOVED, SKIPPED, STORED
from pacsgrid.progress import Progress
from pacsgrid.settings import Overrides, load_settings
from tests.corpus import accepted, corpus, invalid
from tests.waiting import wait_until


def make_tree(root: Path) -> dict[str, Path]:
    """A legacy folder: the corpus under nested, renamed paths, plus junk."""
    files: dict[str, Path] = {}
    for i, f in enumerate(corpus()):
        rel = f"{i % 3}/{'x' * (i % 2)}dir{i % 5}/{f.path.name}.{i}"
        if f.path.name.upper() == "DICOMDIR":
            rel = f"cd{i}/DICOMDIR"
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, dest)
        files[rel] = f.path
    (root / "notes.txt").write_text("scanned 2004, see the paper log\n")
    (root / "empty.dcm").write_bytes(b"")
    (root / "0" / "Thumbs.db").write_bytes(os.urandom(3000))
    return files


def archive_at(data_dir: Path) -> Archive:
    return Archive(load_settings(Overrides(data_dir=data_dir), environ={}), probe_interval=0)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "legacy"
    make_tree(root)
    return root


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    a = archive_at(tmp_path / "archive")
    yield a
    a.close()


def test_first_pass_stores_everything_and_lists_junk(tree: Path, archive: Archive) -> None:
    s = migrate_pass(archive, tree, jobs=4)
    n_files = sum(1 for p in tree.rglob("*") if p.is_file())
    assert s.seen == n_files and s.read == n_files and s.unchanged == 0
    accepted_uids = {f.sop_uid for f in accepted()}
    # Same-UID copies in the corpus are duplicates; a few invalid files are tolerated.
    assert len(accepted_uids) <= s.stored <= len(accepted_uids) + len(invalid())
    assert archive.has_instances(sorted(accepted_uids)) == accepted_uids
    assert s.skipped.get("DICOMDIR", 0) == sum(1 for f in corpus() if "DICOMDIR" in f.expect)
    assert s.skipped.get("not DICOM", 0) >= 3  # notes.txt, empty.dcm, Thumbs.db
    # Everything invalid is either refused with a reason or tolerated: nothing vanishes.
    assert len(s.failed) + s.stored + s.duplicates + sum(s.skipped.values()) == n_files
    assert all(reason for _, reason in s.failed)
    assert len(s.failed) <= len(invalid())
    ledger = archive.folder_ledger(source_key(tree))
    assert len(ledger) == n_files
    assert {e.state for e in ledger.values()} <= {STORED, DUPLICATE, SKIPPED, FAILED}
    assert all(len(e.sha256) == 64 for e in ledger.values())
    stored = [e for e in ledger.values() if e.state == STORED]
    assert {e.sop_uid for e in stored} >= accepted_uids
    assert len(stored) == s.stored
    print(f"\nfirst pass: {s.read} files, {s.files_per_second:.0f} files/s, {len(s.failed)} failed")


def test_second_pass_reads_only_new_and_changed_files(tree: Path, archive: Archive) -> None:
    first = migrate_pass(archive, tree, jobs=4)
    again = migrate_pass(archive, tree, jobs=4)
    assert again.read == 0 and again.unchanged == first.seen and not again.failed
    assert again.failed_before == len(first.failed)  # listed, not retried

    # A new file (a new instance), a changed file (new bytes, new UID), a touched file.
    template = next(f for f in accepted() if f.transfer_syntax == "1.2.840.10008.1.2.1")
    ds = pydicom.dcmread(template.path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    new_uid = ds.SOPInstanceUID
    (tree / "new").mkdir()
    ds.save_as(tree / "new" / "late-arrival.dcm")
    ledger = archive.folder_ledger(source_key(tree))
    changed_rel = next(rel for rel, e in ledger.items() if e.state == STORED)
    ds2 = pydicom.dcmread(tree / changed_rel, force=True)
    ds2.SOPInstanceUID = pydicom.uid.generate_uid()
    ds2.save_as(tree / changed_rel)
    touched_rel = next(rel for rel, e in ledger.items() if e.state == STORED and rel != changed_rel)
    os.utime(tree / touched_rel, ns=(1, 1_000_000_000))

    third = migrate_pass(archive, tree, jobs=4)
    assert third.read == 3, third
    assert sorted(third.changed) == sorted([changed_rel, touched_rel])
    assert third.stored == 2  # the new file and the changed one
    assert third.same_content == 1  # the touched one: same bytes, nothing ingested
    assert archive.has_instances([new_uid, ds2.SOPInstanceUID]) == {new_uid, ds2.SOPInstanceUID}
    assert migrate_pass(archive, tree).read == 0


def test_removed_file_is_reported_and_stays_in_the_archive(
    tree: Path, archive: Archive, tmp_path: Path
) -> None:
    migrate_pass(archive, tree, jobs=4)
    ledger = archive.folder_ledger(source_key(tree))
    rel, entry = next((r, e) for r, e in sorted(ledger.items()) if e.state == STORED)
    (tree / rel).unlink()
    s = migrate_pass(archive, tree)
    assert s.removed == [rel] and s.read == 0
    assert archive.folder_ledger(source_key(tree))[rel].state == REMOVED
    record = archive.instance(entry.sop_uid)
    assert record is not None, "a file removed from the source must stay in the archive"
    assert archive.read(record).data  # its object is still readable
    assert migrate_pass(archive, tree).removed == []  # reported once


def test_interrupted_pass_resumes_without_reading_twice(tree: Path, archive: Archive) -> None:
    stop = threading.Event()

    class StopAfter(Progress):
        def advance(self, outcome: str, nbytes: int = 0) -> None:
            super().advance(outcome, nbytes)
            if self.done >= 40:
                stop.set()

    first = migrate_pass(archive, tree, jobs=2, stop=stop, progress=StopAfter("t", bar=False))
    assert first.interrupted and 40 <= first.read < first.seen
    rest = migrate_pass(archive, tree, jobs=2)
    assert not rest.interrupted
    assert first.read + rest.read == first.seen  # every file read exactly once
    accepted_uids = {f.sop_uid for f in accepted()}
    assert archive.has_instances(sorted(accepted_uids)) == accepted_uids


def test_verify_folder_finds_missing_and_mismatched(
    tree: Path, archive: Archive, tmp_path: Path
) -> None:
    migrate_pass(archive, tree, jobs=4)
    report = verify_folder(archive, tree, jobs=2)
    assert report.count("missing") == 0 and report.count("mismatch") == 0, report.findings[:5]
    assert report.ok and report.present == report.instances > 0
    # The corpus holds a few objects twice under one UID (other syntax, other pixels).
    assert all(CONFLICT in f.detail for f in report.findings if f.kind == "conflict")

    # A file that never made it, and one whose pixel data changed after migration.
    template = next(
        f for f in accepted() if f.transfer_syntax == "1.2.840.10008.1.2.1" and f.sop_class_uid
    )
    ds = pydicom.dcmread(template.path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tree / "never-migrated.dcm")
    ledger = archive.folder_ledger(source_key(tree))
    per_uid = Counter(e.sop_uid for e in ledger.values())
    victim = next(
        rel
        for rel, e in sorted(ledger.items())
        if e.state == STORED
        and per_uid[e.sop_uid] == 1
        and "PixelData" in pydicom.dcmread(tree / rel, force=True)
    )
    ds2 = pydicom.dcmread(tree / victim, force=True)
    raw = bytearray(ds2.PixelData)
    raw[len(raw) // 2] ^= 0xFF
    ds2.PixelData = bytes(raw)
    ds2.save_as(tree / victim)
    report = verify_folder(archive, tree, jobs=2)
    assert not report.ok
    assert [f.sop_uid for f in report.findings if f.kind == "missing"] == [ds.SOPInstanceUID]
    assert [f.source_item for f in report.findings if f.kind == "mismatch"] == [victim]
    csv_path, md_path = write_report(report, tmp_path / "report")
    assert ds.SOPInstanceUID in csv_path.read_text()
    assert "FAIL" in md_path.read_text().splitlines()[0]


@pytest.mark.slow
def test_cli_migrate_folder_and_verify(tree: Path, tmp_path: Path) -> None:
    data = tmp_path / "cli-archive"
    cmd = [sys.executable, "-m", "pacsgrid"]
    run = subprocess.run(
        [*cmd, "migrate", "folder", "--data-dir", str(data), str(tree), "--jobs", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    assert "files/s" in out and "MB/s" in out, out + run.stderr
    assert run.returncode in (0, 1)  # 1: some corpus files are refused, and listed
    assert ("failed: " in out) == (run.returncode == 1)
    again = subprocess.run(
        [*cmd, "migrate", "folder", "--data-dir", str(data), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert " 0 read " in again.stdout, again.stdout
    verify = subprocess.run(
        [*cmd, "verify", "--data-dir", str(data), "--folder", str(tree), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "| missing | 0 |" in verify.stdout, verify.stdout + verify.stderr
    assert (tmp_path / "verify.csv").is_file()
    bad = subprocess.run(
        [*cmd, "migrate", "folder", "--data-dir", str(data), str(tree), "--every", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--every" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.slow
def test_every_repeats_passes_until_stopped(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "every.log"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacsgrid", "migrate", "folder", "--data-dir"]
            + [str(tmp_path / "a"), str(tree), "--every", "1s"],
            stdout=fh,
            stderr=subprocess.DEVNULL,
        )
    try:
        wait_until(
            lambda: out.read_text().count("pass over") >= 3,
            120,
            "three passes of migrate folder --every 1s",
            seen=lambda: out.read_text()[-2000:],
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    passes = [line for line in text.splitlines() if "pass over" in line]
    assert len(passes) >= 3, text
    assert all(" 0 read " in line for line in passes[1:])  # later passes read nothing
    assert code in (0, 1), text  # 1: the corpus holds files the archive refuses


def test_parse_duration() -> None:
    assert parse_duration("4h") == 14400 and parse_duration("30m") == 1800
    assert parse_duration("90") == 90 and parse_duration("1d") == 86400


def test_pixel_digest_of_a_deflated_dataset_received_over_the_network() -> None:
    """A Deflated Explicit VR Little Endian dataset arrives as one raw deflate stream; the
    end-to-end check of `verify` must inflate it before comparing pixel data with the
    archived file (it reported every deflated instance as a mismatch)."""
    import pydicom.data

    from pacsgrid.dicomfile.header import DEFLATED_LE
    from pacsgrid.dicomfile.part10 import split_part10
    from pacsgrid.migrate.verify import pixel_digest

    raw = Path(pydicom.data.get_testdata_file("image_dfl.dcm")).read_bytes()
    p10 = split_part10(raw)
    assert p10.transfer_syntax == DEFLATED_LE
    on_the_wire = raw[p10.dataset_offset :]
    from_file = pixel_digest(raw)
    assert len(from_file) == 64  # a real SHA-256, not "unparseable"
    assert pixel_digest(on_the_wire, DEFLATED_LE) == from_file


@pytest.mark.slow
def test_retry_failed_reads_refused_files_again(tmp_path: Path) -> None:
    """docs/migration.md (migrate folder): files the archive refuses are listed with the
    reason and read again only when they change, or with --retry-failed. Here the refusal
    goes away without the files changing: a site needed for the write quorum was unmounted,
    then came back."""
    from bench.synth import Spec, write

    src = tmp_path / "legacy"
    first = write(Spec(studies=1, series=1, instances=3, size=16, seed="retry-a"), src / "a")
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    data = tmp_path / "archive"
    sites = ["--site", f"a={a}", "--site", f"b={b}", "--copies", "2", "--write-quorum", "2"]

    def migrate(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacsgrid", "migrate", "folder", "--data-dir", str(data)]
            + [*sites, str(src), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    run = migrate()
    assert run.returncode == 0 and "stored 3," in run.stdout, run.stdout + run.stderr
    late = write(Spec(studies=1, series=1, instances=2, size=16, seed="retry-b"), src / "b")
    b.rename(tmp_path / "site-b-unmounted")  # the NAS is gone: an empty mount point
    b.mkdir()
    run = migrate()
    assert run.returncode == 1 and "stored 0," in run.stdout and "failed 2" in run.stdout, (
        run.stdout + run.stderr
    )
    assert run.stdout.count("  failed: ") == 2 and "write quorum is 2" in run.stdout, run.stdout
    b.rmdir()
    (tmp_path / "site-b-unmounted").rename(b)  # back, the files unchanged
    run = migrate()
    assert " 0 read " in run.stdout and "stored 0," in run.stdout, run.stdout
    assert "2 file(s) failed in an earlier pass and did not change" in run.stdout, run.stdout
    run = migrate("--retry-failed")
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 2 read " in run.stdout and "stored 2," in run.stdout and "failed 0" in run.stdout
    archive = archive_at(data)
    try:
        uids = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first + late
        }
        assert archive.has_instances(sorted(uids)) == uids
    finally:
        archive.close()
    assert "failed" not in migrate().stdout.split("\n", 1)[1]  # nothing listed any more
