"""A filesystem site's write-ahead log (storage/wal.py) and recovery from it (archive/recovery.py).

Process crashes are real (a child process SIGKILLed after its stores were acknowledged);
what a power cut does to files written without a flush (gone, torn, zeroed) is applied to the
files by hand here, and by the power-cut filesystem in tests/powercut/ for the whole archive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pacsgrid.archive import Archive, Caller
from pacsgrid.archive.recovery import BATCH, Recovery, RecoveryReport, header_of, note_for
from pacsgrid.correction import doc_key
from pacsgrid.dicomfile.header import Header
from pacsgrid.dicomfile.part10 import build_file_meta
from pacsgrid.errors import SiteUnavailable
from pacsgrid.index import Index, NewInstance, open_index
from pacsgrid.journal import IngestJournal
from pacsgrid.model import CopyRecord
from pacsgrid.settings import Overrides, load_settings
from pacsgrid.storage import object_key
from pacsgrid.storage.filesystem import FilesystemSite
from pacsgrid.storage.wal import SiteLog
from pacsgrid.storage.walfile import WAL_DIR
from tests.behind_the_archive import index_of
from tests.test_archive import EXPLICIT, dataset

MODALITY = Caller("MODALITY", "127.0.0.1")


def _site(tmp_path: Path, **kw: int | float) -> FilesystemSite:
    site = FilesystemSite("fs", tmp_path / "site", log_segment_bytes=4 << 20, **kw)  # type: ignore[arg-type]
    site.initialize()
    return site


def _segments(root: Path) -> list[Path]:
    return sorted((root / WAL_DIR).glob("*.seg"))


def test_one_flush_covers_every_record_appended_before_it(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=4 << 20)
    receipts = [
        log.append(f"k{i}", [b"x" * 100], hashlib.sha256(b"x" * 100).hexdigest(), replace=False)
        for i in range(5)
    ]
    flushes = log.flushes
    log.wait(receipts[2])
    assert log.flushes == flushes + 1
    for r in receipts:
        assert r.segment.durable >= r.segment.appended  # the others need no flush of their own
        log.wait(r)
    assert log.flushes == flushes + 1


def test_records_survive_a_process_death_and_stop_at_a_torn_one(tmp_path: Path) -> None:
    site = _site(tmp_path)
    keys = [object_key("1.2", "1.2.3", f"1.2.3.{i}") for i in range(3)]
    for i, key in enumerate(keys):
        site.put(key, [b"DICM", bytes([i]) * 1000])
    assert site.dead_log() == []  # we are alive: our segments are locked
    seg_path = _segments(site.root)[0]
    raw = bytearray(seg_path.read_bytes())
    # Tear the last record's payload: it and nothing after it may be replayed.
    last = raw.rfind(bytes([2]) * 1000)
    raw[last + 500] ^= 0xFF
    assert site._log is not None
    for seg in site._log._segments:  # the process dies: its fds and locks go
        os.close(seg.fd)
    seg_path.write_bytes(bytes(raw))
    dead = FilesystemSite("fs", site.root).dead_log()
    assert [r.key for d in dead for r in d.records()] == keys[:2]
    for d in dead:
        d.close()


def test_checkpoint_frees_segments_for_the_next_process(tmp_path: Path) -> None:
    site = _site(tmp_path)
    site.put(object_key("1.2", "1.2.3", "1.2.3.1"), [b"DICM", b"a" * 5000])
    assert site.log_pending()
    synced = []
    assert site.checkpoint(lambda: synced.append(1), max_age=None) == 1
    assert synced == [1] and not site.log_pending()
    site.close_log()
    before = _segments(site.root)
    again = _site(tmp_path)
    again.put(object_key("1.2", "1.2.3", "1.2.3.2"), [b"DICM", b"b" * 5000])
    assert _segments(site.root) == before  # a free segment was adopted, none created
    assert again.dead_log() == []


def test_a_wiped_site_fails_the_flush_instead_of_trusting_a_deleted_log(tmp_path: Path) -> None:
    site = _site(tmp_path)
    site.put(object_key("1.2", "1.2.3", "1.2.3.1"), [b"DICM"])
    for seg in _segments(site.root):
        seg.unlink()  # the volume was wiped under the running process
    with pytest.raises(
        SiteUnavailable,
        match=r"^site 'fs': write 1\.2/1\.2\.3/1\.2\.3\.2\.dcm: log: .+ "
        r"\(hint: check the mount and the disk\)$",
    ):
        site.put(object_key("1.2", "1.2.3", "1.2.3.2"), [b"DICM"])


# ---------------------------------------------------------------------- recovery of the archive
_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pacsgrid.archive import Archive, Caller
    from pacsgrid.settings import Overrides, load_settings
    from tests.test_archive import EXPLICIT, dataset
    a = Archive(load_settings(Overrides(data_dir=Path(sys.argv[1])), environ={}), probe_interval=0)
    for i in range(int(sys.argv[2])):
        sop = f"7.{i}"
        a.ingest(dataset(sop, series=f"1.2.3.{i % 3}"), EXPLICIT, Caller("MODALITY", "x"))
        print("acknowledged", sop, flush=True)
    time.sleep(3600)  # killed before any checkpoint
    """
)


def _crash_after_stores(tmp_path: Path, n: int) -> Path:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(data), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        acked = [proc.stdout.readline().split()[-1] for _ in range(n)]
        assert acked == [f"7.{i}" for i in range(n)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    return data


def _archive(data: Path) -> Archive:
    return Archive(load_settings(Overrides(data_dir=data), environ={}), probe_interval=0)


def _files(data: Path) -> dict[str, Path]:
    return {p.stem: p for p in (data / "objects").glob("*/*/*.dcm")}


def test_recovery_rewrites_lost_and_torn_files_and_reindexes_from_the_log(tmp_path: Path) -> None:
    """What a power cut can leave of files written without a flush: gone, cut short, zeroed;
    and an index that lost its newest commits (here: all of them)."""
    data = _crash_after_stores(tmp_path, 6)
    files = _files(data)
    expected = {sop: p.read_bytes() for sop, p in files.items()}
    files["7.0"].unlink()  # its name never reached the disk
    files["7.1"].write_bytes(expected["7.1"][:100])  # cut short
    files["7.2"].write_bytes(b"\0" * len(expected["7.2"]))  # size without data
    for suffix in ("", "-wal", "-shm"):
        Path(f"{data}/index.sqlite{suffix}").unlink(missing_ok=True)
    archive = _archive(data)
    try:
        report = archive.recover()
        assert report.records == 6 and report.rewritten == 3 and report.indexed == 6
        for sop, body in expected.items():
            record = archive.instance(sop)
            assert record is not None
            assert archive.read(record).data == body
        assert {p.stem: p.read_bytes() for p in _files(data).values()} == expected
        again = archive.recover()
        assert not again and again.records == 0  # segments freed: nothing to replay twice
    finally:
        archive.close()


def test_recovery_adds_only_what_the_index_lacks(tmp_path: Path) -> None:
    data = _crash_after_stores(tmp_path, 4)
    with sqlite3.connect(data / "index.sqlite") as db:
        pk = db.execute("SELECT pk FROM instance WHERE sop_uid = '7.3'").fetchone()[0]
        db.execute("DELETE FROM copy WHERE instance_pk = ?", (pk,))
    archive = _archive(data)
    try:
        report = archive.recover()
        assert report.records == 4 and report.rewritten == 0
        assert report.indexed == 0 and report.copies == 1
        record = archive.instance("7.3")
        assert record is not None and [c.site for c in record.copies] == ["local"]
        assert index_of(archive).stats().instances == 4
    finally:
        archive.close()


def test_a_replace_in_the_log_wins_over_the_older_object(tmp_path: Path) -> None:
    site = _site(tmp_path)
    key = object_key("1.2", "1.2.3", "1.2.3.9")
    site.put(key, [b"DICM", b"old"])
    site.put(key, [b"DICM", b"new"], replace=True)
    (site.root / key).write_bytes(b"DICM" + b"old")  # the rename did not reach the disk
    assert site._log is not None
    for seg in site._log._segments:
        os.close(seg.fd)
    dead = FilesystemSite("fs", site.root).dead_log()
    recs = [r for d in dead for r in d.records()]
    assert [(r.payload, r.replace) for r in recs] == [(b"DICMold", False), (b"DICMnew", True)]
    for d in dead:
        d.close()


CT = "1.2.840.10008.5.1.4.1.1.2"


def _p10(sop: str, name: str) -> bytes:
    return build_file_meta(CT, sop, EXPLICIT) + dataset(sop, name=name)


class _Replay:
    """Recovery by a new process of what a dead one left in a site's log, into a real index;
    the work it queues for each instance is recorded."""

    def __init__(self, tmp_path: Path, site: FilesystemSite) -> None:
        self.root = site.root
        self.index: Index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
        self.journal = IngestJournal(tmp_path / "journal")
        self.outbox: list[tuple[str, int]] = []
        self.forwards: list[tuple[str, str, str]] = []

    def die(self, site: FilesystemSite) -> None:
        assert site._log is not None
        for seg in site._log._segments:
            os.close(seg.fd)

    def _out(self, sop: str, n: int) -> tuple[tuple[str, str, str], ...]:
        self.outbox.append((sop, n))
        return (("copy", f"{sop}>b", ""),)

    def _fwd(self, h: Header, via: str, ae: str) -> tuple[tuple[str, str, str], ...]:
        self.forwards.append((h.sop_instance_uid, via, ae))
        return ()

    def run(self, role: str = "archive") -> RecoveryReport:
        site = FilesystemSite("fs", self.root, role=role)
        return Recovery([site], self.index, self.journal, self._out, self._fwd).run()

    def kept(self, report: RecoveryReport, key: str, holds: bytes, sop: str, body: bytes) -> None:
        """The one record replayed was refused: the file still holds `holds` and the index
        its row for `sop` with `body`'s digest."""
        assert (report.records, report.rewritten, report.indexed, report.copies) == (1, 0, 0, 0)
        assert (self.root / key).read_bytes() == holds
        known = self.index.instance(sop)
        assert known is not None and known.sha256 == _sha(body)

    def know(self, body: bytes, key: str, stored_at: float) -> None:
        h = header_of(body)
        sha = hashlib.sha256(body).hexdigest()
        copy = CopyRecord("fs", key, len(body), sha, stored_at)
        self.index.add_batch(
            [NewInstance(dict(h.values), h.transfer_syntax, len(body), sha, (copy,), "", True)]
        )


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_recovery_replays_the_newest_replace_and_indexes_it_with_its_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per key the newest `replace` is the object the file must hold, whatever the order the
    records were read in; the index gets it with its copy as the log wrote it, and the work of
    its writer's forwarding rules (the note says who wrote it)."""
    site = _site(tmp_path)
    replay = _Replay(tmp_path, site)
    key = object_key("1.2.3", "1.2.3.4", "7.1")
    bodies = [_p10("7.1", n) for n in ("A^A", "B^B", "C^C", "D^D")]
    site.put(key, [bodies[0]], note=note_for("dimse", "MODALITY"))
    for body in bodies[1:]:
        site.put(key, [body], replace=True, note=note_for("dimse", "MODALITY"))
    (site.root / key).write_bytes(bodies[0])  # the renames did not reach the disk
    replay.die(site)
    dead = FilesystemSite("fs", site.root).dead_log()
    records = {r.sha256: r.time_ns for d in dead for r in d.records()}
    for d in dead:
        d.close()
    before = time.time()
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.recovery"):
        report = replay.run()
    assert (report.records, report.rewritten, report.indexed, report.copies) == (4, 1, 1, 0)
    assert caplog.records[0].getMessage() == f"recovery: {key} on fs rewritten from its log record"
    assert (site.root / key).read_bytes() == bodies[3]
    known = replay.index.instance("7.1")
    assert known is not None and known.sha256 == _sha(bodies[3])
    assert known.attributes["PatientName"] == "D^D"
    (copy,) = known.copies
    assert (copy.site, copy.key, copy.size, copy.state) == ("fs", key, len(bodies[3]), "ok")
    assert copy.stored_at == records[_sha(bodies[3])] / 1e9
    assert copy.verified_at is not None and copy.verified_at >= before
    assert replay.outbox == [("7.1", 1)] and replay.forwards == [("7.1", "dimse", "MODALITY")]
    assert replay.index.has_instance("7.1")
    # the log's older object, known to the index before it: the replace wins there too
    site2 = _site(tmp_path / "2")
    replay2 = _Replay(tmp_path / "2", site2)
    replay2.know(bodies[0], key, time.time() - 3600)
    site2.put(key, [bodies[1]], replace=True)  # no note: nothing known of its writer
    replay2.die(site2)
    report = replay2.run()
    assert (report.rewritten, report.indexed, report.copies) == (0, 1, 0)
    known = replay2.index.instance("7.1")
    assert known is not None and known.sha256 == _sha(bodies[1])
    assert replay2.forwards == [("7.1", "", "")]


def test_recovery_leaves_a_replace_the_index_recorded_after_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process whose log was checkpointed replaced the object again after the dead one's
    record: the file keeps the index's object; one that differs from it is reported."""
    key = object_key("1.2.3", "1.2.3.4", "7.2")
    old, logged, later = (_p10("7.2", n) for n in ("A^A", "B^B", "C^C"))
    for holds, errors in ((later, []), (old, [f"recovery: {key} on fs differs from the index"])):
        folder = tmp_path / str(len(errors))
        site = _site(folder)
        replay = _Replay(folder, site)
        site.put(key, [logged], replace=True)
        replay.know(later, key, time.time() + 60)
        (site.root / key).write_bytes(holds)
        replay.die(site)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="pacsgrid.archive.recovery"):
            report = replay.run()
        assert [r.getMessage() for r in caplog.records] == errors
        replay.kept(report, key, holds, "7.2", later)
        replay.index.close()


def test_a_replace_in_the_log_wins_over_an_index_row_older_than_its_record(
    tmp_path: Path,
) -> None:
    """The index decides against a replace in the log only when it recorded its own object
    after the record was written: not a second before it, and not when it has no copy row
    left to date it."""
    key = object_key("1.2.3", "1.2.3.4", "7.12")
    old, logged = _p10("7.12", "A^A"), _p10("7.12", "B^B")
    for copies in (True, False):
        folder = tmp_path / str(copies)
        site = _site(folder)
        replay = _Replay(folder, site)
        site.put(key, [logged], replace=True)
        (site.root / key).write_bytes(old)
        replay.die(site)
        dead = FilesystemSite("fs", site.root).dead_log()
        (written,) = [r.time_ns / 1e9 for d in dead for r in d.records()]
        for d in dead:
            d.close()
        replay.know(old, key, written - 1.0)
        if not copies:
            with sqlite3.connect(folder / "index.sqlite") as db:
                db.execute("DELETE FROM copy")
        report = replay.run()
        assert (report.records, report.rewritten, report.indexed) == (1, 1, 1)
        assert (site.root / key).read_bytes() == logged
        known = replay.index.instance("7.12")
        assert known is not None and known.sha256 == _sha(logged)
        replay.index.close()


def test_recovery_keeps_a_cache_copy_stored_again_after_its_eviction(tmp_path: Path) -> None:
    """Evicted from a cache site and stored again with other bytes before the crash (no
    `replace`): the file holds the second store's object, which is kept."""
    site = FilesystemSite("fs", tmp_path / "site", log_segment_bytes=4 << 20, role="cache")
    site.initialize()
    replay = _Replay(tmp_path, site)
    key = object_key("1.2.3", "1.2.3.4", "7.13")
    first, second = _p10("7.13", "A^A"), _p10("7.13", "B^B")
    site.put(key, [first])
    site.delete(key)
    site.put(key, [second])
    replay.die(site)
    report = replay.run(role="cache")
    assert (report.records, report.rewritten, report.indexed) == (2, 0, 0)
    assert (site.root / key).read_bytes() == second


def test_recovery_leaves_an_object_the_index_knows_from_another_writer(tmp_path: Path) -> None:
    """The index knows another object under the key (a store whose log was checkpointed) and
    the dead process logged a store without `replace`: the file is not rewritten with the
    log's object, whichever of the two it holds, and the index keeps what it knows."""
    key = object_key("1.2.3", "1.2.3.4", "7.3")
    indexed, logged = (_p10("7.3", n) for n in ("A^A", "B^B"))
    for holds in (indexed, logged):
        folder = tmp_path / holds.hex()[-8:]
        site = _site(folder)
        replay = _Replay(folder, site)
        replay.know(indexed, key, time.time() - 3600)
        site.put(key, [logged])
        (site.root / key).write_bytes(holds)
        replay.die(site)
        report = replay.run()
        replay.kept(report, key, holds, "7.3", indexed)
        replay.index.close()


def test_recovery_indexes_a_cache_copy_only_of_an_instance_the_index_knows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _site(tmp_path)
    replay = _Replay(tmp_path, site)
    alone, archived = _p10("7.4", "A^A"), _p10("7.5", "B^B")
    keys = [object_key("1.2.3", "1.2.3.4", sop) for sop in ("7.4", "7.5")]
    h = header_of(archived)
    elsewhere = CopyRecord("b", keys[1], len(archived), _sha(archived), time.time())
    replay.index.add_batch(
        [
            NewInstance(
                dict(h.values), h.transfer_syntax, len(archived), _sha(archived), (elsewhere,)
            )
        ]
    )
    site.put(keys[0], [alone])
    site.put(keys[1], [archived])
    replay.die(site)
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.recovery"):
        report = replay.run(role="cache")
    assert (report.records, report.rewritten, report.indexed, report.copies) == (2, 0, 0, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "recovery: 2 log record(s) replayed, 0 file(s) rewritten, 0 instance(s) and 1 copy"
        " row(s) indexed from site logs, 0 instance(s) from ingest journals"
    ]
    assert replay.index.instance("7.4") is None  # a cache copy alone is not an archive copy
    known = replay.index.instance("7.5")
    assert known is not None and sorted(c.site for c in known.copies) == ["b", "fs"]


def test_recovery_replays_every_record_after_a_staged_file_never_completed(
    tmp_path: Path,
) -> None:
    """A writer died writing a large object's staged file (never acknowledged): the records
    after it in the same segment are still replayed, from their own staged files."""
    site = _site(tmp_path, inline_max=1024)
    replay = _Replay(tmp_path, site)
    sops = ["7.6", "7.7", "7.8"]
    keys = [object_key("1.2.3", "1.2.3.4", sop) for sop in sops]
    bodies = [_p10(sop, "A^A") + b"\0" * 5000 for sop in sops]
    for key, body in zip(keys, bodies, strict=True):
        site.put(key, [body])
    staged = sorted((site.root / WAL_DIR / "data").glob("*.obj"))
    for key in keys:
        (site.root / key).unlink()  # their names never reached the disk
    staged[1].write_bytes(bodies[1][:100])
    replay.die(site)
    report = replay.run()
    assert (report.records, report.rewritten, report.indexed) == (3, 2, 2)
    for sop, key, body in zip(sops[::2], keys[::2], bodies[::2], strict=True):
        assert (site.root / key).read_bytes() == body
        known = replay.index.instance(sop)
        assert known is not None and known.sha256 == _sha(body) and known.size == len(body)
    assert replay.index.instance("7.7") is None and not (site.root / keys[1]).exists()


def test_recovery_rewrites_the_archive_s_own_documents_from_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A correction's document is written once: recovery makes its file hold the logged bytes
    (gone or torn), leaves a whole one alone, and indexes nothing (its own record does)."""
    site = _site(tmp_path)
    replay = _Replay(tmp_path, site)
    docs = {doc_key(i): b'{"seq": %d, "values": "x"}' % i for i in (1, 2, 3)}
    for key, body in docs.items():
        site.put(key, [body], note=note_for("correction", ""))
    keys = list(docs)
    (site.root / keys[0]).unlink()
    (site.root / keys[1]).write_bytes(docs[keys[1]][:5])
    replay.die(site)
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.recovery"):
        report = replay.run()
    assert (report.records, report.rewritten, report.indexed, report.copies) == (3, 2, 0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        *(f"recovery: {k} on fs rewritten from its log record" for k in keys[:2]),
        "recovery: 3 log record(s) replayed, 2 file(s) rewritten, 0 instance(s) and 0 copy"
        " row(s) indexed from site logs, 0 instance(s) from ingest journals",
    ]
    assert {k: (site.root / k).read_bytes() for k in keys} == docs
    assert replay.index.stats().instances == 0


def test_a_journal_marker_is_indexed_with_every_site_holding_the_same_object(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ingest journal's marker names the sites written to: a site unknown now or without
    the object is passed over, one holding another object is left to the audit, and the copies
    of the object the first site holding one has are indexed (the outbox gets their count).
    A marker whose object no site holds, or that the index has, indexes nothing."""
    names = ["a", "b", "c", "d"]
    sites = {n: FilesystemSite(n, tmp_path / n) for n in names}
    for site in sites.values():
        site.initialize()
    body, other = _p10("7.9", "A^A"), _p10("7.9", "B^B")
    key = object_key("1.2.3", "1.2.3.4", "7.9")
    sites["b"].put(key, [body])
    sites["c"].put(key, [other])
    sites["d"].put(key, [body])
    known = _p10("7.10", "C^C")
    known_key = object_key("1.2.3", "1.2.3.4", "7.10")
    sites["b"].put(known_key, [known])
    replay = _Replay(tmp_path, sites["a"])
    replay.know(known, known_key, time.time())
    dying = IngestJournal(tmp_path / "journal")
    tokens = [
        dying.begin(key, ["gone", "a", "b", "c", "d"]),
        dying.begin(object_key("1.2.3", "1.2.3.4", "7.11"), ["b"]),  # never written
        dying.begin(known_key, ["b"]),
    ]
    os.close(tokens[0][0].fd)  # the process dies
    recovery = Recovery(
        list(sites.values()), replay.index, replay.journal, replay._out, replay._fwd
    )
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.recovery"):
        report = recovery.run()
    assert report.journal == 1 and not report.records
    assert [r.getMessage() for r in caplog.records] == [
        f"indexed {key}, written before a crash but not indexed (never acknowledged)",
        "recovery: 0 log record(s) replayed, 0 file(s) rewritten, 0 instance(s) and 0 copy"
        " row(s) indexed from site logs, 1 instance(s) from ingest journals",
    ]
    record = replay.index.instance("7.9")
    assert record is not None and record.sha256 == _sha(body)
    assert sorted(c.site for c in record.copies) == ["b", "d"]
    assert _source_ae(tmp_path / "index.sqlite", "7.9") == ""  # not known: no AE
    assert replay.outbox == [("7.9", 2)]
    assert replay.index.stats().instances == 2


def _source_ae(index_file: Path, sop: str) -> str:
    with sqlite3.connect(index_file) as db:
        (ae,) = db.execute("SELECT source_ae FROM instance WHERE sop_uid = ?", (sop,)).fetchone()
    return str(ae)


def test_recovery_reports_the_sum_of_every_logged_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two sites with logs left by a dead process: the report, and its summary line, count
    what was done on both. Each instance is indexed with the calling AE of its record's note."""
    sites = [FilesystemSite(n, tmp_path / n, log_segment_bytes=4 << 20) for n in ("a", "b")]
    for site in sites:
        site.initialize()
    replay = _Replay(tmp_path, sites[0])
    shared = _p10("8.3", "C^C")
    shared_key = object_key("1.2.3", "1.2.3.4", "8.3")
    h = header_of(shared)
    elsewhere = CopyRecord("c", shared_key, len(shared), _sha(shared), time.time())
    replay.index.add_batch(
        [NewInstance(dict(h.values), h.transfer_syntax, len(shared), _sha(shared), (elsewhere,))]
    )
    for site, sop in zip(sites, ("8.1", "8.2"), strict=True):
        key = object_key("1.2.3", "1.2.3.4", sop)
        site.put(key, [_p10(sop, "A^A")], note=note_for("dimse", f"AE{sop}"))
        site.put(shared_key, [shared])
        (site.root / key).unlink()  # its name never reached the disk
        replay.die(site)
    again = [FilesystemSite(s.name, s.root) for s in sites]
    recovery = Recovery(again, replay.index, replay.journal, replay._out, replay._fwd)
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.recovery"):
        report = recovery.run()
    assert (report.records, report.rewritten, report.indexed, report.copies) == (4, 2, 2, 2)
    assert caplog.records[-1].getMessage() == (
        "recovery: 4 log record(s) replayed, 2 file(s) rewritten, 2 instance(s) and 2 copy"
        " row(s) indexed from site logs, 0 instance(s) from ingest journals"
    )
    for sop in ("8.1", "8.2"):
        assert replay.index.has_instance(sop)
        assert _source_ae(tmp_path / "index.sqlite", sop) == f"AE{sop}"
    known = replay.index.instance("8.3")
    assert known is not None and sorted(c.site for c in known.copies) == ["a", "b", "c"]


def test_recovery_indexes_every_instance_of_a_log_longer_than_a_batch(tmp_path: Path) -> None:
    """The index is given the instances of one replay in batches: every one is indexed, however
    many the log holds."""
    site = _site(tmp_path)
    replay = _Replay(tmp_path, site)
    n = 2 * BATCH + 1  # overlapping batches from the first BATCH reach only 2 * BATCH - 1
    sops = [f"9.{i}" for i in range(n)]
    with ThreadPoolExecutor(32) as pool:  # writers share the log's flushes
        list(
            pool.map(
                lambda sop: site.put(object_key("1.2.3", "1.2.3.4", sop), [_p10(sop, "A^A")]), sops
            )
        )
    replay.die(site)
    report = replay.run()
    assert (report.records, report.indexed) == (n, n)
    assert replay.index.stats().instances == n
    assert all(replay.index.has_instance(sop) for sop in sops)


def test_a_log_that_cannot_be_replayed_now_is_named_and_kept_for_the_next_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file recovery must rewrite, under a folder that became a file: the error line names
    the site and the reason, and the log is kept whole; once the folder is back the next
    recovery replays it. A logged object under an instance's key that is not DICOM is named
    and left alone."""
    site = _site(tmp_path)
    replay = _Replay(tmp_path, site)
    key = object_key("1.2.3", "1.2.3.4", "9.1")
    junk = object_key("1.2.3", "1.2.3.5", "9.2")
    site.put(key, [_p10("9.1", "A^A")])
    site.put(junk, [b"not a DICOM object"])
    replay.die(site)
    series = (site.root / key).parent
    (site.root / key).unlink()
    series.rmdir()
    series.write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="pacsgrid.archive.recovery"):
        report = replay.run()
    (line,) = [r.getMessage() for r in caplog.records if "cannot" in r.getMessage()]
    prefix = "cannot replay the log of site fs now: "
    assert line.startswith(prefix) and key in line[len(prefix) :]
    assert not report.indexed and _segments(site.root)
    series.unlink()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pacsgrid.archive.recovery"):
        report = replay.run()
    assert [r.getMessage() for r in caplog.records] == [
        f"recovery: no log record for {junk} parses; left alone"
    ]
    assert (report.records, report.rewritten, report.indexed) == (2, 1, 1)
    assert replay.index.has_instance("9.1")
    assert (site.root / junk).read_bytes() == b"not a DICOM object"


def test_the_log_can_be_turned_off(tmp_path: Path) -> None:
    """`durability.log = false`: every object is flushed on its own, no log."""
    s = load_settings(Overrides(data_dir=tmp_path / "d"), environ={"PACSGRID_DURABILITY_LOG": "0"})
    archive = Archive(s, probe_interval=0)
    try:
        archive.ingest(dataset("5.1"), EXPLICIT, MODALITY)
        assert archive.instance("5.1") is not None
        assert _segments(tmp_path / "d" / "objects") == []
    finally:
        archive.close()
    archive = _archive(tmp_path / "d2")
    try:
        archive.ingest(dataset("5.1"), EXPLICIT, MODALITY)
        assert len(_segments(tmp_path / "d2" / "objects")) >= 1  # the default: the log is on
    finally:
        archive.close()


def test_large_objects_are_written_once_and_replayed_from_their_staged_file(
    tmp_path: Path,
) -> None:
    """Above `inline_kb` an object is not copied into its record: it is written once, into the
    log's staging folder, and linked into place. A writer that died before its staged file was
    complete was never acknowledged: recovery skips that record; the others come back."""
    site = _site(tmp_path, inline_max=1024)
    keys = [object_key("1.2", "1.2.3", f"1.2.3.{i}") for i in range(3)]
    bodies = [b"DICM" + bytes([i]) * 5000 for i in range(3)]
    for key, body in zip(keys, bodies, strict=True):
        site.put(key, [body])
    stage = site.root / WAL_DIR / "data"
    staged = sorted(stage.glob("*.obj"))
    assert len(staged) == 3
    assert os.stat(site.root / keys[0]).st_ino in {os.stat(p).st_ino for p in staged}
    log_bytes = b"".join(p.read_bytes() for p in _segments(site.root))
    assert not any(body[:64] in log_bytes for body in bodies)  # written once, not in the log
    assert site._log is not None
    for seg in site._log._segments:  # the process dies
        os.close(seg.fd)
    (site.root / keys[0]).unlink()  # its name never reached the disk
    (site.root / keys[1]).unlink()
    staged[1].write_bytes(bodies[1][:100])  # the writer died while writing it: never acked
    dead = FilesystemSite("fs", site.root).dead_log()
    found = {r.key: d.object_of(r) for d in dead for r in d.records()}
    assert found == {keys[0]: bodies[0], keys[1]: None, keys[2]: bodies[2]}
    for d in dead:
        d.free()
    assert list(stage.glob("*.obj")) == []  # the freed segments' staged files are gone
    assert (site.root / keys[2]).read_bytes() == bodies[2]  # its own link kept the object


def test_orphaned_staged_files_are_swept_by_their_segment_nonce(tmp_path: Path) -> None:
    from pacsgrid.storage.walfile import sweep_staged

    site = _site(tmp_path, inline_max=1024)
    site.put(object_key("1.2", "1.2.3", "1.2.3.1"), [b"DICM" + b"x" * 5000])
    stage = site.root / WAL_DIR / "data"
    (live,) = stage.glob("*.obj")
    stem = live.name.split("-")[0]
    orphan = stage / f"{stem}-{'0' * 15}a-000000000099.obj"  # the segment's previous use
    orphan.write_bytes(b"left by a writer that died")
    young = stage / f"{stem}-{'0' * 15}b-000000000100.obj"  # too young to judge
    young.write_bytes(b"maybe read with a header being rewritten")
    old = 3600.0
    for p in (live, orphan):
        os.utime(p, (p.stat().st_atime - old, p.stat().st_mtime - old))
    assert sweep_staged(site.root / WAL_DIR) == 1
    assert live.exists() and young.exists() and not orphan.exists()


def test_the_sweep_goes_past_young_files_and_names_it_does_not_know(tmp_path: Path) -> None:
    """The order of a folder's listing is the file system's: with twenty young files and
    twenty stray names among twenty orphans, a sweep that stopped at the first of either
    would leave some orphans (unless every orphan came first: about one chance in 10^11)."""
    from pacsgrid.storage.walfile import sweep_staged

    site = _site(tmp_path, inline_max=1024)
    site.put(object_key("1.2", "1.2.3", "1.2.3.1"), [b"DICM" + b"x" * 5000])
    stage = site.root / WAL_DIR / "data"
    (live,) = stage.glob("*.obj")
    stem = live.name.split("-")[0]
    old = time.time() - 3600
    orphans = [stage / f"{stem}-{'0' * 15}a-{i:012d}.obj" for i in range(20)]
    for p in orphans:
        p.write_bytes(b"left by a writer that died")
        os.utime(p, (old, old))
    young = [stage / f"{stem}-{'0' * 15}b-{i:012d}.obj" for i in range(20)]
    strays = [stage / f"stray-{i}.tmp" for i in range(20)]
    for p in young + strays:
        p.write_bytes(b"")
    for p in strays:
        os.utime(p, (old, old))
    assert sweep_staged(site.root / WAL_DIR) == 20
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in young + strays)
