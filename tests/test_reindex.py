"""Reindex, reconcile, backup and restore on a real archive (in-process Archive, real
filesystem sites, real SQLite files and a real PostgreSQL server)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bench import synth
from pacsgrid.archive import LOCAL, Archive
from pacsgrid.index import Query, open_index
from pacsgrid.jobs.backup import BackupSchedule, Manifest, backup, backups, restore
from pacsgrid.jobs.reindex import Reindexer
from pacsgrid.model import Level
from pacsgrid.node import reindexer
from pacsgrid.progress import Progress
from pacsgrid.settings import Overrides, Settings, load_settings
from pacsgrid.storage import open_site


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    return synth.write(synth.Spec(studies=8, series=2, instances=6, size=16), out)


def make_settings(tmp_path: Path, database: str = "", **backup: object) -> Settings:
    s = load_settings(Overrides(data_dir=tmp_path / "archive", database=database or None), {})
    if backup:
        s = dataclasses.replace(s, backup=dataclasses.replace(s.backup, **backup))  # type: ignore[arg-type]
    return s


def store(settings: Settings, paths: list[Path]) -> None:
    archive = Archive(settings, probe_interval=0)
    try:
        for p in paths:
            archive.ingest_file(p.read_bytes(), LOCAL)
    finally:
        archive.close()


def answers(url: str) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    """Every level's C-FIND answer (all attributes), as sorted tuples."""
    ix = open_index(url)
    try:
        return {
            lv.value: sorted(tuple(sorted(r.items())) for r in ix.find(Query(lv))) for lv in Level
        }
    finally:
        ix.close()


def reindex(
    settings: Settings, *, reconcile: bool = False, stop_after: int = 0, jobs: int = 2
) -> Reindexer:
    archive = Archive(settings, probe_interval=0)
    stop = threading.Event()

    class Stopping(Progress):
        def advance(self, outcome: str, nbytes: int = 0) -> None:
            super().advance(outcome, nbytes)
            if stop_after and self.done >= stop_after:
                stop.set()

    try:
        job = reindexer(
            archive,
            settings.sites,
            jobs=jobs,
            progress=Stopping("reindex", bar=False),
            stop=stop,
        )
        job.run(reconcile=reconcile)
        return job
    finally:
        archive.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("pg_url"))


def drop_index(settings: Settings, pg_server: object | None) -> None:
    url = settings.database_url
    if url.startswith("sqlite:"):
        for p in settings.data_dir.glob("index.sqlite*"):
            p.unlink()
    else:
        name = url.split("dbname=")[1].split()[0]
        pg_server.drop_db(name)  # type: ignore[union-attr]
        pg_server.create_db(name)  # type: ignore[union-attr]


@pytest.mark.slow
def test_lost_index_is_rebuilt_with_the_same_answers(
    tmp_path: Path, files: list[Path], database: str, request: pytest.FixtureRequest
) -> None:
    settings = make_settings(tmp_path, database)
    store(settings, files)
    before = answers(settings.database_url)
    pg = request.getfixturevalue("pg_server") if database else None
    drop_index(settings, pg)
    assert answers(settings.database_url)["IMAGE"] == []
    job = reindex(settings)
    assert (job.report.indexed, job.report.unreadable) == (len(files), [])
    assert answers(settings.database_url) == before
    again = reindex(settings)  # idempotent: nothing new, nothing changed
    assert (again.report.indexed, again.report.already) == (0, len(files))
    assert answers(settings.database_url) == before


def test_interrupted_reindex_resumes(
    tmp_path: Path, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pacsgrid.jobs.reindex.COMMIT_BATCH", 10)
    monkeypatch.setattr("pacsgrid.jobs.reindex.CHUNK", 8)
    settings = make_settings(tmp_path)
    store(settings, files)
    before = answers(settings.database_url)
    drop_index(settings, None)
    first = reindex(settings, stop_after=20, jobs=1)
    assert first.report.interrupted
    assert 0 < first.report.indexed < len(files)
    second = reindex(settings)
    assert second.report.already == first.report.indexed
    assert first.report.indexed + second.report.indexed == len(files)
    assert answers(settings.database_url) == before


def test_objects_are_filed_in_the_order_they_were_stored(tmp_path: Path, files: list[Path]) -> None:
    """The first instance of a study stored decides its patient's attributes, after a
    reindex too: objects are filed by their modification time, not by their keys."""
    import io
    import os

    from pydicom import dcmread

    from pacsgrid.storage import object_key

    a, b = dcmread(files[0]), dcmread(files[1])
    assert a.StudyInstanceUID == b.StudyInstanceUID
    paths = []
    for ds, name, sop in ((a, "FIRST^NAME", "1.2.3.9"), (b, "OTHER^NAME", "1.2.3.10")):
        # The later object's key ("...1.2.3.10.dcm") sorts before the earlier one's.
        ds.PatientName, ds.SOPInstanceUID = name, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = tmp_path / f"{sop}.dcm"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    settings = make_settings(tmp_path)
    store(settings, paths)
    site = Path(settings.sites[0].url.removeprefix("file://"))
    stored = [
        site / object_key(a.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for ds in (a, b)
    ]
    assert all(p.exists() for p in stored)

    def patient_after_reindex(older: Path, newer: Path) -> str:
        os.utime(older, (1_700_000_000, 1_700_000_000))
        os.utime(newer, (1_700_000_100, 1_700_000_100))
        drop_index(settings, None)
        assert reindex(settings).report.indexed == 2
        (row,) = answers(settings.database_url)["PATIENT"]
        return dict(row)["PatientName"]

    assert patient_after_reindex(stored[0], stored[1]) == "FIRST^NAME"
    assert patient_after_reindex(stored[1], stored[0]) == "OTHER^NAME"


def test_reconcile_reports_rows_without_objects_and_deletes_nothing(
    tmp_path: Path, files: list[Path]
) -> None:
    settings = make_settings(tmp_path)
    store(settings, files)
    ix = open_index(settings.database_url)
    rec = ix.instances(Query(Level.IMAGE))[0]
    ix.close()
    site_root = settings.data_dir / "objects"
    moved = tmp_path / "moved.dcm"
    shutil.move(site_root / rec.copies[0].key, moved)  # the object vanished from its site
    job = reindex(settings, reconcile=True)
    assert [sop for sop, _ in job.report.orphans] == [rec.sop_uid]
    assert job.report.missing_copies == [(rec.sop_uid, "local", rec.copies[0].key)]
    ix = open_index(settings.database_url)
    assert ix.has_instance(rec.sop_uid)  # reported, never deleted
    ix.close()


def test_unreadable_object_is_reported_not_fatal(tmp_path: Path, files: list[Path]) -> None:
    settings = make_settings(tmp_path)
    store(settings, files[:5])
    drop_index(settings, None)
    bad = settings.data_dir / "objects" / "1.2.3" / "1.2.3.4" / "broken.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    job = reindex(settings)
    assert job.report.indexed == 5
    assert [k for _, k, _ in job.report.unreadable] == ["1.2.3/1.2.3.4/broken.dcm"]


class _Refusing:
    """The archive's own index, refusing every batch that holds one given instance (a row
    the database will not take)."""

    def __init__(self, index: Any, sops: set[str]) -> None:
        self.index = index
        self.sops = sops
        self.batches: list[int] = []

    def add_batch(self, items: Any, *, durable: bool = True) -> Any:
        self.batches.append(len(items))
        refused = [i.sop_uid for i in items if i.sop_uid in self.sops]
        if refused:
            raise ValueError(f"refused {refused[0]}")
        return self.index.add_batch(items, durable=durable)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("refused", [1, "all"])
def test_a_row_the_index_refuses_costs_only_that_object(
    tmp_path: Path, files: list[Path], refused: int | str
) -> None:
    """A batch the index refuses is committed again one object at a time: only the refused
    one is left out and reported (with its site, key and why), and the others are indexed.
    If every object of the batch is refused, the index itself is the problem: the reindex
    stops with the error, and a rerun resumes."""
    settings = make_settings(tmp_path)
    store(settings, files[:6])
    drop_index(settings, None)
    sops = {_sop(f) for f in files[:6]}
    bad = {_sop(files[2])} if refused == 1 else sops
    real = open_index(settings.database_url)
    try:
        index = _Refusing(real, bad)
        job = Reindexer(
            index,  # type: ignore[arg-type]
            [open_site(s) for s in settings.sites],
            settings.sites,
            jobs=1,
            progress=Progress("reindex", bar=False),
        )
        if refused == "all":
            with pytest.raises(ValueError, match="refused"):
                job.run()
            return
        report = job.run()
        assert index.batches == [6, 1, 1, 1, 1, 1, 1]  # the batch, then one by one
        assert report.indexed == 5
        [(site, key, why)] = report.unreadable
        assert site == settings.sites[0].name and key.endswith(".dcm")
        assert why == f"index refused it: refused {_sop(files[2])}"
        assert key.split("/")[-1].removesuffix(".dcm") == _sop(files[2])
        assert {r["SOPInstanceUID"] for r in real.find(Query(Level.IMAGE))} == sops - bad
    finally:
        real.close()


def test_reindex_while_the_archive_ingests(
    tmp_path: Path, files: list[Path], database: str
) -> None:
    """Stores keep being acknowledged while a reindex runs on the same index; afterwards
    every stored instance is indexed exactly once."""
    settings = make_settings(tmp_path, database)
    store(settings, files[: len(files) // 2])
    archive = Archive(settings, probe_interval=0)
    outcomes: list[str] = []

    def ingest() -> None:
        for p in files[len(files) // 2 :]:
            outcomes.append(archive.ingest_file(p.read_bytes(), LOCAL).outcome)

    t = threading.Thread(target=ingest)
    t.start()
    try:
        for _ in range(3):
            reindex(settings)
    finally:
        t.join(120)
        archive.close()
    assert (
        set(outcomes) <= {"stored", "duplicate"} and len(outcomes) == len(files) - len(files) // 2
    )
    ix = open_index(settings.database_url)
    try:
        assert ix.stats().instances == len(files)
        assert all(len(r.copies) == 1 for r in ix.instances(Query(Level.IMAGE)))
    finally:
        ix.close()


# ---------------------------------------------------------------- backup and restore


@pytest.mark.slow
def test_backup_restore_reconcile(
    tmp_path: Path, files: list[Path], database: str, request: pytest.FixtureRequest
) -> None:
    settings = make_settings(tmp_path, database)
    store(settings, files[:30])
    m = backup(settings)
    assert m.verified and m.counts["instance"] == 30 and m.verify_counts == m.counts
    store(settings, files[30:])  # after the backup point
    if database:
        pg = request.getfixturevalue("pg_server")
        target = pg.create_db("restored_" + str(abs(hash(str(tmp_path))))[:8])
    else:
        target = f"sqlite:///{tmp_path / 'restored.sqlite'}"
    restored = dataclasses.replace(settings, database=target)
    restore(restored, settings.backup_dir / m.name)
    ix = open_index(target)
    assert ix.stats().instances == 30  # the backup point
    ix.close()
    job = reindex(restored, reconcile=True)
    assert job.report.indexed == len(files) - 30 and not job.report.orphans
    assert answers(target) == answers(settings.database_url)
    with pytest.raises(Exception, match=r"exists|not empty"):
        restore(restored, settings.backup_dir / m.name)  # never over a live index


def test_backups_are_rotated_and_damage_is_detected(tmp_path: Path, files: list[Path]) -> None:
    settings = make_settings(tmp_path, keep=2)
    store(settings, files[:3])
    names = [backup(settings).name for _ in range(4)]
    kept = [m.name for m in backups(settings.backup_dir)]
    assert kept == names[-2:]
    path = settings.backup_dir / kept[-1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="SHA-256"):
        restore(dataclasses.replace(settings, database=f"sqlite:///{tmp_path}/x.sqlite"), path)


def test_backup_schedule_runs_on_one_node_per_period(tmp_path: Path, files: list[Path]) -> None:
    """Two nodes' schedules on one index: each period's backup is taken once."""
    settings = make_settings(tmp_path, interval=1.0)  # hourly
    store(settings, files[:2])
    ix1, ix2 = open_index(settings.database_url), open_index(settings.database_url)
    asked = {id(ix1): 0, id(ix2): 0}

    class Asking:
        """The real index, counting how often a schedule asked it for the period's lease."""

        def __init__(self, index: Any) -> None:
            self.index = index

        def lease_job(self, name: str, owner: str, every: float) -> bool:
            asked[id(self.index)] += 1
            return bool(self.index.lease_job(name, owner, every))

    a = BackupSchedule(settings, Asking(ix1), tick=0.05)  # type: ignore[arg-type]
    b = BackupSchedule(settings, Asking(ix2), tick=0.05)  # type: ignore[arg-type]

    async def both() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(a.run(stop)), asyncio.create_task(b.run(stop))]
        # Until one backup is done, and then each schedule has asked for the lease three
        # more times (a second backup in this period would have been taken by then).
        deadline = asyncio.get_running_loop().time() + 120
        while not a.taken + b.taken:
            assert asyncio.get_running_loop().time() < deadline, "no backup taken"
            await asyncio.sleep(0.05)
        asked.update({k: 0 for k in asked})
        while min(asked.values()) < 3:
            assert asyncio.get_running_loop().time() < deadline, asked
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(both())
    finally:
        ix1.close()
        ix2.close()
    assert a.taken + b.taken == 1
    assert len(backups(settings.backup_dir)) == 1


@pytest.mark.slow
def test_a_failed_scheduled_backup_is_logged_and_taken_next_period(tmp_path: Path) -> None:
    """docs/operations.md: a scheduled backup that fails is logged as an error and tried
    again at the next period. `serve` with a backup every 1.8 s, its backup folder blocked (a
    file where the folder should be, as on a backup disk that is not mounted), then
    unblocked."""
    from tests.conftest import Server
    from tests.waiting import wait_until

    blocked = tmp_path / "backup-disk"
    blocked.write_text("not a folder\n")
    folder = blocked / "pacsgrid"
    server = Server(
        tmp_path / "archive",
        env={"PACSGRID_BACKUP_INTERVAL": "0.0005", "PACSGRID_BACKUP_DIR": str(folder)},
    ).start()
    try:
        wait_until(
            lambda: "ERROR" in server.text() and "backup" in server.text(),
            120,
            "the failed backup logged as an error",
            seen=lambda: server.text()[-2000:],
        )
        errors = [line for line in server.text().splitlines() if " ERROR " in line]
        assert any("backup" in line for line in errors), errors
        assert not folder.exists()
        blocked.unlink()  # the disk is back
        wait_until(
            lambda: len(backups(folder)) >= 1 if folder.is_dir() else False,
            120,
            "a backup taken at a later period",
            seen=lambda: server.text()[-2000:],
        )
        assert server.proc is not None and server.proc.poll() is None  # still serving
    finally:
        server.stop()
    [m, *_] = backups(folder)
    assert m.verified
    assert "scheduled backup done" in server.text()


@pytest.mark.slow
def test_cli_backup_list_and_restore(tmp_path: Path, files: list[Path]) -> None:
    settings = make_settings(tmp_path)
    store(settings, files[:4])
    base = [sys.executable, "-m", "pacsgrid"]
    d = ["--data-dir", str(settings.data_dir)]
    out = subprocess.run([*base, "backup", *d], capture_output=True, text=True, check=True)
    assert "verified" in out.stdout
    listing = subprocess.run(
        [*base, "backup", "--list", *d], capture_output=True, text=True, check=True
    )
    assert "4 instances" in listing.stdout
    [m] = backups(settings.backup_dir)
    assert isinstance(m, Manifest)
    target = tmp_path / "r.sqlite"
    out = subprocess.run(
        [
            *base,
            "restore",
            *d,
            "--database",
            f"sqlite:///{target}",
            str(settings.backup_dir / m.name),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "reindex --reconcile" in out.stdout
    refused = subprocess.run(
        [*base, "restore", *d, str(settings.backup_dir / m.name)], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "--force" in refused.stderr
