"""The archive on PostgreSQL after disasters, with real parts only: `pacsgrid serve` processes,
DCMTK storescu/findscu, PostgreSQL primary and streaming replica (initdb, pg_basebackup,
pg_ctl), pg_dump/pg_restore through `pacsgrid backup`/`restore`."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import warnings
from pathlib import Path

import psycopg
import pydicom
import pytest

from bench import synth
from pacsgrid.archive import Archive
from pacsgrid.index import open_index
from pacsgrid.settings import Overrides, load_settings
from tests.behind_the_archive import index_of
from tests.conftest import Server, dcmtk, free_port, pacsgrid_cli
from tests.corpus import accepted
from tests.dcmtk_store import store_with_storescu
from tests.pg import FAST_FAIL, PgCluster, failover_url
from tests.senders import Sent, send_while, sop_uid, storescu
from tests.waiting import wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    return synth.write(synth.Spec(studies=12, series=2, instances=5, size=16), out)


def pacsgrid(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli(*args, timeout=timeout)


def count(url: str, table: str = "instance") -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def check_retrievable(data_dir: Path, url: str, sops: set[str], config: Path | None = None) -> None:
    """Every SOP is indexed and its bytes read back from a site match the recorded hash."""
    settings = load_settings(Overrides(config=config, data_dir=data_dir, database=url), {})
    archive = Archive(settings, probe_interval=0)
    try:
        for sop in sorted(sops):
            record = index_of(archive).instance(sop)
            assert record is not None, f"acknowledged instance {sop} is not indexed"
            obj = archive.read(record)  # verifies the SHA-256
            assert obj.data[128:132] == b"DICM"
    finally:
        archive.close()


# ---------------------------------------------------------------- failover


def test_primary_killed_replica_promoted_ingest_resumes(
    tmp_path: Path, synth_files: list[Path]
) -> None:
    primary = PgCluster().init().start()
    replica: PgCluster | None = None
    server: Server | None = None
    try:
        primary.create_db("pacs")
        replica = primary.replica().start()
        url = failover_url(primary, replica)
        server = Server(tmp_path / "archive", args=("--database", url), env=FAST_FAIL).start()
        pid = server.proc.pid if server.proc else 0
        batches = [synth_files[i : i + 6] for i in range(0, len(synth_files), 6)]
        acked: list[Path] = []
        retry: list[Path] = []
        refused_while_down: list[str] = []
        resumed_after_promotion = False
        state = "up"
        for n, batch in enumerate(batches):
            t0 = time.monotonic()
            if n == len(batches) // 3:
                # SIGKILL (the machine died) once this association has stored something; the
                # kill is done before the next association starts.
                before = count(url)
                sent = send_while(
                    lambda b=batch: storescu(server.port, b),  # type: ignore[misc]
                    lambda b=before: count(url) > b,  # type: ignore[misc]
                    primary.kill,
                )
                state = "dying"
            else:
                sent = storescu(server.port, batch)
            took = time.monotonic() - t0
            acked += sent.stored
            retry += list(sent.failed)
            if state == "dying":
                state = "down"
            elif state == "down":
                assert not sent.stored, "stored with no primary reachable"
                assert took < 60, f"storescu took {took:.0f}s while no primary was reachable"
                refused_while_down += list(sent.failed.values())
                replica.promote()  # what Patroni does after its TTL
                state = "promoted"
            elif state == "promoted" and sent.stored:
                resumed_after_promotion = True
        assert refused_while_down and all("OutOfResources" in why for why in refused_while_down), (
            refused_while_down
        )
        assert resumed_after_promotion, "ingest did not resume after the promotion"
        assert server.proc is not None and server.proc.pid == pid  # the same process, no restart
        final = storescu(server.port, retry)  # the modality retries what failed
        acked += final.stored
        assert not final.failed, final.failed
        server.stop()
        server = None

        reconcile = pacsgrid(
            "reindex", "--reconcile", "--data-dir", tmp_path / "archive", "--database", url
        )
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
        sops = {sop_uid(p) for p in acked}
        assert len(sops) == len(synth_files)
        check_retrievable(tmp_path / "archive", url, sops)
        print(
            f"\nfailover: {len(refused_while_down)} stores refused while no primary, "
            f"all {len(sops)} acknowledged instances indexed and readable; reconcile: "
            f"{reconcile.stdout.splitlines()[0]}"
        )
    finally:
        if server is not None:
            server.stop()
        if replica is not None:
            replica.destroy()
        primary.destroy()


# ---------------------------------------------------------------- backup while storing


def test_backup_while_storescu_sends_then_restore_and_reconcile(
    tmp_path: Path, synth_files: list[Path], pg_server: PgCluster
) -> None:
    url = pg_server.create_db("backup_live")
    data = tmp_path / "archive"
    server = Server(data, args=("--database", url)).start()
    third = len(synth_files) // 3
    backup_done = threading.Event()
    started_backup = threading.Event()
    results: list[Sent] = []

    def send() -> None:
        for i in range(0, len(synth_files), 4):
            if i >= 2 * third:
                backup_done.wait(120)  # the last third only after the backup point
            results.append(storescu(server.port, synth_files[i : i + 4]))
            if i >= third:
                started_backup.set()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert started_backup.wait(120)
        out = pacsgrid("backup", "--data-dir", data, "--database", url)
        backup_done.set()
        assert out.returncode == 0, out.stdout + out.stderr
        assert "verified" in out.stdout
    finally:
        backup_done.set()
        sender.join(300)
        server.stop()
    acked = [p for r in results for p in r.stored]
    assert len(acked) == len(synth_files), [r.failed for r in results]
    from pacsgrid.jobs.backup import backups

    [m] = backups(data / "backups")
    assert 0 < m.counts["instance"] < len(synth_files)

    fresh = pg_server.create_db("backup_restored")
    out = pacsgrid("restore", "--data-dir", data, "--database", fresh, data / "backups" / m.name)
    assert out.returncode == 0, out.stdout + out.stderr
    for table, n in m.counts.items():
        assert count(fresh, table) == n, table  # exactly the backup point
    out = pacsgrid("reindex", "--reconcile", "--data-dir", data, "--database", fresh)
    assert out.returncode == 0, out.stdout + out.stderr
    assert count(fresh) == len(synth_files)
    check_retrievable(data, fresh, {sop_uid(p) for p in acked})
    print(
        f"\nbackup point {m.counts['instance']} instances; restored {count(fresh)} after "
        f"reconcile ({out.stdout.splitlines()[0]})"
    )


def test_backup_from_the_standby_and_no_rotation_after_a_failed_verification(
    tmp_path: Path, synth_files: list[Path], pg_server: PgCluster
) -> None:
    """docs/operations.md (Backups): pg_dump from the standby when one is configured; a
    backup that fails its verification rotates nothing out, only a verified one does."""
    from pacsgrid.jobs.backup import backups

    primary = PgCluster().init().start()
    replica: PgCluster | None = None
    try:
        url = primary.create_db("pacs")
        replica = primary.replica().start()
        files = synth_files[:10]
        run = pacsgrid("import", "--data-dir", tmp_path / "archive", "--database", url, *files)
        assert run.returncode == 0, run.stdout + run.stderr
        standby = replica.url("pacs")
        wait_until(lambda: count(standby) == len(files), 60, "the standby replayed the import")
        folder = tmp_path / "backups"

        def backup(scratch: str) -> subprocess.CompletedProcess[str]:
            cfg = tmp_path / "backup.toml"
            cfg.write_text(
                f'database = "{url}"\n[index]\nread_database = "{standby}"\n'
                f'[backup]\ndir = "{folder}"\nkeep = 2\nscratch = "{scratch}"\n'
            )
            return pacsgrid("backup", "--config", cfg, "--data-dir", tmp_path / "archive")

        # The primary is down: a backup can only come from the standby (verified on the
        # session's other server).
        primary.stop()
        out = backup(pg_server.url())
        assert out.returncode == 0, out.stdout + out.stderr
        [m] = backups(folder)
        assert m.verified and m.counts["instance"] == len(files)
        assert f"127.0.0.1:{replica.port}/pacs" in m.source, m.source
        out = backup(pg_server.url())
        assert out.returncode == 0, out.stdout + out.stderr
        good = [b.name for b in backups(folder)]
        assert len(good) == 2

        # The scratch server for the verification restore is unreachable: the new backup is
        # written but not verified, and the two verified ones stay.
        nowhere = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres"
        out = backup(nowhere)
        assert out.returncode != 0
        assert "scratch database" in out.stderr, out.stderr
        kept = backups(folder)
        assert [b.name for b in kept if b.verified] == good
        assert len(kept) == 3 and not kept[-1].verified
        for b in kept:
            assert (folder / b.name).is_file()

        # The next verified backup rotates down to keep = 2, itself among them.
        out = backup(pg_server.url())
        assert out.returncode == 0, out.stdout + out.stderr
        after = backups(folder)
        assert len(after) == 2 and after[-1].verified and good[0] not in [b.name for b in after]
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


# ---------------------------------------------------------------- lost database


FIND_KEYS = {
    "PATIENT": ("-P", ["PatientID", "PatientName", "PatientBirthDate", "PatientSex"]),
    "STUDY": (
        "-S",
        [
            "StudyInstanceUID",
            "PatientID",
            "PatientName",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "StudyDescription",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
        ],
    ),
    "SERIES": (
        "-S",
        ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesNumber", "BodyPartExamined"],
    ),
}


def find_all(port: int, workdir: Path, level: str) -> list[tuple[str, ...]]:
    model, keys = FIND_KEYS[level]
    out = workdir / f"find-{level}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    args: list[str | Path] = [model, "-X", "-od", out, "-aet", "FINDSCU", "-aec", "PACSGRID"]
    args += ["-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    proc = dcmtk("findscu", *args, "127.0.0.1", port)
    assert proc.returncode == 0, proc.stdout
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in sorted(out.glob("rsp*.dcm")):
            ds = pydicom.dcmread(p)
            rows.append(tuple(str(ds.get(k, "")) for k in keys))
    return sorted(rows)


def test_database_deleted_reindex_answers_the_same(tmp_path: Path, pg_server: PgCluster) -> None:
    url = pg_server.create_db("lost")
    data = tmp_path / "archive"
    args = ("--database", url, "--peer", "FINDSCU@127.0.0.1:9")
    server = Server(data, args=args).start()
    try:
        run = store_with_storescu(server.port, accepted(), tmp_path)
        assert run.stored and not run.failed
        before = {lv: find_all(server.port, tmp_path, lv) for lv in FIND_KEYS}
    finally:
        server.stop()
    n = count(url)
    pg_server.drop_db("lost")  # the database is gone entirely
    pg_server.create_db("lost")
    out = pacsgrid("reindex", "--data-dir", data, "--database", url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert count(url) == n
    server = Server(data, args=args).start()
    try:
        after = {lv: find_all(server.port, tmp_path, lv) for lv in FIND_KEYS}
    finally:
        server.stop()
    for lv in FIND_KEYS:
        extra = sorted(set(after[lv]) - set(before[lv]))
        missing = sorted(set(before[lv]) - set(after[lv]))
        assert after[lv] == before[lv], f"{lv}: new {extra}, gone {missing}"
    assert len(before["STUDY"]) > 5
    print(f"\nreindex rebuilt {n} instances; C-FIND answers identical at every level")


def test_reads_use_the_standby_and_fall_back(tmp_path: Path) -> None:
    """With index.read_database, C-FIND lookups go to the standby; if it dies they go to
    the primary (the answers stay right)."""
    primary = PgCluster().init().start()
    replica: PgCluster | None = None
    try:
        url = primary.create_db("pacs")
        replica = primary.replica().start()
        ix = open_index(url)
        ix.close()

        def replicated(table: str) -> bool:
            with psycopg.connect(replica.url("pacs")) as conn:
                row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
            return row is not None and row[0] is not None

        wait_until(lambda: replicated("instance"), 60, "the schema replayed on the standby")
        from pacsgrid.index.postgres import PostgresIndex

        index = PostgresIndex(url, read_url=replica.url("pacs"), connect_timeout=2)
        from tests.test_index_contract import inst

        index.add_batch([inst("1.1")])
        from pacsgrid.index import Query
        from pacsgrid.model import Level

        wait_until(
            lambda: list(index.find(Query(Level.IMAGE))), 60, "the new row replayed on the standby"
        )
        assert [r["SOPInstanceUID"] for r in index.find(Query(Level.IMAGE))] == ["1.1"]
        with psycopg.connect(replica.url("pacs")) as conn:
            apps = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pacsgrid-read'"
            ).fetchone()
        assert apps is not None and apps[0] >= 1  # the query really went to the standby
        replica.kill()
        assert [r["SOPInstanceUID"] for r in index.find(Query(Level.IMAGE))] == ["1.1"]
        index.close()
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


def test_reads_move_to_another_host_when_their_server_dies(tmp_path: Path) -> None:
    """With a multi-host index.read_database, the read connections may sit on the server that
    dies while another host of that conninfo is up (after a failover the two servers have
    swapped roles; the drill's step 8). A read must then be answered through a fresh read
    connection to the host that is up, not sent to the primary's conninfo, whose server is
    the dead one."""
    from pacsgrid.index import Query
    from pacsgrid.index.postgres import PostgresIndex
    from pacsgrid.model import Level
    from tests.test_index_contract import inst

    primary = PgCluster().init().start()
    replica: PgCluster | None = None
    try:
        url = primary.create_db("pacs")
        replica = primary.replica().start()
        open_index(url).close()
        # The read conninfo names the primary first: its connections go there, as they did in
        # the drill once the standby had been down.
        read_url = (
            f"host=127.0.0.1,127.0.0.1 port={primary.port},{replica.port} user=postgres "
            "dbname=pacs target_session_attrs=any"
        )
        index = PostgresIndex(url, read_url=read_url, connect_timeout=2)
        index.add_batch([inst("1.1")])

        def on_replica() -> bool:
            assert replica is not None
            with psycopg.connect(replica.url("pacs")) as conn:
                if conn.execute("SELECT to_regclass('instance')").fetchone() == (None,):
                    return False  # the schema has not replayed yet
                row = conn.execute("SELECT count(*) FROM instance").fetchone()
            return row is not None and row[0] == 1

        wait_until(on_replica, 60, "the row replayed on the standby")
        assert [r["SOPInstanceUID"] for r in index.find(Query(Level.IMAGE))] == ["1.1"]
        primary.kill()
        assert [r["SOPInstanceUID"] for r in index.find(Query(Level.IMAGE))] == ["1.1"]
        index.close()
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


def test_a_shorter_deadline_armed_after_a_longer_one_still_fires() -> None:
    """The statement watchdog sleeps until its soonest deadline and is woken only for a
    sooner one: a short deadline armed while it sleeps for a long one must wake it (the
    short one's socket is shut down, the long one's is not)."""
    import socket

    from pacsgrid.index.pg_connections import _Watchdog

    dog = _Watchdog()
    long_a, long_b = socket.socketpair()
    short_a, short_b = socket.socketpair()
    long_token = 0
    try:
        long_token = dog.arm(long_a.fileno(), 3600)
        wait_until(lambda: dog._sleeps_until > 0, 30, "the watchdog asleep on the long deadline")
        token = dog.arm(short_a.fileno(), 0.2)
        short_b.settimeout(60)
        assert short_b.recv(1) == b"", "the short deadline's connection was not shut down"
        dog.disarm(token)
        long_b.setblocking(False)
        with pytest.raises(BlockingIOError):
            long_b.recv(1)  # still open: nothing to read, no end of file
    finally:
        dog.disarm(long_token)  # before its socket is closed and the descriptor reused
        for s in (long_a, long_b, short_a, short_b):
            s.close()


def test_frozen_primary_fails_stores_promptly_then_recovers(tmp_path: Path) -> None:
    """A primary that hangs (SIGSTOP: connections stay open, nothing answers) must not hang
    ingest: the commit fails within the bounded timeouts, and works again once it is back."""
    import os
    import signal

    from pacsgrid.drill.procs import children
    from pacsgrid.errors import IndexUnavailable
    from pacsgrid.index.postgres import PostgresIndex
    from tests.test_index_contract import inst

    cluster = PgCluster().init().start()
    assert cluster.pid is not None
    pids: list[int] = []
    try:
        url = cluster.create_db("frozen")
        index = PostgresIndex(url, connect_timeout=1, statement_timeout=2)
        index.add_batch([inst("1.1")])
        pids = [cluster.pid, *children(cluster.pid)]  # the postmaster and its backends
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(IndexUnavailable):
            index.add_batch([inst("1.2")])
        took = time.monotonic() - t0
        assert took < 30, f"a commit against a frozen primary took {took:.0f}s"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

        def stored_again() -> bool:
            try:
                index.add_batch([inst("1.3")])
            except IndexUnavailable:
                return False
            return True

        wait_until(stored_again, 60, "a store succeeds once the primary runs again", every=0.5)
        assert index.has_instance("1.3") and index.has_instance("1.1")
        index.close()
        print(f"\nfrozen primary: commit failed after {took:.1f}s, recovered after SIGCONT")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        cluster.destroy()
