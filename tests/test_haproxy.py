"""Two `pacsgrid serve` nodes on one PostgreSQL and one storage site, behind HAProxy (TCP mode,
DICOM-level health check): a node killed during a storescu run, a node hung (SIGSTOP)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench import synth
from pacsgrid.deploy import haproxy_config
from tests.conftest import Server, dcmtk
from tests.haproxy import HAProxy
from tests.pg import PgCluster
from tests.senders import Sent, sop_uid, storescu
from tests.test_pg_cluster import check_retrievable, pacsgrid

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


def echo(port: int) -> bool:
    return (
        dcmtk(
            "echoscu", "-to", "5", "-ta", "5", "-aec", "PACSGRID", "127.0.0.1", port, timeout=30
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


def test_node_killed_during_storescu(
    tmp_path: Path, pg_server: PgCluster, synth_files: list[Path]
) -> None:
    url = pg_server.create_db("two_nodes")
    # Backups every 2.88 s: both nodes run the schedule; each period's backup is taken once.
    nodes = two_nodes(tmp_path, url, backup_hours=0.0008)
    proxy = HAProxy(
        tmp_path, [("a", "127.0.0.1", nodes[0].port), ("b", "127.0.0.1", nodes[1].port)]
    )
    try:
        proxy.wait_state("a", "UP")
        proxy.wait_state("b", "UP")
        batches = [synth_files[i : i + 4] for i in range(0, len(synth_files), 4)]
        results: list[tuple[float, Sent]] = []
        killed_at = 0.0
        for n, batch in enumerate(batches):
            if n == len(batches) // 3:
                threading.Timer(0.02, nodes[0].kill).start()  # during this association
                killed_at = time.monotonic()
            results.append((time.monotonic(), storescu(proxy.port, batch)))
        assert killed_at
        after = [s for t, s in results if t > killed_at + 0.5]
        assert after and all(not s.failed for s in after), [s.failed for s in after]
        assert all(s.stored for s in after), "new associations did not reach the survivor"
        retry = [p for _, s in results for p in s.failed]
        final = storescu(proxy.port, retry) if retry else Sent()
        assert not final.failed
        acked = [p for _, s in results for p in s.stored] + final.stored
        assert {sop_uid(p) for p in acked} == {sop_uid(p) for p in synth_files}
        assert "association from MODALITY" in nodes[0].text()  # a took stores before
        assert "association from MODALITY" in nodes[1].text()
        proxy.wait_state("a", "DOWN")
        time.sleep(3.5)  # let the backup schedule run for another period or two
    finally:
        proxy.stop()
        for s in nodes:
            s.stop()
    cfg = node_config(tmp_path, url)
    check_retrievable(tmp_path / "node-b", url, {sop_uid(p) for p in acked}, cfg)
    reconcile = pacsgrid(
        "reindex",
        "--reconcile",
        "--config",
        node_config(tmp_path, url),
        "--data-dir",
        tmp_path / "node-b",
    )
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "indexed 0 new" in reconcile.stdout  # nothing acknowledged was missing
    from pacsgrid.jobs.backup import backups

    taken = backups(tmp_path / "backups")
    assert taken, "the backup schedule never ran"
    starts = sorted(m.created - m.seconds for m in taken)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g > 2.0 for g in gaps), f"two nodes backed up in the same period: {gaps}"
    print(
        f"\ntwo nodes: {len(acked)} acknowledged, node a killed mid-run, "
        f"{sum(len(s.stored) for s in after)} stored via node b afterwards; "
        f"{len(taken)} scheduled backups, one per period"
    )


def test_hung_node_is_taken_out_of_rotation(tmp_path: Path, pg_server: PgCluster) -> None:
    url = pg_server.create_db("hung_node")
    nodes = two_nodes(tmp_path, url)
    proxy = HAProxy(
        tmp_path, [("a", "127.0.0.1", nodes[0].port), ("b", "127.0.0.1", nodes[1].port)]
    )
    assert nodes[0].proc is not None
    pid = nodes[0].proc.pid
    try:
        proxy.wait_state("a", "UP")
        proxy.wait_state("b", "UP")
        os.kill(pid, signal.SIGSTOP)  # hung: the port still accepts, nothing answers
        seconds = proxy.wait_state("a", "DOWN", timeout=30)
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
