"""Two `pacsgrid serve` nodes on one PostgreSQL and one storage site, behind HAProxy (TCP mode,
DICOM-level health check): a node killed during a storescu run, a node hung (SIGSTOP)."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from bench import synth
from pacsgrid.deploy import haproxy_config
from pacsgrid.index import open_index
from pacsgrid.jobs.backup import backups
from tests.conftest import Server, dcmtk
from tests.peers import HAProxy
from tests.pg import PgCluster
from tests.senders import Sent, send_while, sop_uid, storescu
from tests.test_pg_cluster import check_retrievable, pacsgrid
from tests.waiting import wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    return synth.write(synth.Spec(studies=16, series=2, instances=5, size=16), out)


def node_config(tmp_path: Path, url: str, backup_hours: float = 0.0) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'database = "{url}"\n'
        "[[sites]]\n"
        'name = "shared"\n'
        f'url = "file://{tmp_path / "shared-site"}"\n'
        "[index]\n"
        "connect_timeout = 2.0\n"
        "[backup]\n"
        f"interval = {backup_hours}\n"
        "keep = 1000\n"  # every backup of the test stays, to be counted
        f'dir = "{tmp_path / "backups"}"\n'
    )
    return cfg


def two_nodes(tmp_path: Path, url: str, backup_hours: float = 0.0) -> list[Server]:
    cfg = node_config(tmp_path, url, backup_hours)
    nodes = []
    for name in ("node-a", "node-b"):
        s = Server(tmp_path / name, config=cfg)
        nodes.append(s.start())
    return nodes


# How long HAProxy's DICOM check may take. A live node must stay UP while the machine is
# loaded (with 1 s, two answers in a row slower than that take it out of rotation too, and
# the tests count on it taking associations); a hung node fails every check all the same.
CHECK_TIMEOUT = "5s"


def echo(port: int) -> bool:
    return (
        dcmtk(
            "echoscu", "-to", "30", "-ta", "30", "-aec", "PACSGRID", "127.0.0.1", port, timeout=90
        ).returncode
        == 0
    )


def test_generated_config_is_valid_and_shipped(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
    want = haproxy_config(
        [("node1", "10.0.0.11", 11112), ("node2", "10.0.0.12", 11112)], listen=":104"
    )
    assert shipped.read_text() == want, "deploy/haproxy.cfg is stale (docs/postgresql.md)"
    out = subprocess.run(["haproxy", "-c", "-f", str(shipped)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except OSError:
        return True


def log_leases(url: str) -> None:
    """Record every lease of a periodic job in `lease_log` (a trigger on pacsgrid's job_state
    table, in the test's own database), with the time the index wrote and the node."""
    open_index(url).close()  # pacsgrid's schema first
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE lease_log (name text, last_run double precision, owner text)")
        conn.execute(
            "CREATE FUNCTION log_lease() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO lease_log VALUES (NEW.name, NEW.last_run, NEW.owner); RETURN NEW; "
            "END $$"
        )
        conn.execute(
            "CREATE TRIGGER lease_logged AFTER INSERT OR UPDATE ON job_state FOR EACH ROW "
            "WHEN (NEW.last_run > 0) EXECUTE FUNCTION log_lease()"
        )


def leases(url: str, name: str) -> list[tuple[float, int]]:
    """(time, pid of the node's process) of every lease of job `name`, in order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT last_run, owner FROM lease_log WHERE name = %s ORDER BY last_run", (name,)
        ).fetchall()
    return [(float(t), int(owner.rsplit(":", 1)[1])) for t, owner in rows]


def test_node_killed_during_storescu(
    tmp_path: Path, pg_server: PgCluster, synth_files: list[Path]
) -> None:
    url = pg_server.create_db("two_nodes")
    log_leases(url)
    # Backups every 2.88 s: both nodes run the schedule; each period's backup is taken once.
    hours = 0.0008
    nodes = two_nodes(tmp_path, url, backup_hours=hours)
    proxy = HAProxy(
        tmp_path,
        [("a", "127.0.0.1", nodes[0].port), ("b", "127.0.0.1", nodes[1].port)],
        check_timeout=CHECK_TIMEOUT,
    )
    pids = {s.proc.pid: s for s in nodes if s.proc is not None}
    try:
        proxy.wait_state("a", "UP")
        proxy.wait_state("b", "UP")
        batches = [synth_files[i : i + 4] for i in range(0, len(synth_files), 4)]
        results: list[Sent] = []
        kill_at = len(batches) // 3
        for n, batch in enumerate(batches[:kill_at]):
            results.append(storescu(proxy.port, batch, aet=f"BATCH{n}"))
        assert all(not s.failed for s in results), [s.failed for s in results]
        assert all("association from BATCH" in s.text() for s in nodes)  # both took stores

        # The node serving this association is SIGKILLed once the association is accepted.
        serving: list[Server] = []

        def accepted() -> bool:
            serving[:] = [s for s in nodes if f"association from BATCH{kill_at}@" in s.text()]
            return bool(serving)

        def kill() -> None:
            assert serving, "no node took the association"
            serving[0].kill()

        sent = send_while(
            lambda: storescu(proxy.port, batches[kill_at], aet=f"BATCH{kill_at}"), accepted, kill
        )
        results.append(sent)
        victim = serving[0]
        survivor = next(s for s in nodes if s is not victim)
        # Every worker process is gone once nothing listens on its port any more.
        wait_until(lambda: refuses(victim.port), 60, "the killed node's port refuses")
        # From now on every new association reaches the survivor (a refused connection is
        # redispatched), before and after HAProxy marks the dead node DOWN.
        after = [
            storescu(proxy.port, batch, aet=f"BATCH{n}")
            for n, batch in enumerate(batches[kill_at + 1 :], kill_at + 1)
        ]
        assert all(not s.failed for s in after), [s.failed for s in after]
        assert all(s.stored for s in after), "new associations did not reach the survivor"
        results += after
        retry = [p for s in results for p in s.failed]
        final = storescu(proxy.port, retry) if retry else Sent()
        assert not final.failed
        acked = [p for s in results for p in s.stored] + final.stored
        assert {sop_uid(p) for p in acked} == {sop_uid(p) for p in synth_files}
        proxy.wait_state("a" if victim is nodes[0] else "b", "DOWN")
        # Let the backup schedule run: wait for three backups (the first is taken at start).
        wait_until(
            lambda: len(backups(tmp_path / "backups")) >= 3,
            180,
            "three scheduled backups",
            seen=lambda: survivor.text()[-2000:],
        )
    finally:
        proxy.stop()
        for s in nodes:
            s.stop()
    cfg = node_config(tmp_path, url)
    check_retrievable(survivor.data_dir, url, {sop_uid(p) for p in acked}, cfg)
    reconcile = pacsgrid(
        "reindex",
        "--reconcile",
        "--config",
        node_config(tmp_path, url),
        "--data-dir",
        survivor.data_dir,
    )
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "indexed 0 new" in reconcile.stdout  # nothing acknowledged was missing

    # Each period's backup once: the index never leased the job twice within a period, and
    # each node took exactly the backups it leased (the killed one may have died in one).
    every = hours * 3600
    leased = leases(url, "backup")
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(leased)]
    assert all(g >= every - 1e-6 for g in gaps), f"the job was leased twice in a period: {gaps}"
    done = Counter(
        int(pid)
        for s in nodes
        for pid in re.findall(r"\[(\d+)\] [\w.]+: scheduled backup done", s.text())
    )
    by_node = Counter(pid for _, pid in leased)
    assert set(by_node) <= set(pids), (by_node, pids)
    for pid, server in pids.items():
        if server is victim:
            assert done[pid] <= by_node[pid] <= done[pid] + 1, (pid, done, by_node)
        else:
            assert done[pid] == by_node[pid], (pid, done, by_node)
    taken = backups(tmp_path / "backups")
    # A file for every backup logged as done, and none without a lease: the killed node may
    # have published the file of its last lease and died before logging it.
    assert sum(done.values()) <= len(taken) <= sum(by_node.values())
    assert len(taken) >= 3
    print(
        f"\ntwo nodes: {len(acked)} acknowledged, the node serving association "
        f"{kill_at} killed mid-run, {sum(len(s.stored) for s in after)} stored via the "
        f"survivor afterwards; {len(taken)} scheduled backups, one per period "
        f"(leases by node: {dict(by_node)})"
    )


def test_hung_node_is_taken_out_of_rotation(tmp_path: Path, pg_server: PgCluster) -> None:
    url = pg_server.create_db("hung_node")
    nodes = two_nodes(tmp_path, url)
    proxy = HAProxy(
        tmp_path,
        [("a", "127.0.0.1", nodes[0].port), ("b", "127.0.0.1", nodes[1].port)],
        check_timeout=CHECK_TIMEOUT,
    )
    assert nodes[0].proc is not None
    pid = nodes[0].proc.pid
    try:
        proxy.wait_state("a", "UP")
        proxy.wait_state("b", "UP")
        os.kill(pid, signal.SIGSTOP)  # hung: the port still accepts, nothing answers
        seconds = proxy.wait_state("a", "DOWN", timeout=90)
        assert proxy.states()["b"] == "UP"
        results = [echo(proxy.port) for _ in range(6)]
        assert all(results), results  # every new association reached the survivor
        os.kill(pid, signal.SIGCONT)
        proxy.wait_state("a", "UP", timeout=30)
        print(f"\nhung node taken out of rotation after {seconds:.1f}s")
    finally:
        os.kill(pid, signal.SIGCONT)
        proxy.stop()
        for s in nodes:
            s.stop()
