"""Patroni for real: etcd and two PostgreSQL servers under Patroni (Debian's patroni and
etcd-server), one `pacsgrid serve` on the multi-host conninfo (target_session_attrs=read-write).
The primary dies (Patroni, postmaster and backends SIGKILLed) while storescu sends; the test
never promotes anything: Patroni does, once the leader key expires, and ingest resumes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import synth
from tests.conftest import Server
from tests.pg import FAST_FAIL, PatroniCluster, patroni_missing
from tests.senders import Sent, send_while, sop_uid, storescu
from tests.test_pg_cluster import check_retrievable
from tests.waiting import wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

RESUME_BOUND = 30.0  # seconds from the primary's death to the next acknowledged store


@pytest.fixture
def patroni() -> Iterator[PatroniCluster]:
    missing = patroni_missing()
    if missing:
        pytest.fail(f"{missing} (scripts/test installs them)")
    cluster = PatroniCluster(ttl=10, loop_wait=1, retry_timeout=3).start()
    yield cluster
    cluster.destroy()


def indexed(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT sop_uid FROM instance").fetchall()}


def test_patroni_promotes_the_standby_and_ingest_resumes(
    tmp_path: Path, patroni: PatroniCluster
) -> None:
    files = synth.write(synth.Spec(studies=10, series=2, instances=4, size=16), tmp_path / "in")
    url = patroni.create_db("pacs")
    old = patroni.leader()
    assert old is not None
    server = Server(tmp_path / "archive", args=("--database", url), env=FAST_FAIL).start()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        batches = [files[i : i + 5] for i in range(0, 15, 5)]
        results: list[Sent] = [storescu(server.port, b) for b in batches[:2]]
        assert all(r.stored and not r.failed for r in results), [r.failed for r in results]
        before = len(indexed(url))
        killed: list[float] = []

        def kill() -> None:
            patroni.kill(old)
            killed.append(time.monotonic())

        results.append(
            send_while(
                lambda: storescu(server.port, batches[2]), lambda: len(indexed(url)) > before, kill
            )
        )
        # New associations of one instance each until one is acknowledged: Patroni must
        # promote the standby by itself (the leader key expires after ttl = 10 s).
        probe = files[15]
        resumed: float | None = None
        deadline = killed[0] + 3 * RESUME_BOUND  # bounded even when it never resumes
        while resumed is None and time.monotonic() < deadline:
            sent = storescu(server.port, [probe], timeout=60)
            if sent.stored:
                resumed = time.monotonic()
                results.append(sent)
            else:
                time.sleep(0.2)  # a modality's pause before it sends again
        assert resumed is not None, (
            f"no store acknowledged after the primary died: {patroni.members()}"
        )
        took = resumed - killed[0]
        new = patroni.leader()
        assert new is not None and new != old, patroni.members()
        assert took <= RESUME_BOUND, f"ingest resumed {took:.1f}s after the primary died"
        results.append(storescu(server.port, files[16:]))
        retry = [f for r in results for f in r.failed]
        final = storescu(server.port, retry) if retry else Sent()
        assert not final.failed, final.failed
        assert server.proc is not None and server.proc.pid == pid  # no restart
        acked = {sop_uid(f) for r in [*results, final] for f in r.stored}
        assert acked == {sop_uid(f) for f in files}
        # Synchronous replication: the promoted standby has every acknowledged row, without
        # a reconcile.
        missing = acked - indexed(url)
        assert not missing, f"{len(missing)} acknowledged instances missing from the index"
        server.stop()
        check_retrievable(tmp_path / "archive", url, acked)
        # The dead primary comes back as a replica of the new one (pg_rewind).
        patroni.start_node(old)
        wait_until(lambda: _rejoined(patroni), 180, "the old primary rejoined as a replica")
        print(
            f"\nPatroni promoted pg{new}; first store acknowledged {took:.1f}s after the "
            f"primary died; {len(retry)} stores refused meanwhile and sent again; all "
            f"{len(acked)} acknowledged instances indexed and readable"
        )
    finally:
        server.stop()


def _rejoined(patroni: PatroniCluster) -> bool:
    try:
        patroni.wait_roles(1)
    except Exception:
        return False
    return True
